"""Integrations with other libraries. Each module imports its library lazily, so ``import persample`` never
needs them installed."""
