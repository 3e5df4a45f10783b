"""Triton kernels of persample, installed as ``persample.kernels`` (see README: never a top-level
``kernels`` module). Each file holds one op: its math, its ``@triton.jit`` kernels and their launchers.
This package imports torch and triton only."""
