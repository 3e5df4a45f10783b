r"""Dot products of matching rows, without the elementwise product as a tensor.

For ``x`` and ``y`` viewed as ``(R, K)`` (contiguous, same shape and dtype):

    out[r] = sum_k x[r, k] * y[r, k]

accumulated in float32 (float64 for float64 inputs). As PyTorch ops, ``(x * y).sum(1)`` writes the product
(as large as ``x``) and reads it back: two more passes over memory than the two reads needed, and a temporary
the size of an input. The engine forms such dots where a layer's gradient meets another factor, e.g.
GroupNorm's ``sum_s G[c, s] x[c, s]`` over each example's channels (``R = B C``, the size of the layer's input):
under a Wide-ResNet's first stage that temporary sat at the step's memory peak.

A program sums a tile of rows (several short rows, or a piece of a long one). Long rows are split into up to
``ceil(K / per_program)`` pieces, each summed by one program, so that short batches of long rows (``R = B``, ``K``
a layer's weight) still occupy the GPU; the pieces' partial sums are added by one ``sum`` in a fixed order, so the
result does not depend on scheduling.
"""

import torch
import triton
import triton.language as tl

from .launch import acc_dtype, cdiv, interpreting, launch, row_pieces, row_tile

BLOCK = 1024
PROGRAMS_PER_SM = 8  # enough pieces of rows in flight to cover memory latency


@triton.jit
def _row_dot_kernel(x_ptr, y_ptr, out_ptr, R, K, per_program, pieces, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                    ACC: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    piece = tl.program_id(1).to(tl.int64)
    first = piece * per_program
    acc = tl.zeros([ROWS, BLOCK], dtype=ACC)
    for i in range(0, per_program, BLOCK):
        cols = first + i + tl.arange(0, BLOCK)
        inside = (rows[:, None] < R) & (cols[None, :] < K)
        at = rows[:, None] * K + cols[None, :]
        a = tl.load(x_ptr + at, mask=inside, other=0.0).to(ACC)
        b = tl.load(y_ptr + at, mask=inside, other=0.0).to(ACC)
        acc += a * b
    tl.store(out_ptr + rows * pieces + piece, tl.sum(acc, 1), mask=rows < R)


def row_dots(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(R,)`` dot products of the rows of ``x`` and ``y``, both ``(R, ...)`` contiguous, of one shape and
    dtype: in float32 (float64 for float64 inputs), summed over all but the first dimension.

    Raises:
        ValueError: the shapes or dtypes differ, a tensor is not contiguous or not floating point.
    """
    if x.shape != y.shape or x.dtype != y.dtype:
        raise ValueError(f"row_dots needs two tensors of one shape and dtype, got {tuple(x.shape)} {x.dtype} and "
                         f"{tuple(y.shape)} {y.dtype}")
    if not (x.is_contiguous() and y.is_contiguous()):
        raise ValueError(f"row_dots needs contiguous tensors, got strides {x.stride()} and {y.stride()}")
    if not x.is_floating_point() or x.ndim == 0:
        raise ValueError(f"row_dots needs floating-point tensors with a row dimension, got {tuple(x.shape)} "
                         f"{x.dtype}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    R = x.shape[0]
    K = x.numel() // R if R else 0
    if R == 0 or K == 0:
        return torch.zeros(R, dtype=acc, device=x.device)
    rows, block = row_tile(K, BLOCK)
    programs = cdiv(R, rows)
    pieces = row_pieces(programs, K, block, x.device, PROGRAMS_PER_SM)
    per_program = cdiv(cdiv(K, pieces), block) * block
    pieces = cdiv(K, per_program)
    partial = torch.empty(R, pieces, dtype=acc, device=x.device)
    launch(_row_dot_kernel, (programs, pieces), x, y, partial, R, K, per_program, pieces, ROWS=rows, BLOCK=block,
           ACC=acc_dtype(x.dtype), num_warps=1 if interpreting() else 4)
    return partial.view(R) if pieces == 1 else partial.sum(1)
