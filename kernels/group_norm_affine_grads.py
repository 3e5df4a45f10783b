r"""Each example's gradients of a GroupNorm's per-channel scale and shift, in one kernel.

For inputs ``x`` and output gradients ``g``, both ``(B, C, S)`` (``S`` positions per channel), split into
``groups`` groups of ``C / groups`` channels, with ``mean`` and ``rstd = 1 / sqrt(var + eps)`` each example's
statistics of a group ``(B, groups)`` (those of the forward), and ``k`` the group of channel ``c``:

    d shift[b, c] = sum_s g[b, c, s]
    d scale[b, c] = rstd[b, k] * (sum_s g[b, c, s] x[b, c, s] - mean[b, k] * d shift[b, c])

(``x_hat = (x - mean) rstd`` expanded, so that ``x`` is read as it is.) With PyTorch ops that is a sum, a dot per
channel (:mod:`row_dot`) and three elementwise ops on the results: five launches per layer and step, and ``g``
read twice. Here a program sums a tile of channel rows (several short rows, or a piece of a long one) and, where
a row is one piece, finishes it with the statistics; rows split into pieces (long rows, few of them) leave their
partial sums for the caller to add and finish. Sums in float32 (float64 for float64 inputs).

:func:`group_norm_affine_grads_grouped` does the same for ``N`` layers of one shape in one launch, each layer's
``x``, ``g``, ``mean`` and ``rstd`` found through a table of addresses (one more grid axis).
"""

import math

import torch
import triton
import triton.language as tl

from .launch import acc_dtype, address_table, cdiv, interpreting, launch, row_pieces, row_tile, triton_dtype

BLOCK = 1024  # elements of a program's tile
PROGRAMS_PER_SM = 8  # enough pieces of rows in flight to cover memory latency


@triton.jit
def _tile_sums(x_ptr, g_ptr, rows, piece, R, S, per_program, ROWS: tl.constexpr, BLOCK: tl.constexpr,
               ACC: tl.constexpr):
    """``(sum g, sum g x)`` over one piece of positions of a tile of channel rows."""
    first = piece * per_program
    sum_g = tl.zeros([ROWS, BLOCK], dtype=ACC)
    sum_gx = tl.zeros([ROWS, BLOCK], dtype=ACC)
    for i in range(0, per_program, BLOCK):
        cols = first + i + tl.arange(0, BLOCK)
        inside = (rows[:, None] < R) & (cols[None, :] < S)
        at = rows[:, None] * S + cols[None, :]
        g = tl.load(g_ptr + at, mask=inside, other=0.0).to(ACC)
        x = tl.load(x_ptr + at, mask=inside, other=0.0).to(ACC)
        sum_g += g
        sum_gx += g * x
    return tl.sum(sum_g, 1), tl.sum(sum_gx, 1)


