"""The per-layer rules; importing this package registers them (see :mod:`persample.engine.registry`)."""

from persample.engine.rules import conv1d, conv2d, embedding, groupnorm, layernorm, linear

__all__ = ["conv1d", "conv2d", "embedding", "groupnorm", "layernorm", "linear"]
