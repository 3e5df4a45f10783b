"""persample: per-sample gradients for PyTorch.

A fused Triton cross-entropy that yields each example's loss and logit gradient in one pass, a
``torch.func`` pipeline for per-sample gradients and clipping, and DP-SGD on top.
"""

from persample.cross_entropy import CrossEntropyLoss, cross_entropy, cross_entropy_with_grad

__all__ = ["CrossEntropyLoss", "cross_entropy", "cross_entropy_with_grad"]
__version__ = "0.1.0"
