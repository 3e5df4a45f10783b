"""Per-sample clipping: small pure functions over ``{param_name: (B, *param.shape)}`` dicts.

The DP-SGD chain is clip -> sum -> add noise -> scale. These functions do the first two: they bound each
example's gradient and return the sum over the batch, ``{param_name: param.shape}``, which is what
:meth:`persample.DPOptimizer.accumulate` takes (any engine that produces clipped sums plugs in there).

Clipping factor, as in Opacus: ``min(1, max_grad_norm / (norm + 1e-6))``; the ``1e-6`` keeps the
factor finite for zero gradients and makes every clipped norm strictly below ``max_grad_norm``.
"""

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from persample.checks import check_max_grad_norm

Grads = Mapping[str, Tensor]

_EPS = 1e-6


def per_sample_norms(grads: Grads) -> Tensor:
    """The L2 norm of each example's gradient over all parameters in ``grads``.

    Args:
        grads: ``{name: (B, *shape)}``, the same ``B`` for every entry.

    Returns:
        ``(B,)``, float32 (float64 if any gradient is float64), on the gradients' device.

    Raises:
        ValueError: empty ``grads`` or differing batch sizes.
    """
    batch = _batch_size(grads)
    acc = torch.float64 if any(g.dtype == torch.float64 for g in grads.values()) else torch.float32
    squares = [g.reshape(batch, math.prod(g.shape[1:])).to(acc).square().sum(dim=1) for g in grads.values()]
    return torch.stack(squares, dim=1).sum(dim=1).sqrt()


def clip_factors(norms: Tensor, max_grad_norm: float) -> Tensor:
    """``min(1, max_grad_norm / (norms + 1e-6))``, shape of ``norms`` ``(B,)``.

    Raises:
        ValueError: ``max_grad_norm`` not > 0.
    """
    check_max_grad_norm(max_grad_norm)
    return (max_grad_norm / (norms + _EPS)).clamp(max=1.0)


def clip_per_sample(grads: Grads, max_grad_norm: float, *, norms: Tensor | None = None) -> dict[str, Tensor]:
    """Flat clipping: scales each example's whole gradient to norm at most ``max_grad_norm``, then sums.

    Args:
        grads: ``{name: (B, *shape)}`` per-sample gradients.
        max_grad_norm: the bound ``C`` on each example's gradient norm over all parameters (> 0).
        norms: ``(B,)`` norms from :func:`per_sample_norms`, if already computed.

    Returns:
        ``{name: shape}``: ``sum_i min(1, C / (||g_i|| + 1e-6)) * g_i``, in each gradient's dtype. With
        ``B == 0`` the sums are zeros.

    Raises:
        ValueError: ``max_grad_norm`` not > 0, empty ``grads``, differing batch sizes, ``norms`` not ``(B,)``.
    """
    check_max_grad_norm(max_grad_norm)
    batch = _batch_size(grads)
    if norms is None:
        norms = per_sample_norms(grads)
    elif tuple(norms.shape) != (batch,):
        raise ValueError(f"norms must have shape ({batch},) (one per example), got {tuple(norms.shape)}")
    return _weighted_sum(grads, clip_factors(norms, max_grad_norm))


def clip_per_layer(
    grads: Grads,
    max_grad_norm: float | Mapping[str, float],
    *,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Tensor]:
    """Per-layer clipping: each group of parameters of each example is clipped to its own bound, then summed.

    Args:
        grads: ``{name: (B, *shape)}`` per-sample gradients.
        max_grad_norm: a float ``C`` bounds the whole clipped gradient of an example: each of the ``G``
            groups is clipped to ``C / sqrt(G)``, so noise calibrated for flat clipping at ``C`` stays
            valid. A mapping ``{group: C_g}`` gives each group its own bound; an example's clipped gradient
            is then bounded by ``sqrt(sum_g C_g**2)``, the ``max_grad_norm`` to give the DP optimizer.
        groups: ``{group: [param names]}`` covering every name in ``grads`` once. Default
            :func:`layer_groups`: one group per layer (``"fc.weight"`` and ``"fc.bias"`` form ``"fc"``).

    Returns:
        ``{name: shape}``, the sums of the clipped per-sample gradients.

    Raises:
        ValueError: a bound not > 0, groups that do not partition ``grads``, bounds that do not match the groups.
    """
    _batch_size(grads)
    groups = layer_groups(grads) if groups is None else groups
    listed = [name for names in groups.values() for name in names]
    if sorted(listed) != sorted(grads):
        raise ValueError(f"groups must list every parameter of grads exactly once: grads has {sorted(grads)}, "
                         f"groups list {sorted(listed)}")
    if isinstance(max_grad_norm, Mapping):
        if set(max_grad_norm) != set(groups):
            raise ValueError(f"max_grad_norm must give one bound per group: groups are {sorted(groups)}, "
                             f"bounds were given for {sorted(max_grad_norm)}")
        bounds = {group: max_grad_norm[group] for group in groups}
        for bound in bounds.values():
            check_max_grad_norm(bound)
    else:
        check_max_grad_norm(max_grad_norm)
        bounds = {group: max_grad_norm / math.sqrt(len(groups)) for group in groups}
    clipped = {}
    for group, names in groups.items():
        members = {name: grads[name] for name in names}
        clipped.update(_weighted_sum(members, clip_factors(per_sample_norms(members), bounds[group])))
    return {name: clipped[name] for name in grads}


def layer_groups(names: Sequence[str] | Grads) -> dict[str, list[str]]:
    """``{layer: [param names]}``, grouping parameter names by their module prefix (``"fc.weight"`` ->
    ``"fc"``; a top-level parameter is a group of its own)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return groups


def _weighted_sum(grads: Grads, factors: Tensor) -> dict[str, Tensor]:
    return {name: torch.einsum("b,b...->...", factors.to(g.dtype), g) for name, g in grads.items()}


def _batch_size(grads: Grads) -> int:
    if not grads:
        raise ValueError("grads is empty: expected {param_name: (B, *param.shape)} with at least one parameter")
    sizes = {name: g.shape[0] if g.ndim else None for name, g in grads.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"every per-sample gradient needs the same leading batch dimension, got {sizes}")
    return next(iter(sizes.values()))


