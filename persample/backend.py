"""Where persample's Triton kernels run, and whether a transform is tracing the code that would launch them.

Shared by the loss and the engine's rules: one switch, so every op picks the same path for a tensor.
"""

import torch

from persample.kernels import launch as _launch


def transforms_active() -> bool:
    """True under torch.compile or any torch.func transform (grad, vmap, jacrev, ...)."""
    return torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None


def use_triton(t: torch.Tensor) -> bool:
    """Whether ``t`` runs the Triton kernels: CUDA, or any tensor when ``TRITON_INTERPRET=1``."""
    return t.is_cuda or _launch.interpreting()
