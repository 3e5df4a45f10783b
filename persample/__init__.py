"""persample: per-sample gradients for PyTorch.

A fused Triton cross-entropy that yields each example's loss and logit gradient in one pass, a
``torch.func`` pipeline for per-sample gradients and clipping, and DP-SGD on top. The packages, by concern:
``loss`` (the fused cross-entropy and linear head), ``per_sample`` (the ``torch.func`` pipeline), ``engine``
(per-example norms and clipped sums from one backward), ``dp`` (sampling, noise, optimizer, accounting),
``audit`` (lower bounds on the epsilon a run really has), ``integrations`` (transformers, Opacus) and ``app``
(the digits command line). The Triton kernels are ``persample.kernels``.
"""

from persample.audit import audit_dp_sgd
from persample.checks import NonFiniteGradientWarning
from persample.dp import (
    BatchMemoryManager,
    DistributedDPOptimizer,
    DistributedPoissonSampler,
    DPDataLoader,
    DPOptimizer,
    PoissonSampler,
    PrivacyAccountant,
    PrivacyEngine,
    add_noise,
    epsilon_for,
    gaussian_noise,
    noise_multiplier_for,
)
from persample.engine import ClippedGrads, ClippedGradSum, GhostClipping, clipped_grad_sum, per_sample_grad_norms_fast
from persample.integrations.opacus import set_grad_sample
from persample.loss import (
    CrossEntropyLoss,
    HeadGradNorms,
    cross_entropy,
    cross_entropy_with_grad,
    linear_cross_entropy,
    linear_cross_entropy_head_grad_norms,
)
from persample.per_sample import (
    ClippedSum,
    clip_factors,
    clip_per_layer,
    clip_per_sample,
    per_sample_grad_norms,
    per_sample_grads,
    per_sample_norms,
)

__all__ = [
    "BatchMemoryManager",
    "ClippedGradSum",
    "ClippedGrads",
    "ClippedSum",
    "CrossEntropyLoss",
    "DPDataLoader",
    "DPOptimizer",
    "DistributedDPOptimizer",
    "DistributedPoissonSampler",
    "GhostClipping",
    "HeadGradNorms",
    "NonFiniteGradientWarning",
    "PoissonSampler",
    "PrivacyAccountant",
    "PrivacyEngine",
    "add_noise",
    "audit_dp_sgd",
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
