r"""Each example's gradients of a LayerNorm's or RMSNorm's elementwise scale and shift, in one kernel.

For inputs ``x`` and output gradients ``g``, both ``(B, P, D)`` (``B`` examples, ``P`` positions each, rows of
``D`` normalized features), with ``x_hat`` the normalized row:

    LayerNorm:  x_hat = (x - mean(x)) / sqrt(var(x) + eps)      (biased variance, as nn.LayerNorm)
    RMSNorm:    x_hat = x / sqrt(mean(x^2) + eps)
    d scale_b = sum_p g[b, p] * x_hat[b, p]        d shift_b = sum_p g[b, p]

Written with PyTorch ops that is a cast, the normalization, a cast of ``g``, a product and two sums: six
launches per norm layer and step, where a step of small layers is bound by the host's launches. Here each
program recomputes the statistics of its rows in registers and accumulates both sums over a run of
positions of one example, in float32 (float64 for float64 inputs). A grid of ``B`` programs leaves most of
a large GPU idle when ``B`` is small, so the positions are split into ``C`` runs; the ``C`` partial sums are
added by one more op.

:func:`norm_affine_grads_grouped` does the same for ``N`` layers of one shape in one launch: their inputs and
output gradients are found through a table of ``N`` pairs of addresses (one more grid axis), so a model's
norm layers cost one launch, not one each (with the host's Python around each launch).
"""

import torch
import triton
import triton.language as tl

from .launch import acc_dtype, address_table, cdiv, interpreting, launch, next_power_of_2, sm_count, triton_dtype

MAX_FEATURES = 16384  # one row in registers; wider rows take the PyTorch path


