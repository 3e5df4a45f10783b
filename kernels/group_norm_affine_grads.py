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
"""

import torch
import triton
import triton.language as tl

from .launch import acc_dtype, cdiv, interpreting, launch, row_pieces, row_tile

BLOCK = 1024  # elements of a program's tile
PROGRAMS_PER_SM = 8  # enough pieces of rows in flight to cover memory latency


@triton.jit
def _group_norm_affine_grads_kernel(x_ptr, g_ptr, mean_ptr, rstd_ptr, out_ptr, R, S, C, groups, per_group,
                                    per_program, pieces, ROWS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
                                    FINISH: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    piece = tl.program_id(1).to(tl.int64)
    first = piece * per_program
    # Sum g and g * x over this program's positions of its rows.
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
    d_shift = tl.sum(sum_g, 1)
    gx = tl.sum(sum_gx, 1)
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
    rows, block = row_tile(S, BLOCK)
    programs = cdiv(R, rows)
    pieces = pieces or row_pieces(programs, S, block, x.device, PROGRAMS_PER_SM)
    per_program = cdiv(cdiv(S, pieces), block) * block
    pieces = cdiv(S, per_program)
    out = torch.empty(pieces, 2, R, dtype=acc, device=x.device)
    launch(_group_norm_affine_grads_kernel, (programs, pieces), x, g, mean, rstd, out, R, S, C, groups, C // groups,
           per_program, pieces, ROWS=rows, BLOCK=block, ACC=acc_dtype(acc), FINISH=pieces == 1,
           num_warps=1 if interpreting() else 4)
    if pieces == 1:
        return out.view(2, B, C)
    gx, d_shift = out.sum(0).view(2, B, groups, C // groups).unbind(0)
    d_scale = (gx - mean.to(acc).unsqueeze(2) * d_shift) * rstd.to(acc).unsqueeze(2)
    return torch.stack((d_scale.reshape(B, C), d_shift.reshape(B, C)))
