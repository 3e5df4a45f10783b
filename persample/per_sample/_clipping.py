"""Per-sample clipping: small pure functions over ``{param_name: (B, *param.shape)}`` dicts.

The DP-SGD chain is clip -> sum -> add noise -> scale. These functions do the first two: they bound each
example's gradient and return the sum over the batch, ``{param_name: param.shape}``, which is what
:meth:`persample.DPOptimizer.accumulate` takes (any engine that produces clipped sums plugs in there).

Clipping factor, as in Opacus: ``min(1, max_grad_norm / (norm + 1e-6))``; the ``1e-6`` keeps the
factor finite for zero gradients and makes every clipped norm strictly below ``max_grad_norm``.

An example whose gradient is not finite (a NaN or inf anywhere makes its norm NaN or inf) would turn the
whole sum into NaN, and its contribution is bounded only if its norm is a number. By default
(``nonfinite="zero"``) it gets a clip factor of 0 and its gradient is replaced by zeros, so it contributes
nothing and the sensitivity bound holds; the sum reports how many there were and a
:class:`~persample.checks.NonFiniteGradientWarning` names their batch positions. ``nonfinite="raise"`` raises
a ``ValueError`` naming them instead. The check is one ``isfinite`` over the ``(B,)`` norms and one host sync.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from persample.checks import check_max_grad_norm, check_nonfinite, handle_nonfinite

Grads = Mapping[str, Tensor]
NonFinite = Literal["zero", "raise"]

_EPS = 1e-6


def per_sample_norms(grads: Grads) -> Tensor:
    """The L2 norm of each example's gradient over all parameters in ``grads``.

    Args:
        grads: ``{name: (B, *shape)}``, the same ``B`` for every entry.

    Returns:
        ``(B,)``, float32 (float64 if any gradient is float64), on the gradients' device.

    Raises:
        ValueError: empty ``grads`` or differing batch sizes.

    Examples:
        >>> import torch
        >>> import persample
        >>> grads = {"w": torch.tensor([[3.0, 0.0], [1.0, 1.0]]), "b": torch.tensor([[4.0], [1.0]])}
        >>> persample.per_sample_norms(grads)  # sqrt(9 + 16), sqrt(1 + 1 + 1)
        tensor([5.0000, 1.7321])

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (the norm of each example's gradient
        over all parameters, which flat clipping bounds).
    """
    batch = _batch_size(grads)
    acc = torch.float64 if any(g.dtype == torch.float64 for g in grads.values()) else torch.float32
    squares = [g.reshape(batch, math.prod(g.shape[1:])).to(acc).square().sum(dim=1) for g in grads.values()]
    return torch.stack(squares, dim=1).sum(dim=1).sqrt()


class ClippedSum(dict):
    """What :func:`clip_per_sample` and :func:`clip_per_layer` return: the dict ``{name: param.shape}`` of
    clipped sums, and ``nonfinite``, the number of examples whose gradient was not finite and that contributed
    zero.

    Examples:
        >>> import torch
        >>> import persample
        >>> summed = persample.clip_per_sample({"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}, 1.0)
        >>> isinstance(summed, dict), sorted(summed), summed.nonfinite
        (True, ['w'], 0)
    """

    def __init__(self, sums: Mapping[str, Tensor], nonfinite: int = 0):
        super().__init__(sums)
        self.nonfinite = nonfinite


def clip_factors(norms: Tensor, max_grad_norm: float) -> Tensor:
    """``min(1, max_grad_norm / (norms + 1e-6))``, shape of ``norms`` ``(B,)``; 0 where a norm is not finite.

    Raises:
        ValueError: ``max_grad_norm`` not > 0.

    Examples:
        >>> import torch
        >>> import persample
        >>> persample.clip_factors(torch.tensor([0.5, 2.0, float("inf")]), 1.0)  # kept, halved, dropped
        tensor([1.0000, 0.5000, 0.0000])

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (the clipping
        ``g / max(1, ||g|| / C)``; the ``1e-6`` is Opacus's).
    """
    check_max_grad_norm(max_grad_norm)
    factors = (max_grad_norm / (norms + _EPS)).clamp(max=1.0)
    return torch.where(torch.isfinite(norms), factors, 0.0)


def clip_per_sample(grads: Grads, max_grad_norm: float, *, norms: Tensor | None = None,
                    nonfinite: NonFinite = "zero") -> ClippedSum:
    """Flat clipping: scales each example's whole gradient to norm at most ``max_grad_norm``, then sums.

    Args:
        grads: ``{name: (B, *shape)}`` per-sample gradients.
        max_grad_norm: the bound ``C`` on each example's gradient norm over all parameters (> 0).
        norms: ``(B,)`` norms from :func:`per_sample_norms`, if already computed.
        nonfinite: what an example whose norm is not finite does: ``"zero"`` contributes zero (counted in the
            result's ``nonfinite``, named in a :class:`~persample.checks.NonFiniteGradientWarning`),
            ``"raise"`` raises (see the module docstring).

    Returns:
        :class:`ClippedSum`, a dict ``{name: shape}``: ``sum_i min(1, C / (||g_i|| + 1e-6)) * g_i`` over the
        examples with a finite norm, in each gradient's dtype; ``.nonfinite`` counts the others. With
        ``B == 0`` the sums are zeros.

    Raises:
        ValueError: ``max_grad_norm`` not > 0, empty ``grads``, differing batch sizes, ``norms`` not ``(B,)``,
            an unknown ``nonfinite``, or with ``nonfinite="raise"`` an example whose norm is not finite.

    Examples:
        >>> grads = {"w": torch.tensor([[3.0, 4.0], [float("nan"), 0.0]])}
        >>> summed = clip_per_sample(grads, 1.0)  # warns: 1 of 2 examples ..., at batch positions [1]
        >>> summed["w"], summed.nonfinite
        (tensor([0.6000, 0.8000]), 1)

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (per-example clipping).
    """
    check_max_grad_norm(max_grad_norm)
    check_nonfinite(nonfinite)
    batch = _batch_size(grads)
    if norms is None:
        norms = per_sample_norms(grads)
    elif tuple(norms.shape) != (batch,):
        raise ValueError(f"norms must have shape ({batch},) (one per example), got {tuple(norms.shape)}")
    keep, dropped = _finite_examples(torch.isfinite(norms), nonfinite)
    return ClippedSum(_weighted_sum(grads, clip_factors(norms, max_grad_norm), keep), dropped)


def clip_per_layer(
    grads: Grads,
    max_grad_norm: float | Mapping[str, float],
    *,
    groups: Mapping[str, Sequence[str]] | None = None,
    nonfinite: NonFinite = "zero",
) -> ClippedSum:
    """Per-layer clipping: each group of parameters of each example is clipped to its own bound, then summed.

    Args:
        grads: ``{name: (B, *shape)}`` per-sample gradients.
        max_grad_norm: a float ``C`` bounds the whole clipped gradient of an example: each of the ``G``
            groups is clipped to ``C / sqrt(G)``, so noise calibrated for flat clipping at ``C`` stays
            valid. A mapping ``{group: C_g}`` gives each group its own bound; an example's clipped gradient
            is then bounded by ``sqrt(sum_g C_g**2)``, the ``max_grad_norm`` to give the DP optimizer.
        groups: ``{group: [param names]}`` covering every name in ``grads`` once. Default
            :func:`layer_groups`: one group per layer (``"fc.weight"`` and ``"fc.bias"`` form ``"fc"``).
        nonfinite: as in :func:`clip_per_sample`; an example with a non-finite norm in any group contributes
            zero in every group.

    Returns:
        :class:`ClippedSum`, a dict ``{name: shape}`` of the sums of the clipped per-sample gradients;
        ``.nonfinite`` counts the examples that contributed zero.

    Raises:
        ValueError: a bound not > 0, groups that do not partition ``grads``, bounds that do not match the groups,
            an unknown ``nonfinite``, or with ``nonfinite="raise"`` an example whose norm is not finite.

    Examples:
        >>> import torch
        >>> import persample
        >>> grads = {"fc.weight": torch.tensor([[[3.0, 4.0]]]), "fc.bias": torch.tensor([[0.0]]),
        ...          "out.weight": torch.tensor([[[0.1, 0.0]]])}  # one example
        >>> summed = persample.clip_per_layer(grads, 2 ** 0.5)  # two layers, each clipped to 1
        >>> summed["fc.weight"], summed["out.weight"]
        (tensor([[0.6000, 0.8000]]), tensor([[0.1000, 0.0000]]))
        >>> bounds = {"fc": 0.5, "out": 1.0}  # the whole example is then bounded by sqrt(0.5**2 + 1**2)
        >>> persample.clip_per_layer(grads, bounds)["fc.weight"]
        tensor([[0.3000, 0.4000]])

    References:
        McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018 (per-layer
        clipping, the bound ``sqrt(sum_g C_g**2)``); Abadi et al., "Deep Learning with Differential Privacy",
        CCS 2016.
    """
    _batch_size(grads)
    check_nonfinite(nonfinite)
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
    members = {group: {name: grads[name] for name in names} for group, names in groups.items()}
    norms = {group: per_sample_norms(m) for group, m in members.items()}
    keep, dropped = _finite_examples(torch.stack(list(norms.values())).isfinite().all(0), nonfinite)
    clipped = {}
    for group, m in members.items():
        clipped.update(_weighted_sum(m, clip_factors(norms[group], bounds[group]), keep))
    return ClippedSum({name: clipped[name] for name in grads}, dropped)


def layer_groups(names: Sequence[str] | Grads) -> dict[str, list[str]]:
    """``{layer: [param names]}``, grouping parameter names by their module prefix (``"fc.weight"`` ->
    ``"fc"``; a top-level parameter is a group of its own)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return groups


def _finite_examples(finite: Tensor, nonfinite: NonFinite) -> tuple[Tensor | None, int]:
    """``(keep, count)``: ``keep`` the ``(B,)`` mask of the examples to sum, None when all are; ``count`` how many
    are not. Applies the policy (warns or raises) to the others."""
    if bool(finite.all()):
        return None, 0
    positions = (~finite).nonzero().flatten().tolist()
    handle_nonfinite(positions, finite.numel(), nonfinite, stacklevel=3)
    return finite, len(positions)


def _weighted_sum(grads: Grads, factors: Tensor, keep: Tensor | None = None) -> dict[str, Tensor]:
    """``{name: sum_b factors_b g_b}``; with ``keep``, the gradients of the other examples are zeros first (their
    factor 0 alone would leave 0 * NaN = NaN in the sum)."""
    if keep is not None:
        grads = {name: torch.where(keep.view(-1, *[1] * (g.ndim - 1)), g, 0) for name, g in grads.items()}
    return {name: torch.einsum("b,b...->...", factors.to(g.dtype), g) for name, g in grads.items()}


def _batch_size(grads: Grads) -> int:
    if not grads:
        raise ValueError("grads is empty: expected {param_name: (B, *param.shape)} with at least one parameter")
    sizes = {name: g.shape[0] if g.ndim else None for name, g in grads.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"every per-sample gradient needs the same leading batch dimension, got {sizes}")
    return next(iter(sizes.values()))


