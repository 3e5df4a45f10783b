r"""One pass over the targets of a cross-entropy: the reduction's scale and the verdict of the range check.

For targets ``t`` (N,) against V classes, with class weights ``w`` (all ones without them):

    counted_i = t_i != ignore_index and 0 <= t_i < V
    bad_i     = t_i != ignore_index and not 0 <= t_i < V
    scale     = (1 / sum_{counted i} w_{t_i},  1 / #{counted i})    for reduction="mean", else (1, 1)
    verdict   = 2 + j for the first j with bad_j, or 1 when there is none

The scale is a pair: the factor of the cross-entropy terms (the weighted mean's) and that of the z-loss terms
(a plain mean over the counted rows, whatever the weights' scale); each is 0 when its denominator is 0.

The verdict is one int64 word, 0 until the kernel writes it, so a host that polls a word in pinned memory
(see ``persample/_verdicts.py``) learns the outcome from that single store, with no copy or event behind it.

The pass is a set of ``@triton.jit`` helpers, run either by the small kernel below (before a main kernel
that needs the scale) or by the main kernel itself (see ``CHECK`` and ``SCALE_MEAN`` in cross_entropy.py).
One program walks the targets in blocks, so sums come in a fixed order (reproducible) and no atomics are
needed; the targets are a tiny fraction of the logits' size.
"""

import torch
import triton
import triton.language as tl

from .launch import acc_dtype, interpreting, launch

PENDING, IN_RANGE, FIRST_BAD = 0, 1, 2  # verdict words: FIRST_BAD + j names row j


@triton.jit
def scan_targets(target_ptr, weight_ptr, N, V, ignore_index, HAS_WEIGHT: tl.constexpr, MEAN: tl.constexpr,
                 BLOCK: tl.constexpr, ACC: tl.constexpr):
    """(sum of the counted rows' target weights, their count, both 0 unless ``MEAN``; the first bad row, or N
    if none). Without weights the count is the sum."""
    denom = tl.zeros([BLOCK], ACC)
    count = tl.zeros([BLOCK], ACC)
    first_bad = tl.full([], N, tl.int64)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        t = tl.load(target_ptr + offs, mask=offs < N, other=ignore_index)
        in_range = (t >= 0) & (t < V)
        kept = t != ignore_index
        first_bad = tl.minimum(first_bad, tl.min(tl.where(kept & ~in_range, offs, N), 0))
        if MEAN:
            counted = kept & in_range
            if HAS_WEIGHT:
                denom += tl.load(weight_ptr + tl.where(counted, t, 0), mask=counted, other=0.0).to(ACC)
                count += counted.to(ACC)
            else:
                denom += counted.to(ACC)
    if HAS_WEIGHT:
        return tl.sum(denom, 0), tl.sum(count, 0), first_bad
    total = tl.sum(denom, 0)
    return total, total, first_bad


@triton.jit
def mean_scale(total):
    """1 / total, or 0 when nothing is counted."""
    return tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)


@triton.jit
def store_verdict(verdict_ptr, first_bad, N):
    # A plain store reaches a polling host within microseconds while the kernel goes on (measured on an H100:
    # exp/flag_visibility.py, outside the repository).
    tl.store(verdict_ptr, tl.where(first_bad < N, first_bad + 2, 1))


@triton.jit
def _target_stats_kernel(
    target_ptr, weight_ptr, scale_ptr, verdict_ptr, N, V, ignore_index,
    HAS_WEIGHT: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    total, count, first_bad = scan_targets(target_ptr, weight_ptr, N, V, ignore_index, HAS_WEIGHT, MEAN, BLOCK,
                                           ACC)
    store_verdict(verdict_ptr, first_bad, N)
    if MEAN:
        tl.store(scale_ptr, mean_scale(total))
        tl.store(scale_ptr + 1, mean_scale(count))
    else:
        tl.store(scale_ptr, 1.0)
        tl.store(scale_ptr + 1, 1.0)


def scan_block() -> int:
    """The block of targets one step of :func:`scan_targets` reads (small in the interpreter, so that tests
    cross block boundaries)."""
    return 64 if interpreting() else 1024


def target_stats(
    target: torch.Tensor, V: int, weight: torch.Tensor | None, ignore_index: int, mean: bool, acc: torch.dtype,
    verdict: torch.Tensor,
) -> torch.Tensor:
    """The scale (1, 2) in ``acc`` for ``target`` (N,) int64 and ``weight`` (V,) or None, and the verdict written
    to ``verdict`` (a one-element int64 tensor, on the device or in pinned host memory); see the module
    docstring."""
    scale = torch.empty(1, 2, dtype=acc, device=target.device)
    launch(
        _target_stats_kernel, (1,),
        target, weight if weight is not None else scale, scale, verdict, target.numel(), V, ignore_index,
        HAS_WEIGHT=weight is not None, MEAN=mean, BLOCK=scan_block(), ACC=acc_dtype(acc), num_warps=8,
    )
    return scale
