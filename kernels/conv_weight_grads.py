r"""Each example's weight gradient of a 2-D convolution, as one GEMM per example whose patches are read in place.

For an input ``X (B, C_in, H, W)`` with zero padding ``p_h`` above and ``p_w`` left of it, an output gradient
``G (B, C_out, H_out, W_out)``, ``groups`` groups of ``C_in / groups`` input and ``C_out / groups`` output
channels, stride ``(s_h, s_w)`` and dilation ``(d_h, d_w)``:

    out[b, o, c, u, v] = sum_{i, j} G[b, o, i, j] * X[b, g(o) C_in/groups + c, i s_h + u d_h - p_h, j s_w + v d_w - p_w]

where ``X`` reads as zero outside its ``H x W`` (the padding is applied by the loads' masks: no padded copy of
the input is made, which in the engine had cost a fill and a copy of the input per layer and step), and ``g(o)``
is the group of output channel ``o``. Per example and group, ``M = C_out / groups`` rows (output
channels), ``N = C_in / groups * k_h * k_w`` columns (input channel and tap) and a reduction over the ``K = H_out
W_out`` output positions. PyTorch forms it by copying the patches out (``unfold``: ``k_h k_w / (s_h s_w)`` times
the input, written and read back) before a batched product; here a program loads a tile of positions for a tile
of (channel, tap) columns straight from ``X`` by their addresses (neighbouring positions of one column are
neighbouring addresses, so the loads stay coalesced, and each input element is read by the ``k_h k_w`` taps
from cache), and multiplies it with the matching tile of ``G``. Products accumulate in float32 (``tl.dot``); for
float32 inputs in TF32 when ``TF32`` is set (the precision of cuDNN's own float32 convolutions by default), else
in full float32.

One program per (example and group, tile of ``M``, tile of ``N``).
"""

import torch
import triton
import triton.language as tl

from .launch import cdiv, interpreting, launch


@triton.jit
def _conv_weight_grads_kernel(x_ptr, g_ptr, out_ptr, groups, M, N, K, W_out, KH, KW, C_in_g, H, W,
                              sxb, sxc, sxh, sxw, sgb, sgc, sgk, stride_h, stride_w, dil_h, dil_w, pad_h, pad_w,
                              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TF32: tl.constexpr,
                              UPCAST: tl.constexpr):
    bg = tl.program_id(0).to(tl.int64)
    b, grp = bg // groups, bg % groups
    rows = tl.program_id(1) * BM + tl.arange(0, BM)  # output channels within the group
    cols = tl.program_id(2) * BN + tl.arange(0, BN)  # (input channel, tap u, tap v) within the group
    c, u, v = cols // (KH * KW), (cols // KW) % KH, cols % KW
    x_cols = x_ptr + b * sxb + (grp * C_in_g + c).to(tl.int64) * sxc
    du, dv = u * dil_h - pad_h, v * dil_w - pad_w  # each column's offset from an output position's first tap
    g_rows = g_ptr + b * sgb + (grp * M + rows).to(tl.int64) * sgc
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)  # output positions (i, j)
        i, j = ks // W_out, ks % W_out
        g = tl.load(g_rows[:, None] + ks[None, :] * sgk, mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        # (BN, BK): the input row and column each column reads at each position; outside the input, the padding
        # reads as zero. Consecutive positions of a column are consecutive addresses (along the last dimension,
        # as Triton's loads vectorize), transposed for the product.
        r, q = du[:, None] + (i * stride_h)[None, :], dv[:, None] + (j * stride_w)[None, :]
        inside = (r >= 0) & (r < H) & (q >= 0) & (q < W)
        x = tl.load(x_cols[:, None] + r * sxh + q * sxw,
                    mask=(cols[:, None] < N) & (ks[None, :] < K) & inside, other=0.0)
        if UPCAST:  # the interpreter's tl.dot of 16-bit floats is wrong (Triton 3.9); float32 holds their products
            g, x = g.to(tl.float32), x.to(tl.float32)
        if TF32:
            acc = tl.dot(g, tl.trans(x), acc, input_precision="tf32")
        else:
            acc = tl.dot(g, tl.trans(x), acc, input_precision="ieee")
    out = out_ptr + (bg * M + rows[:, None]) * N + cols[None, :]
    tl.store(out, acc, mask=(rows[:, None] < M) & (cols[None, :] < N))


def conv2d_weight_grads(x: torch.Tensor, grad_output: torch.Tensor, kernel_size: tuple[int, int],
                        stride: tuple[int, int], dilation: tuple[int, int], groups: int,
                        tf32: bool = True, padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
                        ) -> torch.Tensor:
    """``(B, C_out, C_in / groups, k_h, k_w)`` float32: each example's weight gradient of a 2-D convolution, from
    its input ``x (B, C_in, H, W)`` and its output gradient ``grad_output (B, C_out, H_out, W_out)``, both float16,
    bfloat16 or float32 and of one dtype. ``padding``: the zeros ``((above, below), (left, right))`` of the input
    (read as zeros, not copied; another padding mode is the caller's to apply first). ``tf32``: float32 products
    in TF32.

    Raises:
        ValueError: other dtypes, mixed dtypes, or shapes that do not fit the convolution.
    """
    if x.dtype != grad_output.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"conv2d_weight_grads needs float16, bfloat16 or float32 inputs of one dtype, got {x.dtype} "
                         f"and {grad_output.dtype}")
    if x.ndim != 4 or grad_output.ndim != 4 or x.shape[0] != grad_output.shape[0]:
        raise ValueError(f"conv2d_weight_grads needs (B, C, H, W) tensors of one batch, got {tuple(x.shape)} and "
                         f"{tuple(grad_output.shape)}")
    B, C_in, H, W = x.shape
    C_out, H_out, W_out = grad_output.shape[1:]
    (KH, KW), (s_h, s_w), (d_h, d_w) = kernel_size, stride, dilation
    (above, below), (left, right) = padding
    if min(above, below, left, right) < 0:
        raise ValueError(f"conv2d_weight_grads needs padding of at least 0, got {padding}")
    H_p, W_p = H + above + below, W + left + right
    if C_in % groups or C_out % groups:
        raise ValueError(f"{groups} groups do not divide {C_in} input and {C_out} output channels")
    if (H_out - 1) * s_h + (KH - 1) * d_h >= H_p or (W_out - 1) * s_w + (KW - 1) * d_w >= W_p:
        raise ValueError(f"an output of {H_out}x{W_out} does not fit a padded input of {H_p}x{W_p} with kernel "
                         f"{KH}x{KW}, stride {s_h}x{s_w}, dilation {d_h}x{d_w}")
    M, C_in_g = C_out // groups, C_in // groups
    N, K = C_in_g * KH * KW, H_out * W_out
    out = torch.empty(B, C_out, C_in_g, KH, KW, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    G = grad_output.reshape(B, C_out, K)
    small = interpreting()
    BM = 16 if small or M <= 16 else 32 if M <= 32 else 64
    BN, BK = (16, 16) if small else (64, 32)
    launch(_conv_weight_grads_kernel, (B * groups, cdiv(M, BM), cdiv(N, BN)),
           x, G, out, groups, M, N, K, W_out, KH, KW, C_in_g, H, W, *x.stride(), *G.stride(), s_h, s_w, d_h, d_w,
           above, left,
           BM=BM, BN=BN, BK=BK, TF32=bool(tf32 and x.dtype == torch.float32),
           UPCAST=small and x.dtype != torch.float32, num_warps=1 if small else 4)
    return out