@triton.jit
def _store(out_ptr, mean_ptr, rstd_ptr, rows, piece, d_shift, gx, R, C, groups, per_group, ACC: tl.constexpr,
           FINISH: tl.constexpr):
    in_rows = rows < R
    if FINISH:
        # Row b * C + c takes the statistics of example b's group c // per_group; store out[0] = d scale, out[1] =
        # d shift.
        stat = (rows // C) * groups + (rows % C) // per_group
        mean = tl.load(mean_ptr + stat, mask=in_rows, other=0.0).to(ACC)
        rstd = tl.load(rstd_ptr + stat, mask=in_rows, other=0.0).to(ACC)
        tl.store(out_ptr + rows, (gx - mean * d_shift) * rstd, mask=in_rows)
        tl.store(out_ptr + R + rows, d_shift, mask=in_rows)
    else:
        # Partial sums of this piece: out[piece, 0] = sum g x, out[piece, 1] = sum g.
        tl.store(out_ptr + (piece * 2) * R + rows, gx, mask=in_rows)
        tl.store(out_ptr + (piece * 2 + 1) * R + rows, d_shift, mask=in_rows)


@triton.jit
def _group_norm_affine_grads_kernel(x_ptr, g_ptr, mean_ptr, rstd_ptr, out_ptr, R, S, C, groups, per_group,
                                    per_program, pieces, ROWS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
                                    FINISH: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    piece = tl.program_id(1).to(tl.int64)
    d_shift, gx = _tile_sums(x_ptr, g_ptr, rows, piece, R, S, per_program, ROWS, BLOCK, ACC)
    _store(out_ptr, mean_ptr, rstd_ptr, rows, piece, d_shift, gx, R, C, groups, per_group, ACC, FINISH)


@triton.jit
def _group_norm_affine_grads_grouped_kernel(table_ptr, out_ptr, R, S, C, groups, per_group, per_program, pieces,
                                            ROWS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
                                            FINISH: tl.constexpr, X: tl.constexpr, G: tl.constexpr,
                                            STAT: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    piece = tl.program_id(1).to(tl.int64)
    layer = tl.program_id(2).to(tl.int64)
    # Layer `layer`'s x, g, mean and rstd: the addresses at table[layer, 0:4].
    x_ptr = tl.load(table_ptr + 4 * layer).to(tl.pointer_type(X))
    g_ptr = tl.load(table_ptr + 4 * layer + 1).to(tl.pointer_type(G))
    mean_ptr = tl.load(table_ptr + 4 * layer + 2).to(tl.pointer_type(STAT))
    rstd_ptr = tl.load(table_ptr + 4 * layer + 3).to(tl.pointer_type(STAT))
    d_shift, gx = _tile_sums(x_ptr, g_ptr, rows, piece, R, S, per_program, ROWS, BLOCK, ACC)
    # Its results at out[layer] (finished) or out[piece, layer] (partial): piece p of layer l is piece p * N of a
    # layout that starts at layer l's block.
    layers = tl.num_programs(2)
    _store(out_ptr + layer * 2 * R, mean_ptr, rstd_ptr, rows, piece * layers, d_shift, gx, R, C, groups, per_group,
           ACC, FINISH)


def group_norm_affine_grads(x: torch.Tensor, g: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                            pieces: int | None = None) -> torch.Tensor:
    """``(2, B, C)``: each example's gradient of the scale (``[0]``) and of the shift (``[1]``), in float32
    (float64 for float64 inputs), for ``x`` and ``g`` of shape ``(B, C, S)``, contiguous, and the forward's
    ``mean`` and ``rstd`` of shape ``(B, groups)`` (``groups`` dividing ``C``).

    ``pieces``: programs per channel row (default: enough for the GPU; tests set it).
    """
    B, C, S = x.shape
    groups = mean.shape[1]
    acc = torch.float64 if torch.float64 in (x.dtype, g.dtype) else torch.float32
    R = B * C
    if R == 0 or S == 0:
        return torch.zeros(2, B, C, dtype=acc, device=x.device)
    x, g = x.contiguous(), g.contiguous()
    mean, rstd = mean.contiguous(), rstd.contiguous()
    rows, block, programs, pieces, per_program = _tiling(R, S, x.device, pieces)
    out = torch.empty(pieces, 2, R, dtype=acc, device=x.device)
    launch(_group_norm_affine_grads_kernel, (programs, pieces), x, g, mean, rstd, out, R, S, C, groups, C // groups,
           per_program, pieces, ROWS=rows, BLOCK=block, ACC=acc_dtype(acc), FINISH=pieces == 1,
           num_warps=1 if interpreting() else 4)
    if pieces == 1:
        return out.view(2, B, C)
    return _finish(out.sum(0), mean, rstd, acc)


def group_norm_affine_grads_grouped(xs: list[torch.Tensor], gs: list[torch.Tensor], means: list[torch.Tensor],
                                    rstds: list[torch.Tensor], pieces: int | None = None) -> torch.Tensor:
    """``(N, 2, B, C)``: :func:`group_norm_affine_grads` of ``N`` layers in one launch, ``out[i]`` that of
    ``xs[i]``, ``gs[i]``, ``means[i]`` and ``rstds[i]``. All ``xs`` have one shape ``(B, C, *spatial)`` (the
    positions ``S`` of a channel need not be flattened into one dimension: a contiguous tensor's rows are read by
    address) and dtype, and so do all ``gs``, all contiguous, and the statistics one shape ``(B, groups)`` and
    dtype, contiguous, all on one device."""
    x = xs[0]
    N, (B, C), groups = len(xs), x.shape[:2], means[0].shape[1]
    S = math.prod(x.shape[2:])
    acc = torch.float64 if torch.float64 in (x.dtype, gs[0].dtype) else torch.float32
    R = B * C
    if R == 0 or S == 0:
        return torch.zeros(N, 2, B, C, dtype=acc, device=x.device)
    table = address_table(zip(xs, gs, means, rstds, strict=True), x.device)
    rows, block, programs, pieces, per_program = _tiling(R, S, x.device, pieces, layers=N)
    out = torch.empty(pieces, N, 2, R, dtype=acc, device=x.device)
    launch(_group_norm_affine_grads_grouped_kernel, (programs, pieces, N), table, out, R, S, C, groups, C // groups,
           per_program, pieces, ROWS=rows, BLOCK=block, ACC=acc_dtype(acc), FINISH=pieces == 1,
           X=triton_dtype(x.dtype), G=triton_dtype(gs[0].dtype), STAT=triton_dtype(means[0].dtype),
           num_warps=1 if interpreting() else 4)
    if pieces == 1:
        return out.view(N, 2, B, C)
    return _finish(out.sum(0), torch.stack(means), torch.stack(rstds), acc)


def _tiling(R: int, S: int, device: torch.device, pieces: int | None, layers: int = 1
            ) -> tuple[int, int, int, int, int]:
    """``(rows, block, programs, pieces, per_program)``: the rows and columns of a program's tile, the programs over
    the rows of one layer, the pieces each row is split into and the positions of a piece."""
    rows, block = row_tile(S, BLOCK)
    programs = cdiv(R, rows)
    pieces = pieces or row_pieces(programs * layers, S, block, device, PROGRAMS_PER_SM)
    per_program = cdiv(cdiv(S, pieces), block) * block
    return rows, block, programs, cdiv(S, per_program), per_program


def _finish(sums: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``(..., 2, B, C)`` the scale's and shift's gradients from the pieces' summed ``(..., 2, B * C)`` partial sums
    (``sum g x`` and ``sum g``) and the statistics ``(..., B, groups)``."""
    *lead, _, R = sums.shape
    B, groups = mean.shape[-2:]
    C = R // B
    gx, d_shift = sums.view(*lead, 2, B, groups, C // groups).unbind(-4)
    d_scale = (gx - mean.to(acc).unsqueeze(-1) * d_shift) * rstd.to(acc).unsqueeze(-1)
    return torch.stack((d_scale.reshape(*lead, B, C), d_shift.reshape(*lead, B, C)), -3)
