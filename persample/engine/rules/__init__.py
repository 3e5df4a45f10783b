"""The per-layer rules; importing this package registers them (see :mod:`persample.engine.registry`)."""

from persample.engine.rules import conv, conv1d, embedding, groupnorm, layernorm, linear

__all__ = ["conv", "conv1d", "embedding", "groupnorm", "layernorm", "linear"]
