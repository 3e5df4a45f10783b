"""persample: per-sample gradients for PyTorch.

A fused Triton cross-entropy that yields each example's loss and logit gradient in one pass, a
``torch.func`` pipeline for per-sample gradients and clipping, and DP-SGD on top.
"""

from persample.cross_entropy import CrossEntropyLoss, cross_entropy, cross_entropy_with_grad
from persample.engine import ClippedGradSum, GhostClipping, clipped_grad_sum, per_sample_grad_norms_fast

__all__ = [
    "ClippedGradSum",
    "CrossEntropyLoss",
    "GhostClipping",
    "clipped_grad_sum",
    "cross_entropy",
    "cross_entropy_with_grad",
    "per_sample_grad_norms_fast",
]
__version__ = "0.1.0"
