"""The loss: cross-entropy on raw logits fused into one Triton kernel pass, and the linear head fused with it.

* :mod:`~persample.loss._cross_entropy` — :func:`cross_entropy`, :func:`cross_entropy_with_grad`,
  :class:`CrossEntropyLoss`: the public API and its boundary checks.
* :mod:`~persample.loss._cross_entropy_ops` — registration with autograd, ``torch.func`` and ``torch.compile``.
* :mod:`~persample.loss._linear_cross_entropy` and ``_linear_cross_entropy_ops`` — the head and the loss without
  the logits, and each example's head gradient norm.
* :mod:`~persample.loss.checks` — argument checks and the target check shared by both.
* :mod:`~persample.loss._verdicts` — how a kernel's verdict on the targets reaches the host.
"""

from persample.loss._cross_entropy import (
    CrossEntropyLoss,
    cross_entropy,
    cross_entropy_with_grad,
    with_grad_check_later,
)
from persample.loss._linear_cross_entropy import (
    HeadGradNorms,
    linear_cross_entropy,
    linear_cross_entropy_head_grad_norms,
)
from persample.loss.checks import check_targets_later

__all__ = [
    "CrossEntropyLoss",
    "HeadGradNorms",
    "check_targets_later",
    "cross_entropy",
    "cross_entropy_with_grad",
    "linear_cross_entropy",
    "linear_cross_entropy_head_grad_norms",
    "with_grad_check_later",
]
