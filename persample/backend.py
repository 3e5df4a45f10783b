"""Where persample's Triton kernels run, whether a transform is tracing the code that would launch them, and
whether a tensor is a DTensor.

Shared by the loss and the engine's rules: one switch, so every op picks the same path for a tensor.
"""

import sys

import torch

from persample.kernels import launch as _launch


def transforms_active() -> bool:
    """True under torch.compile or any torch.func transform (grad, vmap, jacrev, ...)."""
    return torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None


def use_triton(t: torch.Tensor) -> bool:
    """Whether ``t`` runs the Triton kernels: CUDA, or any tensor when ``TRITON_INTERPRET=1``."""
    return t.is_cuda or _launch.interpreting()


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (``fully_shard``'s parameters), without importing ``torch.distributed.tensor``
    (most of a second of ``import persample`` on two CPU cores) where nothing has: no DTensor exists before."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)
