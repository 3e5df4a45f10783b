"""persample: per-sample gradients for PyTorch.

A fused Triton cross-entropy that yields each example's loss and logit gradient in one pass, a
``torch.func`` pipeline for per-sample gradients and clipping, and DP-SGD on top.
"""

from persample.cross_entropy import CrossEntropyLoss, cross_entropy, cross_entropy_with_grad
from persample.linear_cross_entropy import (
    HeadGradNorms,
    linear_cross_entropy,
    linear_cross_entropy_head_grad_norms,
)

__all__ = [
    "CrossEntropyLoss",
    "HeadGradNorms",
    "cross_entropy",
    "cross_entropy_with_grad",
    "linear_cross_entropy",
    "linear_cross_entropy_head_grad_norms",
]
__version__ = "0.1.0"
