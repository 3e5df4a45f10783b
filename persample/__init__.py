"""persample: per-sample gradients for PyTorch.

A fused Triton cross-entropy that yields each example's loss and logit gradient in one pass, a
``torch.func`` pipeline for per-sample gradients and clipping, and DP-SGD on top.
"""

from persample.accounting import PrivacyAccountant, epsilon_for, noise_multiplier_for
from persample.clipping import clip_factors, clip_per_layer, clip_per_sample, per_sample_norms
from persample.cross_entropy import CrossEntropyLoss, cross_entropy, cross_entropy_with_grad
from persample.data import PoissonSampler
from persample.dp import DPOptimizer
from persample.engine import ClippedGradSum, GhostClipping, clipped_grad_sum, per_sample_grad_norms_fast
from persample.linear_cross_entropy import (
    HeadGradNorms,
    linear_cross_entropy,
    linear_cross_entropy_head_grad_norms,
)
from persample.noise import add_noise, gaussian_noise
from persample.opacus_interop import set_grad_sample
from persample.per_sample_grads import per_sample_grad_norms, per_sample_grads

__all__ = [
    "ClippedGradSum",
    "CrossEntropyLoss",
    "DPOptimizer",
    "GhostClipping",
    "HeadGradNorms",
    "PoissonSampler",
    "PrivacyAccountant",
    "add_noise",
    "clip_factors",
    "clip_per_layer",
    "clip_per_sample",
    "clipped_grad_sum",
    "cross_entropy",
    "cross_entropy_with_grad",
    "epsilon_for",
    "gaussian_noise",
    "linear_cross_entropy",
    "linear_cross_entropy_head_grad_norms",
    "noise_multiplier_for",
    "per_sample_grad_norms",
    "per_sample_grad_norms_fast",
    "per_sample_grads",
    "per_sample_norms",
    "set_grad_sample",
]
__version__ = "0.1.0"
