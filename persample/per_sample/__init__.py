"""The ``torch.func`` pipeline: each example's gradient (``functional_call`` + ``vmap(grad)``), its norm, and
clipping, flat or per layer.

* :mod:`~persample.per_sample._grads` — :func:`per_sample_grads`, :func:`per_sample_grad_norms`.
* :mod:`~persample.per_sample._clipping` — :func:`per_sample_norms`, :func:`clip_factors`, :class:`ClippedSum`,
  :func:`clip_per_sample`, :func:`clip_per_layer`, :func:`layer_groups`.
"""

from persample.per_sample._clipping import (
    ClippedSum,
    clip_factors,
    clip_per_layer,
    clip_per_sample,
    layer_groups,
    per_sample_norms,
)
from persample.per_sample._grads import per_sample_grad_norms, per_sample_grads

__all__ = [
    "ClippedSum",
    "clip_factors",
    "clip_per_layer",
    "clip_per_sample",
    "layer_groups",
    "per_sample_grad_norms",
    "per_sample_grads",
    "per_sample_norms",
]
