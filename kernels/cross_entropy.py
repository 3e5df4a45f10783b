r"""Fused cross-entropy over the last dimension: loss and d loss / d logits in one pass.

Math, for one row ``x`` of ``V`` logits with target class ``t``:

    s_j   = c * tanh(x_j / c)                  (softcap ``c``; s = x without it)
    lse   = log sum_j exp(s_j)
    p_j   = exp(s_j - lse)
    CE    = (1 - eps) * w_t * (lse - s_t)                       (weighted NLL)
          + (eps / V) * (W * lse - sum_j w_j s_j)               (label smoothing)
    Z     = z * lse^2                                           (z-loss)
    loss  = CE + Z

with class weights ``w`` (all ones without them), ``W = sum_j w_j`` and label smoothing ``eps``.
``CE`` is ``F.cross_entropy``'s per-row term. A reduction weighs the two terms apart, with a scale pair
``(a, b)`` per row: it sums ``a * CE + b * Z`` over the rows. The mean has ``a = 1 / sum_i w_{t_i}`` (the
weighted mean of ``F.cross_entropy``) and ``b = 1 / #counted rows`` (the z-loss's mean does not depend on the
weights' scale); the sum has ``a = b = 1``. The gradient of ``a * CE + b * Z`` with respect to ``s`` is

    p_j * (a * ((1 - eps) * w_t + (eps / V) * W) + b * 2 * z * lse)
    - a * (eps / V) * w_j - a * (1 - eps) * w_t * [j == t]

and the softcap chains in ``ds_j/dx_j = 1 - (s_j / c)^2``. A scale is given as one tensor of shape
``(1,)`` or ``(N,)`` (``a = b``: one for all rows, or one per row) or ``(1, 2)`` or ``(N, 2)`` (``a`` and
``b`` apart), read through its strides. A row whose target equals ``ignore_index``
is not counted: its loss and gradient are exactly 0 and its logits are never used, so -inf or NaN there
cannot leak out. A target outside ``[0, V)`` that is not ``ignore_index`` yields NaN loss and gradient
for its row and no memory outside the row is touched (eager callers then raise, from the check in
``target_stats.py``; inside traced code the NaN row is what remains).

Kernels:
  * ``_cross_entropy_fwd_kernel`` — one program per row (or a persistent grid looping over rows): the max
    and sum of exp over the row (online across blocks when the row is longer than one block), the loss
    (with ``SHARE`` its share ``a * CE + b * Z`` of a reduction), the log-sum-exp and, with ``WITH_GRAD``,
    the gradient of that scaled loss (one scale pair for all rows, or with ``ROW_SCALE`` one per row): from
    registers when the row fits one block, else from a second sweep that mostly hits L2. With ``REDUCE``
    the last program to finish also writes the sum of the rows' shares (the mean or sum reduction, without
    another launch). The scale comes from a tensor, is 1, or (``SCALE_MEAN``, on a persistent grid) is the
    mean's pair, from the kernel's own pass over the targets;
    with ``CHECK`` program 0 starts with that pass and writes the range check's verdict, so no other
    kernel runs before this one (:func:`cross_entropy_fused`).
  * ``_cross_entropy_bwd_kernel`` — the gradient alone from a saved log-sum-exp, scaled per row by an
    upstream gradient (times a scale pair with ``HAS_SCALE``): elementwise, one program per chunk of a row.
  * ``_scale_kernel`` — multiply a buffer in place by a device scalar, doing nothing when it is 1.
"""

import torch
import triton
import triton.language as tl

from .launch import Launcher, Plans, acc_dtype, aligned, cdiv, interpreting, launch, next_power_of_2, sm_count
from .target_stats import mean_scale, scan_block, scan_targets, store_verdict, target_stats

# Where the forward kernel's scale pair (of the gradient and of the loss's share) comes from: a tensor, the
# constant 1, or the kernel's own pass over the targets (the mean's 1 / sum of the counted weights for the
# cross-entropy and 1 / their count for the z-loss).
SCALE_LOADED, SCALE_ONE, SCALE_MEAN = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _softcap(x, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        # tanh(y) = 1 - 2 / (exp(2y) + 1): saturates cleanly to +-1 for large |y|.
        y = x / softcap
        x = softcap * (1.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))
    return x


