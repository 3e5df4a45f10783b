"""Triton kernels of persample, installed as ``persample.kernels`` (see README: never a top-level
``kernels`` module). Each op file holds one op: its math, its ``@triton.jit`` kernels and their launchers;
``launch.py`` launches compiled kernels with little host overhead and holds the launchers' shared
helpers (block and grid sizes, the accumulation dtype). This package imports torch and triton
only."""
