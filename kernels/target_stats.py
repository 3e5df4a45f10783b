r"""One pass over the targets of a cross-entropy, before its main kernel: the reduction's scale and the
first out-of-range class index.

For targets ``t`` (N,) against V classes, with class weights ``w`` (all ones without them):

    counted_i = t_i != ignore_index and 0 <= t_i < V
    bad_i     = t_i != ignore_index and not 0 <= t_i < V
    scale     = 1 / sum_{counted i} w_{t_i}    for reduction="mean" (0 when nothing is counted), else 1
    status    = (1, t_j) for the first j with bad_j, or (0, 0) when there is none
    ticket    = 0, a counter for the main kernel's final reduction (see ``REDUCE`` in cross_entropy.py)

This replaces a dozen small PyTorch ops, each a launch the host would wait on before the main kernel. One
program walks the targets in blocks, so sums come in a fixed order (reproducible) and no atomics are needed;
the targets are a tiny fraction of the logits' size.
"""

import torch
import triton
import triton.language as tl

from .launch import acc_dtype, interpreting, launch


@triton.jit
def _target_stats_kernel(
    target_ptr, weight_ptr, scale_ptr, status_ptr, N, V, ignore_index,
    HAS_WEIGHT: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    denom = tl.zeros([BLOCK], ACC)
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
            else:
                denom += counted.to(ACC)
    if MEAN:
        total = tl.sum(denom, 0)
        scale = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
    else:
        scale = tl.full([], 1.0, ACC)
    tl.store(scale_ptr, scale)
    has_bad = first_bad < N
    tl.store(status_ptr, has_bad.to(tl.int64))
    tl.store(status_ptr + 1, tl.load(target_ptr + tl.where(has_bad, first_bad, 0), mask=has_bad, other=0))
    tl.store(status_ptr + 2, 0)


def target_stats(
    target: torch.Tensor, V: int, weight: torch.Tensor | None, ignore_index: int, mean: bool, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale (1,) in ``acc``, status (2,) int64, ticket (1,) int64) for ``target`` (N,) int64 and ``weight``
    (V,) or None; see the module docstring."""
    scale = torch.empty(1, dtype=acc, device=target.device)
    status = torch.empty(3, dtype=torch.int64, device=target.device)
    launch(
        _target_stats_kernel, (1,),
        target, weight if weight is not None else scale, scale, status, target.numel(), V, ignore_index,
        HAS_WEIGHT=weight is not None, MEAN=mean, BLOCK=64 if interpreting() else 2048, ACC=acc_dtype(acc),
        num_warps=8,
    )
    return scale, status[:2], status[2:]