@triton.jit
def _gradient_block(
    s, offs, in_row, weight_ptr, t, w_t, weight_sum, lse, V, label_smoothing, z_loss, softcap, scale, z_scale,
    HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ACC: tl.constexpr,
):
    """d(scale * CE + z_scale * Z)/dx over one block of a counted row, from its capped logits ``s`` (the
    formula in the module docstring)."""
    eps_over_v = label_smoothing / V * scale
    on_target = (1.0 - label_smoothing) * w_t * scale
    coef = on_target + eps_over_v * weight_sum + 2.0 * z_loss * lse * z_scale
    g = tl.exp(s - lse) * coef
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + offs, mask=in_row, other=0.0).to(ACC)
        g -= eps_over_v * w
    else:
        g -= eps_over_v
    g = tl.where(offs == t, g - on_target, g)
    if HAS_SOFTCAP:
        th = s / softcap
        g *= 1.0 - th * th
    return g


@triton.jit
def _row_gradient_sweep(
    x_row_ptr, g_row_ptr, weight_ptr, V, t, w_t, weight_sum, lse, scale, z_scale,
    label_smoothing, softcap, z_loss,
    HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    """Writes d(scale * CE + z_scale * Z)/dx for one counted row, reading its logits once more.

    The first sweep went left to right, so the row's last blocks are the likeliest to be still in L2: this
    sweep goes right to left, and marks what it reads and writes as first to evict, since neither is read
    again in this kernel."""
    blocks = tl.cdiv(V, BLOCK_V)
    for i in range(0, blocks):
        offs = (blocks - 1 - i) * BLOCK_V + tl.arange(0, BLOCK_V)
        in_row = offs < V
        x = tl.load(x_row_ptr + offs, mask=in_row, other=0.0, eviction_policy="evict_first").to(ACC)
        s = _softcap(x, softcap, HAS_SOFTCAP)
        g = _gradient_block(s, offs, in_row, weight_ptr, t, w_t, weight_sum, lse, V, label_smoothing, z_loss,
                            softcap, scale, z_scale, HAS_WEIGHT, HAS_SOFTCAP, ACC)
        tl.store(g_row_ptr + offs, g.to(g_row_ptr.dtype.element_ty), mask=in_row, eviction_policy="evict_first")


@triton.jit
def _fill_row(g_row_ptr, V, value, BLOCK_V: tl.constexpr):
    """Writes ``value`` over a row that is not counted (0) or has an invalid target (NaN)."""
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        fill = tl.full([BLOCK_V], 0.0, tl.float32) + value
        tl.store(g_row_ptr + offs, fill.to(g_row_ptr.dtype.element_ty), mask=offs < V)


@triton.jit
def _row_target(target_ptr, weight_ptr, row, V, ignore_index, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """Loads a row's target; returns (target, counted, invalid, w_t). Never reads weight out of range."""
    t = tl.load(target_ptr + row)
    ignored = t == ignore_index
    invalid = (~ignored) & ((t < 0) | (t >= V))
    counted = (~ignored) & (~invalid)
    t_safe = tl.where(counted, t, 0)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + t_safe).to(ACC)
    else:
        w_t = tl.full([], 1.0, ACC)
    return t_safe, counted, invalid, w_t


@triton.jit
def _capped(x, in_row, softcap, HAS_SOFTCAP: tl.constexpr, ACC: tl.constexpr):
    """The softcap over a loaded block whose padding lanes hold -inf; they stay -inf."""
    s = _softcap(x.to(ACC), softcap, HAS_SOFTCAP)
    if HAS_SOFTCAP:  # the padding's -inf became -softcap
        s = tl.where(in_row, s, float("-inf"))
    return s


@triton.jit
def _capped_block(x_row_ptr, offs, in_row, softcap, HAS_SOFTCAP: tl.constexpr, ACC: tl.constexpr,
                  KEEP: tl.constexpr):
    """Loads one block of a row and applies the softcap; padding lanes are -inf. ``KEEP`` asks L2 to keep the
    block over other data (the row is about to be read again)."""
    if KEEP:
        x = tl.load(x_row_ptr + offs, mask=in_row, other=float("-inf"), eviction_policy="evict_last")
    else:
        x = tl.load(x_row_ptr + offs, mask=in_row, other=float("-inf"))
    return _capped(x, in_row, softcap, HAS_SOFTCAP, ACC)


@triton.jit
def _smoothing_block(s, offs, in_row, weight_ptr, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """sum_j w_j s_j over one block (w = 1 without weights)."""
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + offs, mask=in_row, other=0.0).to(ACC)
        return tl.sum(tl.where(in_row, s * w, 0.0), 0)
    return tl.sum(tl.where(in_row, s, 0.0), 0)


@triton.jit
def _cross_entropy_fwd_kernel(
    x_ptr, x_row_stride, target_ptr, weight_ptr, weight_sum_ptr, scale_ptr, scale_row_stride, scale_z_stride,
    loss_ptr, lse_ptr, g_ptr, g_row_stride, reduced_ptr, ticket_ptr, verdict_ptr,
    N, V, ignore_index, label_smoothing, softcap, z_loss,
    HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    WITH_GRAD: tl.constexpr, SINGLE_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
    PREFETCH: tl.constexpr, REDUCE: tl.constexpr, ROWS_BLOCK: tl.constexpr, SCALE: tl.constexpr,
    ROW_SCALE: tl.constexpr, SHARE: tl.constexpr, CHECK: tl.constexpr,
):
    # Persistent over rows: a grid sized to the machine keeps few rows in flight, so that the second
    # sweep over a row finds it in L2. With SINGLE_BLOCK (BLOCK_V >= V) the row is read once and stays
    # in registers for the gradient; with PREFETCH (SINGLE_BLOCK and a persistent grid) the load of the
    # program's next row is issued before the reductions of this one, so memory stays busy while a
    # program that holds a whole row (one per SM) reduces it. Prefetched ignored rows are never used.
    pid = tl.program_id(0).to(tl.int64)
    P = tl.num_programs(0)
    offs0 = tl.arange(0, BLOCK_V)
    if PREFETCH:
        x_next = tl.load(x_ptr + pid * x_row_stride + offs0, mask=offs0 < tl.where(pid < N, V, 0),
                         other=float("-inf"))
    # The targets' pass (target_stats.py), when no kernel ran it before this one: with SCALE_MEAN every
    # program sums the same weights in the same order (all get the same scale); program 0 writes the scale
    # pair and, first thing, the verdict of the range check, which a host may be polling for.
    if SCALE == SCALE_MEAN:
        counted_weight, count, first_bad = scan_targets(target_ptr, weight_ptr, N, V, ignore_index, HAS_WEIGHT,
                                                        True, ROWS_BLOCK, ACC)
        scale = mean_scale(counted_weight)
        z_scale = mean_scale(count)
        if pid == 0:
            if CHECK:
                store_verdict(verdict_ptr, first_bad, N)
            tl.store(scale_ptr, scale)
            tl.store(scale_ptr + scale_z_stride, z_scale)
    else:
        if CHECK:
            if pid == 0:
                _, _, first_bad = scan_targets(target_ptr, weight_ptr, N, V, ignore_index, HAS_WEIGHT, False,
                                               ROWS_BLOCK, ACC)
                store_verdict(verdict_ptr, first_bad, N)
        if SCALE == SCALE_LOADED:
            scale = tl.load(scale_ptr).to(ACC)
            z_scale = tl.load(scale_ptr + scale_z_stride).to(ACC)
        else:
            scale = tl.full([], 1.0, ACC)
            z_scale = tl.full([], 1.0, ACC)
    if HAS_WEIGHT:
        weight_sum = tl.load(weight_sum_ptr).to(ACC)
    else:
        weight_sum = V * 1.0
    eps_over_v = label_smoothing / V
    for first in range(0, N, P):
        row = first + pid
        if PREFETCH:
            x_raw = x_next
            nrow = row + P
            x_next = tl.load(x_ptr + nrow * x_row_stride + offs0, mask=offs0 < tl.where(nrow < N, V, 0),
                             other=float("-inf"))
        if row < N:
            x_row_ptr = x_ptr + row * x_row_stride
            g_row_ptr = g_ptr + row * g_row_stride
            t, counted, invalid, w_t = _row_target(target_ptr, weight_ptr, row, V, ignore_index, HAS_WEIGHT, ACC)
            if counted:
                # Sweep 1: max and sum of exp over the row (online across blocks), and sum_j w_j s_j.
                ws = tl.full([], 0.0, ACC)
                if SINGLE_BLOCK:
                    offs = offs0
                    in_row = offs < V
                    if PREFETCH:
                        s = _capped(x_raw, in_row, softcap, HAS_SOFTCAP, ACC)
                    else:
                        s = _capped_block(x_row_ptr, offs, in_row, softcap, HAS_SOFTCAP, ACC, False)
                    m = tl.max(s, 0)
                    d = tl.sum(tl.exp(s - m), 0)
                    if HAS_SMOOTHING:
                        ws = _smoothing_block(s, offs, in_row, weight_ptr, HAS_WEIGHT, ACC)
                else:
                    m = tl.full([], float("-inf"), ACC)
                    d = tl.full([], 0.0, ACC)
                    for start in range(0, V, BLOCK_V):
                        offs = start + tl.arange(0, BLOCK_V)
                        in_row = offs < V
                        s = _capped_block(x_row_ptr, offs, in_row, softcap, HAS_SOFTCAP, ACC, WITH_GRAD)
                        m_new = tl.maximum(m, tl.max(s, 0))
                        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), 0)
                        m = m_new
                        if HAS_SMOOTHING:
                            ws += _smoothing_block(s, offs, in_row, weight_ptr, HAS_WEIGHT, ACC)
                lse = m + tl.log(d)

                s_t = _softcap(tl.load(x_row_ptr + t).to(ACC), softcap, HAS_SOFTCAP)
                ce = (1.0 - label_smoothing) * w_t * (lse - s_t)
                if HAS_SMOOTHING:
                    ce += eps_over_v * (weight_sum * lse - ws)
                row_scale = scale
                row_z_scale = z_scale
                if ROW_SCALE:
                    row_scale = tl.load(scale_ptr + row * scale_row_stride).to(ACC)
                    row_z_scale = tl.load(scale_ptr + row * scale_row_stride + scale_z_stride).to(ACC)
                if SHARE:
                    loss = row_scale * ce + row_z_scale * (z_loss * lse * lse)
                else:
                    loss = ce + z_loss * lse * lse
                tl.store(loss_ptr + row, loss)
                tl.store(lse_ptr + row, lse)

                if WITH_GRAD:
                    if SINGLE_BLOCK:
                        g = _gradient_block(s, offs, in_row, weight_ptr, t, w_t, weight_sum, lse, V,
                                            label_smoothing, z_loss, softcap, row_scale, row_z_scale, HAS_WEIGHT,
                                            HAS_SOFTCAP, ACC)
                        tl.store(g_row_ptr + offs, g.to(g_row_ptr.dtype.element_ty), mask=in_row,
                                 eviction_policy="evict_first")
                    else:
                        # Sweep 2: the row was just read, so this re-read mostly hits L2.
                        _row_gradient_sweep(
                            x_row_ptr, g_row_ptr, weight_ptr, V, t, w_t, weight_sum, lse, row_scale, row_z_scale,
                            label_smoothing, softcap, z_loss, HAS_WEIGHT, HAS_SOFTCAP, BLOCK_V, ACC,
                        )
            else:
                fill = tl.where(invalid, float("nan"), 0.0)
                tl.store(loss_ptr + row, fill)
                tl.store(lse_ptr + row, 0.0)
                if WITH_GRAD:
                    _fill_row(g_row_ptr, V, fill, BLOCK_V)

    if REDUCE:
        # The last program to finish writes the sum of the rows' shares (SHARE), summed in a fixed order
        # (reproducible, unlike float atomics). Its ticket is an acquire-release atomic, which makes every
        # other program's loss stores, made before their own tickets, visible to its loads. It then puts
        # the ticket back to 0, so that the next launch on the stream can use the same one.
        if tl.atomic_add(ticket_ptr, 1) == P - 1:
            total = tl.zeros([ROWS_BLOCK], ACC)
            for start in range(0, N, ROWS_BLOCK):
                offs = start + tl.arange(0, ROWS_BLOCK)
                total += tl.load(loss_ptr + offs, mask=offs < N, other=0.0).to(ACC)
            tl.store(reduced_ptr, tl.sum(total, 0).to(reduced_ptr.dtype.element_ty))
            tl.store(ticket_ptr, 0)


