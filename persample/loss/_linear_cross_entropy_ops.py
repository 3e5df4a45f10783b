r"""Chunked linear cross-entropy: ``cross_entropy(hidden @ weight.T + bias, target)`` and its gradients
without ever holding the ``N x V`` logits.

Arguments arrive checked and flattened from :mod:`persample.loss._linear_cross_entropy`: ``hidden (N, d)``,
``weight (V, d)``, ``bias (V,)`` or None, ``target (N,)``. The tokens are processed ``chunk`` rows at a time;
one ``chunk x V`` buffer is reused for every chunk and holds, in turn, the chunk's logits and (overwritten in
place by the fused kernel of :mod:`persample.kernels.cross_entropy`) their gradient ``G``. From ``G``:

    grad_hidden[chunk] = G @ weight        grad_weight += G.T @ hidden[chunk]        grad_bias += G.sum(0)

``grad_weight`` accumulates in the weight's dtype (a float32 accumulator of ``V x d`` would cost more memory
than the logits we avoid); each chunk adds into it with one ``addmm``, which accumulates in float32 inside
cuBLAS, so there is one rounding per chunk.

Two schedules, both in :class:`_LinearCrossEntropy`:

* ``reduction="mean"``/``"sum"`` with gradients needed: the forward computes the gradients too (the kernel
  writes ``G`` already scaled by the reduction's scale pair, device scalars, so no host sync: the mean's
  1/sum of weights for the cross-entropy and 1/count for the z-loss), and the backward scales them in place by
  the upstream scalar (free when it is 1). Matmuls: 3 passes, as for the unfused layer.
* ``reduction="none"`` (an upstream gradient per token), or a second backward through a retained graph: the
  forward keeps only the per-row log-sum-exp; the backward recomputes each chunk's logits and writes
  ``grad_rows * G`` from the saved log-sum-exp. Matmuls: 4 passes.

For ``"mean"``/``"sum"`` the loss is the sum of the rows' shares (each row's terms scaled by the pair), so the
cross-entropy and z-loss terms are never separated by a subtraction.

:func:`head_grad_norms` gives each example's gradient norm of the head for DP clipping by the "ghost norm"
identity, for an example with token rows ``A (T, d)`` and logit gradients ``G (T, V)``:

    || G.T @ A ||_F^2 = < A @ A.T, G @ G.T >        || G.sum(0) ||^2 = sum(G @ G.T)

so it needs the two ``T x T`` Gram matrices, never the ``V x d`` gradient. Cost per example:
``O(T * V * d)`` for the logits (as in the forward) plus ``O(T^2 * (V + d))`` for the Grams; memory: one
chunk of whole examples (at least one example, ``T x V``) and ``T x T`` Grams.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from persample.loss import _cross_entropy_ops as _ce

_BMM_HAS_OUT_DTYPE = torch.torch_version.TorchVersion(torch.__version__) >= "2.8"


def default_chunk_size(N: int) -> int:
    """Rows per chunk: about 1/24 of the tokens, so the chunk's logits take about 4% of the full ``N x V``
    logits, rounded up to a multiple of 64 rows and at least 256 rows (or all of them) so that the matmuls
    stay large enough to run at full speed."""
    rows = -(-N // 24)
    return max(1, min(N, max(256, -(-rows // 64) * 64)))


class Needs(NamedTuple):
    """Which gradients to compute: w.r.t. hidden, weight, bias."""

    hidden: bool
    weight: bool
    bias: bool


class _Grads:
    """Gradient buffers filled chunk by chunk. The bias gradient accumulates in float32 (float64 for float64)
    since it is only ``V`` long; the others are written in their tensors' dtypes."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: Needs):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        self.hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if needs.hidden else None
        # The first chunk writes grad_weight with a plain mm; zeros are only needed when there is no chunk.
        self.weight = (torch.zeros_like(weight) if hidden.shape[0] == 0 else torch.empty_like(
            weight, memory_format=torch.contiguous_format)) if needs.weight else None
        self.bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if needs.bias else None

    def add(self, g: Tensor, hidden_chunk: Tensor, weight: Tensor, start: int, first: bool) -> None:
        """Adds the contribution of one chunk's logit gradient ``g (rows, V)``."""
        if self.hidden is not None:
            torch.mm(g, weight, out=self.hidden[start:start + g.shape[0]])
        if self.weight is not None:
            if first:
                torch.mm(g.t(), hidden_chunk, out=self.weight)
            else:
                self.weight.addmm_(g.t(), hidden_chunk)
        if self.bias is not None:
            self.bias += g.sum(0, dtype=self.bias.dtype)

    def scale_(self, scale: Tensor) -> None:
        """Multiplies every buffer in place by a one-element device tensor (free when it is exactly 1)."""
        for buf in (self.hidden, self.weight, self.bias):
            if buf is not None:
                _ce.scale_impl(buf, scale)

    def outputs(self, bias: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        grad_bias = self.bias.to(bias.dtype) if self.bias is not None else None
        return self.hidden, self.weight, grad_bias


def _chunk_logits(hidden_chunk: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    if bias is None:
        return torch.mm(hidden_chunk, weight.t(), out=out)
    return torch.addmm(bias, hidden_chunk, weight.t(), out=out)


def _chunks(N: int, chunk: int):
    for start in range(0, N, chunk):
        yield start, min(start + chunk, N)


def forward_chunks(hidden, weight, bias, target, class_weight, class_weight_sum, options, chunk: int,
                   scale: Tensor | None, needs: Needs, with_grad: bool) -> tuple[Tensor, Tensor, _Grads | None]:
    """Per-row loss (N,) and log-sum-exp (N,), in float32 (float64 for float64); with ``scale`` (a pair (1, 2),
    see kernels/cross_entropy.py) each row's share of the reduction instead of its loss, and ``with_grad`` the
    gradients of the shares' sum."""
    N, V = hidden.shape[0], weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    loss = torch.empty(N, dtype=acc, device=hidden.device)
    lse = torch.empty(N, dtype=acc, device=hidden.device)
    grads = _Grads(hidden, weight, bias, needs) if with_grad else None
    buffer = hidden.new_empty(min(chunk, N), V)
    for start, end in _chunks(N, chunk):
        logits = _chunk_logits(hidden[start:end], weight, bias, buffer[:end - start])
        loss[start:end], lse[start:end], g = _ce.forward_impl(
            logits, target[start:end], class_weight, class_weight_sum, scale, *options,
            with_grad=grads is not None, out=logits, share=scale is not None)
        if grads is not None:
            grads.add(g, hidden[start:end], weight, start, first=start == 0)
    return loss, lse, grads


def backward_chunks(hidden, weight, bias, target, class_weight, class_weight_sum, options, chunk: int,
                    lse: Tensor, grad_rows: Tensor, needs: Needs, scale: Tensor | None) -> _Grads:
    """Gradients of ``sum(grad_rows * loss)`` from the saved log-sum-exp, recomputing each chunk's logits; with
    ``scale`` (a pair (1, 2)) of ``sum(grad_rows * share)``."""
    N, V = hidden.shape[0], weight.shape[0]
    grads = _Grads(hidden, weight, bias, needs)
    buffer = hidden.new_empty(min(chunk, N), V)
    for start, end in _chunks(N, chunk):
        logits = _chunk_logits(hidden[start:end], weight, bias, buffer[:end - start])
        g = _ce.backward_impl(logits, target[start:end], class_weight, class_weight_sum, lse[start:end],
                               grad_rows[start:end], *options, out=logits, scale=scale)
        grads.add(g, hidden[start:end], weight, start, first=start == 0)
    return grads


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss rows (``"none"``) or the sum of their shares (``"mean"`` and ``"sum"``, for the scale pair)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, class_weight, class_weight_sum, scale, reduction, chunk,
                needs, options):
        reduce = reduction != "none"
        loss, lse, grads = forward_chunks(hidden, weight, bias, target, class_weight, class_weight_sum, options,
                                          chunk, scale if reduce else None, needs, reduce and any(needs))
        ctx.save_for_backward(hidden, weight, bias, target, class_weight, class_weight_sum, scale, lse)
        ctx.reduction, ctx.chunk, ctx.needs, ctx.options = reduction, chunk, needs, options
        ctx.grads = grads  # handed out by the first backward, then dropped
        if reduction == "none":
            return loss.to(hidden.dtype)
        return loss.sum().to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, bias, target, class_weight, class_weight_sum, scale, lse = ctx.saved_tensors
        if ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None
            grads.scale_(grad_output.reshape(1))
        else:
            # reduction="none", or a second backward (retain_graph=True) after the precomputed gradients
            # went out: recompute from the inputs.
            none = ctx.reduction == "none"
            grad_rows = grad_output.to(lse.dtype).expand(lse.shape)
            grads = backward_chunks(hidden, weight, bias, target, class_weight, class_weight_sum, ctx.options,
                                    ctx.chunk, lse, grad_rows.contiguous(), ctx.needs, None if none else scale)
        return *grads.outputs(bias), *([None] * 8)


def linear_cross_entropy(hidden, weight, bias, target, class_weight, class_weight_sum, scale, reduction, chunk,
                         needs, options) -> Tensor:
    return _LinearCrossEntropy.apply(hidden, weight, bias, target, class_weight, class_weight_sum, scale,
                                     reduction, chunk, needs, options)


def _gram(x: Tensor) -> Tensor:
    """``x @ x.T`` per batch entry, ``(k, T, m) -> (k, T, T)``, in float32 (float64 for float64): the ghost norm
    subtracts sums of these entries, so half-precision rounding of them would be amplified."""
    if x.dtype in (torch.float16, torch.bfloat16):
        if x.is_cuda and _BMM_HAS_OUT_DTYPE:
            return torch.bmm(x, x.transpose(1, 2), out_dtype=torch.float32)
        x = x.float()
    return torch.bmm(x, x.transpose(1, 2))


def head_grad_norms(hidden, weight, bias, target, class_weight, class_weight_sum, options,
                    chunk: int, scale: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """For ``hidden (B, T, d)``, ``target (B, T)`` and each example's scale pair ``scale (B, 2)`` (see
    kernels/cross_entropy.py): each example's loss, the sum of its rows' shares (B,), and the norms (B,) of its
    gradient w.r.t. ``weight`` and ``bias`` (None without a bias)."""
    B, T, d = hidden.shape
    V = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    loss = torch.empty(B, dtype=acc, device=hidden.device)
    weight_sq = torch.empty(B, dtype=acc, device=hidden.device)
    bias_sq = torch.empty(B, dtype=acc, device=hidden.device)
    per_chunk = max(1, chunk // max(T, 1))
    buffer = hidden.new_empty(min(per_chunk, B) * T, V)
    for start, end in _chunks(B, per_chunk):
        k = end - start
        rows = hidden[start:end].reshape(k * T, d)
        logits = _chunk_logits(rows, weight, bias, buffer[:k * T])
        row_scale = scale[start:end, None, :].expand(k, T, 2).reshape(k * T, 2)
        loss_rows, _, g = _ce.forward_impl(logits, target[start:end].reshape(-1), class_weight,
                                            class_weight_sum, row_scale, *options, with_grad=True, out=logits,
                                            share=True)
        gg = _gram(g.view(k, T, V))
        loss[start:end] = loss_rows.view(k, T).sum(1)
        weight_sq[start:end] = (gg * _gram(rows.view(k, T, d))).sum((1, 2))
        bias_sq[start:end] = gg.sum((1, 2))
    # Rounding can leave a tiny negative square where the true norm is 0.
    weight_norm = weight_sq.clamp_min(0).sqrt()
    bias_norm = bias_sq.clamp_min(0).sqrt() if bias is not None else None
    return loss, weight_norm, bias_norm