@triton.jit
def _run_sums(x_ptr, g_ptr, P, D, rows_per_program, eps, x_stride_p, g_stride_p,
              CENTER: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """``(d_scale, d_shift)`` of one run of positions of one example, ``x_ptr`` and ``g_ptr`` at its first row."""
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < D
    d_scale = tl.zeros([BLOCK_D], ACC)
    d_shift = tl.zeros([BLOCK_D], ACC)
    start = tl.program_id(1) * rows_per_program
    stop = tl.minimum(start + rows_per_program, P)
    for p in range(start, stop):
        # Load one row of x and recompute its statistics (masked columns are 0 and stay out of the sums).
        x = tl.load(x_ptr + p * x_stride_p + cols, mask=in_row, other=0.0).to(ACC)
        if CENTER:
            x = tl.where(in_row, x - tl.sum(x, 0) / D, 0.0)
        x_hat = x / tl.sqrt(tl.sum(x * x, 0) / D + eps)
        # Accumulate the two per-example sums over this program's positions.
        g = tl.load(g_ptr + p * g_stride_p + cols, mask=in_row, other=0.0).to(ACC)
        d_scale += g * x_hat
        d_shift += g
    return d_scale, d_shift


@triton.jit
def _norm_affine_grads_kernel(
    x_ptr, g_ptr, out_ptr, B, P, D, rows_per_program, eps,
    x_stride_b, x_stride_p, g_stride_b, g_stride_p,
    CENTER: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    d_scale, d_shift = _run_sums(x_ptr + b * x_stride_b, g_ptr + b * g_stride_b, P, D, rows_per_program, eps,
                                 x_stride_p, g_stride_p, CENTER, BLOCK_D, ACC)
    # Store this run's partial sums at out[c, 0, b] and out[c, 1, b].
    cols = tl.arange(0, BLOCK_D)
    scale_at = out_ptr + ((c * 2) * B + b) * D + cols
    tl.store(scale_at, d_scale, mask=cols < D)
    tl.store(scale_at + B * D, d_shift, mask=cols < D)


@triton.jit
def _norm_affine_grads_grouped_kernel(
    table_ptr, out_ptr, B, P, D, N, rows_per_program, eps,
    x_stride_b, x_stride_p, g_stride_b, g_stride_p,
    CENTER: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, X: tl.constexpr, G: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    layer = tl.program_id(2)
    # Layer `layer`'s x and g: the addresses at table[layer, 0] and table[layer, 1].
    x_ptr = tl.load(table_ptr + 2 * layer).to(tl.pointer_type(X))
    g_ptr = tl.load(table_ptr + 2 * layer + 1).to(tl.pointer_type(G))
    d_scale, d_shift = _run_sums(x_ptr + b * x_stride_b, g_ptr + b * g_stride_b, P, D, rows_per_program, eps,
                                 x_stride_p, g_stride_p, CENTER, BLOCK_D, ACC)
    # Store this run's partial sums at out[c, layer, 0, b] and out[c, layer, 1, b].
    cols = tl.arange(0, BLOCK_D)
    scale_at = out_ptr + (((c * N + layer) * 2) * B + b) * D + cols
    tl.store(scale_at, d_scale, mask=cols < D)
    tl.store(scale_at + B * D, d_shift, mask=cols < D)


def _runs(programs: int, P: int, device: torch.device, runs: int | None) -> tuple[int, int]:
    """``(rows_per_program, runs)``: the positions of each run and how many runs per example (``runs`` if given),
    for ``programs`` (examples times layers): by default enough programs for two waves of the GPU's SMs."""
    if runs is None:
        runs = max(1, min(P, cdiv(2 * sm_count(device), programs))) if device.type == "cuda" else 1
    rows_per_program = cdiv(P, min(P, runs))
    return rows_per_program, cdiv(P, rows_per_program)


def _num_warps(D: int) -> int:
    return 1 if interpreting() else (4 if D <= 2048 else 8)


def norm_affine_grads(x: torch.Tensor, g: torch.Tensor, eps: float, center: bool,
                      runs: int | None = None) -> torch.Tensor:
    """``(2, B, D)``: each example's gradient of the scale (``[0]``) and of the shift (``[1]``), in float32
    (float64 for float64 inputs), for ``x`` and ``g`` of shape ``(B, P, D)`` with ``D <= MAX_FEATURES``.

    ``center``: LayerNorm (subtract the row mean) or RMSNorm. ``runs``: positions per example are split into
    this many programs (default: enough for the GPU; tests set it).
    """
    B, P, D = x.shape
    acc = torch.float64 if torch.float64 in (x.dtype, g.dtype) else torch.float32
    if B == 0 or P == 0 or D == 0:
        return torch.zeros(2, B, D, dtype=acc, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if g.stride(-1) != 1:
        g = g.contiguous()
    rows_per_program, runs = _runs(B, P, x.device, runs)
    out = torch.empty(runs, 2, B, D, dtype=acc, device=x.device)
    launch(
        _norm_affine_grads_kernel, (B, runs),
        x, g, out, B, P, D, rows_per_program, float(eps),
        x.stride(0), x.stride(1), g.stride(0), g.stride(1),
        CENTER=center, BLOCK_D=max(16, next_power_of_2(D)), ACC=acc_dtype(acc),
        num_warps=_num_warps(D),
    )
    return out[0] if runs == 1 else out.sum(0)


def norm_affine_grads_grouped(xs: list[torch.Tensor], gs: list[torch.Tensor], eps: float, center: bool,
                              runs: int | None = None) -> torch.Tensor:
    """``(N, 2, B, D)``: :func:`norm_affine_grads` of ``N`` layers in one launch, ``out[i]`` that of ``xs[i]`` and
    ``gs[i]``. All ``xs`` have one shape ``(B, P, D)``, dtype and strides, and so do all ``gs`` (their last
    dimension contiguous), on one device; ``D <= MAX_FEATURES``."""
    x, g = xs[0], gs[0]
    B, P, D = x.shape
    N = len(xs)
    acc = torch.float64 if torch.float64 in (x.dtype, g.dtype) else torch.float32
    if B == 0 or P == 0 or D == 0:
        return torch.zeros(N, 2, B, D, dtype=acc, device=x.device)
    table = address_table(zip(xs, gs, strict=True), x.device)
    rows_per_program, runs = _runs(B * N, P, x.device, runs)
    out = torch.empty(runs, N, 2, B, D, dtype=acc, device=x.device)
    launch(
        _norm_affine_grads_grouped_kernel, (B, runs, N),
        table, out, B, P, D, N, rows_per_program, float(eps),
        x.stride(0), x.stride(1), g.stride(0), g.stride(1),
        CENTER=center, BLOCK_D=max(16, next_power_of_2(D)), ACC=acc_dtype(acc), X=triton_dtype(x.dtype),
        G=triton_dtype(g.dtype), num_warps=_num_warps(D),
    )
    return out[0] if runs == 1 else out.sum(0)