@triton.jit
def _cross_entropy_bwd_kernel(
    x_ptr, x_row_stride, target_ptr, weight_ptr, weight_sum_ptr, lse_ptr, grad_ptr, grad_stride,
    scale_ptr, scale_row_stride, scale_z_stride, g_ptr, g_row_stride,
    V, ignore_index, label_smoothing, softcap, z_loss,
    HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr, CHUNKS: tl.constexpr,
    CHUNK: tl.constexpr, ACC: tl.constexpr,
):
    # One program per chunk of a row: with the log-sum-exp known, the gradient is elementwise.
    pid = tl.program_id(0).to(tl.int64)
    row = pid // CHUNKS
    offs = (pid % CHUNKS) * CHUNK + tl.arange(0, CHUNK)
    in_row = offs < V
    g_row_ptr = g_ptr + row * g_row_stride
    t, counted, invalid, w_t = _row_target(target_ptr, weight_ptr, row, V, ignore_index, HAS_WEIGHT, ACC)
    if counted:
        if HAS_WEIGHT:
            weight_sum = tl.load(weight_sum_ptr).to(ACC)
        else:
            weight_sum = V * 1.0
        lse = tl.load(lse_ptr + row).to(ACC)
        scale = tl.load(grad_ptr + row * grad_stride).to(ACC)
        z_scale = scale
        if HAS_SCALE:
            scale *= tl.load(scale_ptr + row * scale_row_stride).to(ACC)
            z_scale *= tl.load(scale_ptr + row * scale_row_stride + scale_z_stride).to(ACC)
        x = tl.load(x_ptr + row * x_row_stride + offs, mask=in_row, other=0.0).to(ACC)
        s = _softcap(x, softcap, HAS_SOFTCAP)
        g = _gradient_block(s, offs, in_row, weight_ptr, t, w_t, weight_sum, lse, V, label_smoothing, z_loss,
                            softcap, scale, z_scale, HAS_WEIGHT, HAS_SOFTCAP, ACC)
        tl.store(g_row_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=in_row)
    else:
        fill = tl.full([CHUNK], 0.0, tl.float32) + tl.where(invalid, float("nan"), 0.0)
        tl.store(g_row_ptr + offs, fill.to(g_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _scale_kernel(x_ptr, scale_ptr, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
    # The scale is read on the device, so a scale of exactly 1 (the usual loss.backward()) costs no
    # pass over the buffer and no host synchronisation. A persistent grid (programs loop over blocks)
    # keeps that skip to one small wave of programs.
    scale = tl.load(scale_ptr).to(ACC)
    if scale != 1.0:
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, tl.num_programs(0) * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            in_range = offs < n
            x = tl.load(x_ptr + offs, mask=in_range).to(ACC)
            tl.store(x_ptr + offs, (x * scale).to(x_ptr.dtype.element_ty), mask=in_range)


def launch_config(V: int, element_size: int, with_grad: bool = True) -> tuple[int, int, int, bool]:
    """For the forward: (block over the vocabulary, warps per program, programs per multiprocessor with
    0 = one per row, prefetch of the next row).

    With the gradient, a row of up to 32768 half-precision (16384 fp32) logits is held in registers whole;
    longer rows are streamed in blocks, with 8192-element blocks of 16 warps up to V = 65536 half-precision
    logits and 16384-element blocks of 32 warps beyond. Without it (``reduction="none"``'s forward, evaluation)
    the row is only read: blocks of at most 16384 logits and 8 warps, one program per row, read at the copy
    bandwidth, faster than the configuration with the gradient (benchmarks/RESULTS.md, "Figures quoted from code").
    The interpreter gets small blocks so that tests at small V still cross block boundaries. Tuned on an H100
    with benchmarks/cross_entropy.py --sweep.
    """
    if interpreting():
        return min(next_power_of_2(V), 64), 1, 0, False
    block = next_power_of_2(V)
    if not with_grad:
        block = min(block, 16384)
        return block, 4 if block <= 2048 else 8, 0, False
    if block * element_size <= 65536:
        if block * element_size >= 32768:  # one program per SM, loading row i + 1 while it works on row i
            return block, 32, 1, True
        return block, 4 if block <= 2048 else 8, 0, False
    if element_size == 2 and V <= 65536:
        return 8192, 16, 0, False
    return 16384, 32, 0, False


def bwd_config(V: int, element_size: int) -> tuple[int, int]:
    """For the backward, which is elementwise once the log-sum-exp is known: (chunk of a row per program,
    warps per program)."""
    if interpreting():
        return min(next_power_of_2(V), 64), 1
    return min(next_power_of_2(V), 8192), 4


def _grid(N: int, device: torch.device, programs_per_sm: int) -> tuple[int]:
    if programs_per_sm == 0 or device.type != "cuda":
        return (N,)
    return (min(N, sm_count(device) * programs_per_sm),)



def scale_strides(scale: torch.Tensor | None, N: int) -> tuple[int, int]:
    """(stride between rows, offset of the z-loss's factor) of a scale of shape (1,), (N,), (1, 2) or (N, 2)
    (see the module docstring); (0, 0) for None. Raises ValueError for another shape."""
    if scale is None:
        return 0, 0
    shape = tuple(scale.shape)
    if shape in ((1,), (N,)):
        return (scale.stride(0) if shape[0] != 1 else 0), 0
    if shape in ((1, 2), (N, 2)):
        return (scale.stride(0) if shape[0] != 1 else 0), scale.stride(1)
    raise ValueError(f"a scale must have shape (1,), ({N},), (1, 2) or ({N}, 2), got {shape}")


def _fwd_args(logits, target, weight, weight_sum, scale, loss, lse, grad, reduced, ticket, verdict, options):
    """The forward kernel's arguments before its constexprs; ``weight``, ``weight_sum``, ``scale``, ``grad``,
    ``reduced``, ``ticket`` and ``verdict`` may be None (not asked for), another tensor standing in for them."""
    return (logits, logits.stride(0), target, weight if weight is not None else logits,
            weight_sum if weight_sum is not None else loss, scale if scale is not None else loss,
            *scale_strides(scale, logits.shape[0]),
            loss, lse, grad if grad is not None else loss, grad.stride(0) if grad is not None else 0,
            reduced if reduced is not None else loss, ticket if ticket is not None else target,
            verdict if verdict is not None else target, *logits.shape, *options)


def _launch_fwd(logits, target, weight, weight_sum, scale, loss, lse, grad, reduced, ticket, verdict, options,
                config, *, scale_mode, row_scale=False, share=False) -> Launcher:
    """Launches the forward kernel (arguments as for :func:`_fwd_args`); a reduction implies ``share``."""
    block, num_warps, grid, prefetch = config
    _, label_smoothing, softcap, _ = options
    return launch(
        _cross_entropy_fwd_kernel, grid,
        *_fwd_args(logits, target, weight, weight_sum, scale, loss, lse, grad, reduced, ticket, verdict, options),
        HAS_WEIGHT=weight is not None, HAS_SOFTCAP=softcap > 0, HAS_SMOOTHING=label_smoothing > 0,
        WITH_GRAD=grad is not None, SINGLE_BLOCK=block >= logits.shape[1], BLOCK_V=block,
        ACC=acc_dtype(logits.dtype), PREFETCH=prefetch, REDUCE=reduced is not None,
        ROWS_BLOCK=64 if block <= 64 else scan_block(), SCALE=scale_mode.value, ROW_SCALE=row_scale,
        SHARE=share or reduced is not None, CHECK=verdict is not None, num_warps=num_warps,
    )


def _config(logits: torch.Tensor, with_grad: bool) -> tuple[int, int, tuple[int], bool]:
    """(block, warps, grid, prefetch) of the forward kernel for these logits."""
    N, V = logits.shape
    block, num_warps, programs_per_sm, prefetch = launch_config(V, logits.element_size(), with_grad)
    grid = _grid(N, logits.device, programs_per_sm)
    return block, num_warps, grid, prefetch and block >= V and programs_per_sm > 0


def cross_entropy_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    weight_sum: torch.Tensor | None,
    scale: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    z_loss: float,
    with_grad: bool,
    out: torch.Tensor | None = None,
    reduce_ticket: torch.Tensor | None = None,
    loss_dtype: torch.dtype | None = None,
    share: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-row loss (or with ``share`` its share ``a * CE + b * Z``) and log-sum-exp, the gradient of the rows'
    scaled losses ``a * CE + b * Z`` w.r.t. the logits (``with_grad``) and the sum of the shares
    (``reduce_ticket``), for the scale pair ``(a, b)`` of the module docstring.

    logits: (N, V) with unit stride over V; target: (N,) int64; weight: (V,) or None; weight_sum: a one-element
    tensor; scale: of shape (1,), (N,), (1, 2) or (N, 2) (a pair per row only without ``reduce_ticket``), or
    None for 1 when neither the gradient nor the shares are asked for; softcap: 0 for none.
    ``out``: (N, V) buffer for the gradient with unit stride over V; it may be ``logits`` itself, since each
    program reads every element of its row before writing it.
    ``reduce_ticket``: a one-element int64 tensor holding 0 (see ``REDUCE``); the kernel leaves it at 0. It
    implies ``share``.
    ``loss_dtype``: of the per-row loss, float32 (float64 for float64 logits) by default.
    Returns loss (N,), lse (N,) in float32 (float64 for float64 logits), the gradient (N, V) in the logits'
    dtype or None, and the reduced loss (a 0-dim tensor in the logits' dtype) or None.
    """
    N, V = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    reduce = reduce_ticket is not None
    if reduce and loss_dtype not in (None, acc):
        raise ValueError("the reduced loss sums rows kept in the accumulation dtype")
    scale_strides(scale, N)
    row_scale = scale is not None and scale.shape[0] != 1
    if row_scale and reduce:
        raise ValueError(f"a reduction needs one scale for all rows, got shape {tuple(scale.shape)}")
    share = share or reduce
    config = _config(logits, with_grad)
    # The kernel reduces only on a persistent grid: with a program per row, every program's ticket would
    # wait for all of its gradient stores, which costs more than the PyTorch ops below.
    reduce_in_kernel = reduce and config[2][0] < N
    loss = torch.empty(N, dtype=loss_dtype or acc, device=logits.device)
    lse = torch.empty(N, dtype=acc, device=logits.device)
    grad = None
    if with_grad:
        grad = out if out is not None else torch.empty_like(logits, memory_format=torch.contiguous_format)
    if N == 0:
        reduced = torch.zeros((), dtype=logits.dtype, device=logits.device) if reduce else None
        return loss, lse, grad, reduced
    reduced = torch.empty((), dtype=logits.dtype, device=logits.device) if reduce_in_kernel else None
    _launch_fwd(logits, target, weight, weight_sum, scale, loss, lse, grad, reduced,
                reduce_ticket if reduce_in_kernel else None, None,
                (ignore_index, label_smoothing, softcap, z_loss), config,
                scale_mode=SCALE_LOADED if scale is not None else SCALE_ONE, row_scale=row_scale, share=share)
    if reduce and not reduce_in_kernel:
        reduced = loss.sum().to(logits.dtype)  # one launch (two in low precision)
    return loss, lse, grad, reduced


_tickets: dict[tuple, torch.Tensor] = {}
_plans = Plans()


def _ticket(device: torch.device) -> torch.Tensor:
    """A one-element int64 counter holding 0 for the in-kernel reduction: one per device and stream, reused
    by every launch on that stream (launches on one stream never overlap, and each leaves it at 0). A graph
    being captured gets a counter of its own, which its replays then use."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return torch.zeros(1, dtype=torch.int64, device=device)
    key = (device.index, torch._C._cuda_getCurrentRawStream(device.index))
    ticket = _tickets.get(key)
    if ticket is None:
        ticket = _tickets[key] = torch.zeros(1, dtype=torch.int64, device=device)
    return ticket


def cross_entropy_fused(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    weight_sum: torch.Tensor | None,
    options: tuple[int, float, float, float],
    reduction: str,
    verdict: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The eager losses of ``persample.cross_entropy``, with as few launches as the shape allows.

    ``reduction="none"``: one kernel writes each row's loss (in the logits' dtype) and log-sum-exp. ``"mean"``
    and ``"sum"``: one kernel also writes the gradient of the reduced loss and the reduced loss (in the logits'
    dtype); only a mean over a grid of one program per row needs the targets' scale pair first, from a small
    kernel before it, and its sum from a PyTorch op after it. Either way the range check's verdict
    goes to ``verdict`` (a one-element int64 tensor; see target_stats.py) from the first
    kernel that runs. ``options``: (ignore_index, label_smoothing, softcap, z_loss), softcap 0 for none.
    Returns (loss: (N,) rows or the reduced 0-dim tensor, lse (N,), gradient or None, scale pair (1, 2) of the
    mean or None for 1).

    The launch of a single kernel is kept under a key of these inputs (a plan: see launch.py's
    :class:`Launcher`), so that later calls with inputs alike skip choosing a configuration and binding
    arguments: this runs on every training step, where the host's time per call matters.
    """
    N, V = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    none = reduction == "none"
    loss = torch.empty(N, dtype=logits.dtype if none else acc, device=logits.device)
    lse = torch.empty(N, dtype=acc, device=logits.device)
    grad = None if none else torch.empty_like(logits, memory_format=torch.contiguous_format)
    if N == 0:
        verdict.fill_(1)
        return (loss if none else torch.zeros((), dtype=logits.dtype, device=logits.device)), lse, grad, None
    # Everything the launch specializes on follows from these (the outputs are fresh, hence aligned).
    key = (reduction, logits.dtype, N, V, logits.stride(0), target.dtype, weight.dtype if weight is not None
           else None, options, logits.get_device()) if aligned(logits, target, weight, weight_sum, verdict) else None
    plan = _plans.get(key)
    if plan is None:
        config = _config(logits, not none)
        persistent = config[2][0] < N
    else:
        launcher, grid, persistent = plan
    mean = reduction == "mean"
    scale = reduced = ticket = None
    if none:
        scale_mode = SCALE_ONE
    elif persistent:  # the kernel does it all
        scale = torch.empty(1, 2, dtype=acc, device=logits.device) if mean else None
        reduced = torch.empty((), dtype=logits.dtype, device=logits.device)
        ticket = _ticket(logits.device)
        scale_mode = SCALE_MEAN if mean else SCALE_ONE
    elif mean:  # one program per row: two kernels and a sum, which the shapes that get here hardly notice
        scale = target_stats(target, V, weight, options[0], True, acc, verdict)
        _launch_fwd(logits, target, weight, weight_sum, scale, loss, lse, grad, None, None, None, options,
                    config, scale_mode=SCALE_LOADED, share=True)
        return loss.sum().to(logits.dtype), lse, grad, scale
    else:
        scale_mode = SCALE_ONE
    if plan is None:
        _plans.keep(key, (_launch_fwd(logits, target, weight, weight_sum, scale, loss, lse, grad, reduced, ticket,
                                      verdict, options, config, scale_mode=scale_mode), config[2], persistent))
    else:
        launcher(grid, *_fwd_args(logits, target, weight, weight_sum, scale, loss, lse, grad, reduced, ticket,
                                  verdict, options))
    if none:
        return loss, lse, None, None
    if persistent:
        return reduced, lse, grad, scale
    return loss.sum().to(logits.dtype), lse, grad, None


def cross_entropy_bwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    weight_sum: torch.Tensor | None,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    z_loss: float,
    out: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gradient of ``sum_i grad_rows[i] * (a_i * CE_i + b_i * Z_i)`` w.r.t. the logits, (N, V) in the
    logits' dtype, from the saved ``lse`` (N,) and the upstream gradient ``grad_rows`` (N,) of any floating
    dtype and stride, for the scale pairs ``(a, b)`` of ``scale`` (as in :func:`cross_entropy_fwd`; None for
    1), written to ``out`` when given (which may be ``logits`` itself, as in :func:`cross_entropy_fwd`)."""
    N, V = logits.shape
    grad = out if out is not None else torch.empty_like(logits, memory_format=torch.contiguous_format)
    if N == 0:
        return grad
    strides = scale_strides(scale, N)
    args = (logits, logits.stride(0), target, weight if weight is not None else logits,
            weight_sum if weight_sum is not None else lse, lse, grad_rows, grad_rows.stride(0),
            scale if scale is not None else lse, *strides, grad, grad.stride(0),
            V, ignore_index, label_smoothing, softcap, z_loss)
    key = ("bwd", logits.dtype, N, V, logits.stride(0), target.dtype, weight.dtype if weight is not None else None,
           weight_sum.dtype if weight_sum is not None else None, lse.dtype, grad_rows.dtype, grad_rows.stride(0),
           scale.dtype if scale is not None else None, strides, grad.stride(0), ignore_index, softcap > 0,
           logits.get_device(),
           ) if aligned(logits, target, weight, weight_sum, lse, grad_rows, scale, grad) else None
    plan = _plans.get(key)
    if plan is not None:  # the backward of "none", once per training step: see cross_entropy_fused
        plan[0](plan[1], *args)
        return grad
    chunk, num_warps = bwd_config(V, logits.element_size())
    chunks = cdiv(V, chunk)
    grid = (N * chunks,)
    _plans.keep(key, (launch(
        _cross_entropy_bwd_kernel, grid, *args,
        HAS_WEIGHT=weight is not None, HAS_SOFTCAP=softcap > 0, HAS_SCALE=scale is not None, CHUNKS=chunks,
        CHUNK=chunk, ACC=acc_dtype(logits.dtype), num_warps=num_warps,
    ), grid))
    return grad


def scale_(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x *= scale`` in place for a contiguous ``x`` and a one-element ``scale``; free when scale == 1."""
    n = x.numel()
    if n == 0:
        return x
    key = ("scale", x.dtype, n, scale.dtype, x.get_device()) if aligned(x, scale) else None
    plan = _plans.get(key)
    if plan is not None:  # the backward of the eager mean and sum: see cross_entropy_fused
        plan[0](plan[1], x, scale, n)
        return x
    block = 1024 if interpreting() else 8192
    programs = cdiv(n, block)
    if x.is_cuda:
        programs = min(programs, 4 * sm_count(x.device))
    grid = (programs,)
    _plans.keep(key, (launch(_scale_kernel, grid, x, scale, n, BLOCK=block, ACC=acc_dtype(x.dtype), num_warps=8),
                      grid))
    return x
