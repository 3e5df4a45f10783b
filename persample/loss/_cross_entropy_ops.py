"""Registration of the fused cross-entropy with PyTorch: custom ops, autograd, vmap, fake tensors.

Everything here works on rows: ``logits (N, V)``, ``target (N,)``; arguments arrive checked and
flattened from :mod:`persample.loss._cross_entropy`. Three ops:

* ``persample::cross_entropy_rows`` — per-row loss (or, given a scale pair per row, its share of a
  reduction; see ``kernels/cross_entropy.py``) and log-sum-exp, made differentiable by
  :class:`_CrossEntropyRows` (its backward is ``cross_entropy_rows_bwd``).
* ``persample::cross_entropy_rows_bwd`` — the gradient from a saved log-sum-exp.
* ``persample::cross_entropy_with_grad`` — loss, log-sum-exp and the scaled gradient in one kernel.

All three have vmap rules and fake-tensor implementations, so they batch under ``vmap`` and stay opaque
(no graph break) under ``torch.compile``. CUDA tensors (and CPU tensors when ``TRITON_INTERPRET=1``) run
the Triton kernels; other CPU tensors run :func:`_rows_torch` / :func:`_grad_torch`, the same formulas in
PyTorch, or in the plain case (no label smoothing, softcap or z-loss) :func:`plain_rows` / :func:`plain_grad`,
which make as few passes over the logits as ``F.cross_entropy`` (:class:`_PlainRows` in eager autograd).

Outside torch.func transforms and torch.compile, on the Triton path, ``reduction="mean"``/``"sum"`` take a
faster path, :class:`_FusedMeanSum`: the forward kernel already writes the gradient of the reduced loss and
the reduced loss, and the backward multiplies the gradient in place by the upstream
scalar, which the kernel skips when it is exactly 1. That needs in-place state, which transforms cannot
batch or trace, hence the two paths. ``reduction="none"`` has an eager path too, :class:`_FusedNone`, which
saves the casts and reshapes around the kernels. Both check the targets inside their first kernel
(``kernels.cross_entropy.cross_entropy_fused``).
"""

import contextlib
import math

import torch

from persample.backend import transforms_active, use_triton
from persample.kernels import cross_entropy as _kernels
from persample.kernels import target_stats as _target_stats

_LIB = "persample"


def _on_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it ``t``'s when it is another one (a model on cuda:1
    while cuda:0 is current)."""
    if t.is_cuda and t.get_device() != torch._C._cuda_getDevice():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def target_stats(target, V, weight, ignore_index, mean, acc, verdict):
    """The reduction's scale (1,) from one small kernel, which also writes the range check's verdict to
    ``verdict``; see :mod:`persample.kernels.target_stats`."""
    with _on_device_of(target):
        return _target_stats.target_stats(target, V, weight, ignore_index, mean, acc, verdict)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------
# The PyTorch path: the kernel's formulas (see kernels/cross_entropy.py), for CPU without the interpreter.
# ---------------------------------------------------------------------------------------------------


def _row_status(target, V, ignore_index):
    ignored = target == ignore_index
    invalid = ~ignored & ((target < 0) | (target >= V))
    counted = ~ignored & ~invalid
    return counted, invalid, torch.where(counted, target, 0)


def _capped(logits, counted, softcap):
    x = torch.where(counted[:, None], logits.to(_acc(logits.dtype)), 0.0)
    return softcap * torch.tanh(x / softcap) if softcap > 0 else x


def _factors(scale, n, dtype):
    """The scale pairs (a, b) of the kernels (see kernels/cross_entropy.py), each (n,) or a scalar, from a
    scale of shape (1,), (n,), (1, 2) or (n, 2)."""
    scale = scale.to(dtype)
    if scale.ndim == 2:
        return scale[:, 0], scale[:, 1]
    return scale, scale


def _rows_torch(logits, target, weight, weight_sum, scale, ignore_index, label_smoothing, softcap, z_loss):
    """(loss, lse) per row; with ``scale`` the loss is each row's share ``a * CE + b * Z``."""
    V = logits.shape[-1]
    counted, invalid, t = _row_status(target, V, ignore_index)
    s = _capped(logits, counted, softcap)
    lse = torch.logsumexp(s, dim=-1)
    s_t = s.gather(1, t[:, None])[:, 0]
    w_t = weight.to(s.dtype)[t] if weight is not None else 1.0
    loss = (1.0 - label_smoothing) * w_t * (lse - s_t)
    if label_smoothing > 0:
        if weight is not None:
            smooth = weight_sum.to(s.dtype) * lse - (s * weight.to(s.dtype)).sum(-1)
        else:
            smooth = V * lse - s.sum(-1)
        loss = loss + (label_smoothing / V) * smooth
    if scale is None:
        loss = loss + z_loss * lse * lse
    else:
        a, b = _factors(scale, logits.shape[0], s.dtype)
        loss = a * loss + b * (z_loss * lse * lse)
    loss = torch.where(counted, loss, torch.where(invalid, float("nan"), 0.0))
    return loss, torch.where(counted, lse, 0.0)


def _grad_torch(logits, target, weight, weight_sum, lse, a, b, ignore_index, label_smoothing, softcap, z_loss):
    """The gradient of ``a_i * CE_i + b_i * Z_i`` per row, ``a`` and ``b`` (N,)."""
    V = logits.shape[-1]
    counted, invalid, t = _row_status(target, V, ignore_index)
    s = _capped(logits, counted, softcap)
    acc = s.dtype
    a, b = a.to(acc), b.to(acc)
    w_t = weight.to(acc)[t] if weight is not None else torch.ones_like(lse, dtype=acc)
    W = weight_sum.to(acc) if weight is not None else float(V)
    on_target = (1.0 - label_smoothing) * w_t * a
    smooth = (label_smoothing / V) * a
    coef = on_target + smooth * W + 2.0 * z_loss * lse.to(acc) * b
    g = torch.exp(s - lse.to(acc)[:, None]) * coef[:, None]
    g = g - smooth[:, None] * (weight.to(acc) if weight is not None else 1.0)
    g = g.scatter_add(1, t[:, None], -on_target[:, None])
    if softcap > 0:
        g = g * (1.0 - (s / softcap) ** 2)
    g = torch.where(counted[:, None], g, torch.where(invalid[:, None], float("nan"), 0.0))
    return g.to(logits.dtype)


# The plain case (no label smoothing, softcap or z-loss, the common one) in as few passes over the (N, V) logits
# as F.cross_entropy: one log_softmax, whose output is the only (N, V) tensor the forward keeps, and for the
# gradient one exp and in-place updates; the rows that are not counted are zeroed afterwards, only they (an
# ignored row's logits may be NaN or inf, which must not reach its gradient).


def is_plain(label_smoothing, softcap, z_loss) -> bool:
    return label_smoothing == 0 and softcap == 0 and z_loss == 0


def plain_rows(logits, target, weight, ignore_index, keep_dtype=False):
    """``(loss (N,), lse (N,), log_probs (N, V), counted, invalid, t)``: each row's (weighted) loss, NaN for an
    invalid target, and its log-sum-exp, both 0 on a row not counted; both rows in float32 (float64), and
    ``log_probs`` too unless ``keep_dtype`` and the logits are bfloat16: then in bfloat16, as ``F.cross_entropy``
    keeps them (its log_softmax accumulates in float32 and rounds its output once), half the memory and bytes of
    float32. Not for float16, whose subnormals would cost a confident row's small loss most of its digits."""
    counted, invalid, t = _row_status(target, logits.shape[-1], ignore_index)
    keep_dtype = keep_dtype and logits.dtype == torch.bfloat16
    log_probs = torch.log_softmax(logits, -1, dtype=None if keep_dtype else _acc(logits.dtype))
    log_p = log_probs.gather(1, t[:, None])[:, 0].to(_acc(logits.dtype))
    # log p_t = x_t - lse: the lse without another pass over the rows, except those whose x_t is -inf.
    x_t = logits.gather(1, t[:, None])[:, 0].to(log_p.dtype)
    lse = _fill_uncounted(x_t - log_p, counted, None)
    lost = (counted & x_t.isneginf()).nonzero()[:, 0]
    if lost.numel():
        lse[lost] = torch.logsumexp(logits[lost].to(log_p.dtype), -1)
    loss = log_p.neg() if weight is None else log_p * weight.to(log_p.dtype)[t].neg()
    return _fill_uncounted(loss, counted, invalid), lse, log_probs, counted, invalid, t


def probs_from(log_probs, in_place=True):
    """``exp(log_probs)`` (written over ``log_probs`` if ``in_place``), with log-probabilities below
    ``log(tiny) + 1`` raised to it first: their exponentials (under ``3e-38`` in float32, ``3e-308`` in float64)
    would be subnormal, which the CPU's exp computes several times slower (a GPT's logits put a quarter of a row
    there), and the gradient they enter, ``p - onehot``, cannot tell them from that floor."""
    floor = math.log(torch.finfo(log_probs.dtype).tiny) + 1
    return (log_probs.clamp_min_(floor) if in_place else log_probs.clamp_min(floor)).exp_()


def plain_grad(probs, counted, invalid, t, weight, scale_rows, dtype):
    """``scale_rows * dL/dlogits`` in ``dtype`` from the softmax ``probs (N, V)`` (float32/float64), which it
    overwrites: ``coef * (probs - onehot(t))`` with ``coef = scale_rows * weight[t]`` on counted rows."""
    coef = scale_rows.to(probs.dtype)
    if weight is not None:
        coef = coef * weight.to(probs.dtype)[t]
    coef = coef.expand(t.shape)
    g = probs.mul_(coef[:, None])
    # One entry per row: a gather and an index_put, not scatter_add_ (which on the CPU copies a bfloat16 tensor
    # whole to accumulate in float32).
    rows = torch.arange(t.shape[0], device=t.device)
    g[rows, t] = g[rows, t] - coef.to(g.dtype)
    return _fill_uncounted(g, counted, invalid).to(dtype)


def _fill_uncounted(x, counted, invalid):
    """``x`` with the rows that are not counted set to 0 (NaN for an invalid target, unless ``invalid`` is None),
    in place; only those rows are touched."""
    uncounted = (~counted).nonzero()[:, 0]
    if uncounted.numel():
        x.index_fill_(0, uncounted, 0.0)
        bad = invalid.nonzero()[:, 0] if invalid is not None else uncounted[:0]
        if bad.numel():
            x.index_fill_(0, bad, float("nan"))
    return x


def forward_impl(logits, target, weight, weight_sum, scale, ignore_index, label_smoothing, softcap,
                  z_loss, with_grad, out=None, share=False):
    """(loss, lse, grad or None) for a ``scale`` of shape (1,), (N,), (1, 2) or (N, 2) (the pairs ``(a, b)`` of
    kernels/cross_entropy.py), or None for 1: the loss per row, or with ``share`` its share ``a * CE + b * Z``;
    grad is the gradient of the shares, written to ``out`` when given (which may be ``logits`` itself)."""
    if use_triton(logits):
        with _on_device_of(logits):
            return _kernels.cross_entropy_fwd(logits, target, weight, weight_sum, scale, ignore_index,
                                              label_smoothing, softcap, z_loss, with_grad, out, share=share)[:3]
    if is_plain(label_smoothing, softcap, z_loss):
        if with_grad and logits.dtype != _acc(logits.dtype):
            return _plain_with_grad_by_chunks(logits, target, weight, ignore_index, scale, share, out)
        loss, lse, log_probs, counted, invalid, t = plain_rows(logits, target, weight, ignore_index)
        a = lse.new_ones(()) if scale is None else _factors(scale, logits.shape[0], lse.dtype)[0]
        if share:
            loss = loss * a
        if not with_grad:
            return loss, lse, None
        grad = plain_grad(probs_from(log_probs), counted, invalid, t, weight, a, logits.dtype)
        return loss, lse, grad if out is None else out.copy_(grad)
    loss, lse = _rows_torch(logits, target, weight, weight_sum, scale if share else None, ignore_index,
                            label_smoothing, softcap, z_loss)
    if not with_grad:
        return loss, lse, None
    a, b = _factors(scale, logits.shape[0], lse.dtype)
    grad = _grad_torch(logits, target, weight, weight_sum, lse, a.expand(lse.shape), b.expand(lse.shape),
                       ignore_index, label_smoothing, softcap, z_loss)
    return loss, lse, grad if out is None else out.copy_(grad)


CHUNK_NUMEL = 1 << 20  # (rows x V) elements of float32 work per chunk of _plain_with_grad_by_chunks (4 MiB)


def _plain_with_grad_by_chunks(logits, target, weight, ignore_index, scale, share, out):
    """``forward_impl``'s plain case with the gradient for float16/bfloat16 logits: the float32 work (log-softmax,
    exp, the gradient before its one rounding) one chunk of rows at a time, each chunk's gradient rounded into the
    output, so that beyond the logits and the gradient the call holds one chunk of float32 (the whole float32
    rows would be twice the logits, and their rounding a third copy). Same values as the unchunked formulas.
    Not bfloat16 log-probabilities, as the autograd path keeps them to match F.cross_entropy: rounding ``log p``
    to 8 bits moves ``p`` by ``|log p| / 256`` relative, which the fused linear head and the engine, compared
    with float32 references, cannot afford."""
    N, V = logits.shape
    grad = out if out is not None else torch.empty_like(logits)
    a_all = None if scale is None else _factors(scale, N, _acc(logits.dtype))[0]
    losses, lses = [], []
    rows = max(1, CHUNK_NUMEL // max(V, 1))
    for start in range(0, N, rows):
        part = slice(start, min(start + rows, N))
        loss, lse, log_probs, counted, invalid, t = plain_rows(logits[part], target[part], weight, ignore_index)
        a = lse.new_ones(()) if a_all is None else (a_all if a_all.numel() == 1 else a_all[part])
        if share:
            loss = loss * a
        grad[part] = plain_grad(probs_from(log_probs), counted, invalid, t, weight, a, logits.dtype)
        losses.append(loss)
        lses.append(lse)
    if not losses:  # N = 0
        empty = logits.new_zeros(0, dtype=_acc(logits.dtype))
        return empty, empty.clone(), grad
    return torch.cat(losses), torch.cat(lses), grad


def backward_impl(logits, target, weight, weight_sum, lse, grad_rows, ignore_index, label_smoothing, softcap,
                   z_loss, out=None, scale=None):
    """The gradient of ``sum_i grad_rows[i] * (a_i * CE_i + b_i * Z_i)`` for the pairs of ``scale`` (None: 1)."""
    if use_triton(logits):  # the kernel reads grad_rows in its own dtype and strides
        with _on_device_of(logits):
            return _kernels.cross_entropy_bwd(logits, target, weight, weight_sum, lse, grad_rows, ignore_index,
                                              label_smoothing, softcap, z_loss, out, scale)
    a = b = grad_rows.to(lse.dtype)
    if scale is not None:
        scale_a, scale_b = _factors(scale, logits.shape[0], lse.dtype)
        a, b = a * scale_a, b * scale_b
    if is_plain(label_smoothing, softcap, z_loss):
        counted, invalid, t = _row_status(target, logits.shape[-1], ignore_index)
        probs = probs_from(logits.to(lse.dtype).sub(lse[:, None]))
        grad = plain_grad(probs, counted, invalid, t, weight, a, logits.dtype)
        return grad if out is None else out.copy_(grad)
    grad = _grad_torch(logits, target, weight, weight_sum, lse, a.expand(lse.shape), b.expand(lse.shape),
                       ignore_index, label_smoothing, softcap, z_loss)
    return grad if out is None else out.copy_(grad)


def scale_impl(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if use_triton(grad):
        with _on_device_of(grad):
            return _kernels.scale_(grad, scale)
    return grad.mul_(scale.to(grad.dtype))


# ---------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------


# ``scale`` of the row ops: None, or a pair per row (N, 2) (a row argument under vmap, like the targets), which
# makes the loss each row's share of a reduction (see kernels/cross_entropy.py).


@torch.library.custom_op(f"{_LIB}::cross_entropy_rows", mutates_args=())
def cross_entropy_rows(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, weight_sum: torch.Tensor | None,
    scale: torch.Tensor | None, ignore_index: int, label_smoothing: float, softcap: float, z_loss: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    loss, lse, _ = forward_impl(logits, target, weight, weight_sum, scale, ignore_index, label_smoothing,
                                 softcap, z_loss, False, share=scale is not None)
    return loss, lse


@torch.library.custom_op(f"{_LIB}::cross_entropy_rows_bwd", mutates_args=())
def cross_entropy_rows_bwd(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, weight_sum: torch.Tensor | None,
    scale: torch.Tensor | None, lse: torch.Tensor, grad_rows: torch.Tensor, ignore_index: int,
    label_smoothing: float, softcap: float, z_loss: float,
) -> torch.Tensor:
    return backward_impl(logits, target, weight, weight_sum, lse, grad_rows, ignore_index, label_smoothing,
                          softcap, z_loss, scale=scale)


@torch.library.custom_op(f"{_LIB}::cross_entropy_with_grad", mutates_args=())
def cross_entropy_with_grad(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, weight_sum: torch.Tensor | None,
    grad_scale: torch.Tensor, share: bool, ignore_index: int, label_smoothing: float, softcap: float,
    z_loss: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return forward_impl(logits, target, weight, weight_sum, grad_scale, ignore_index, label_smoothing,
                         softcap, z_loss, True, share=share)


@cross_entropy_rows.register_fake
def _(logits, target, weight, weight_sum, scale, ignore_index, label_smoothing, softcap, z_loss):
    rows = logits.new_empty(logits.shape[:1], dtype=_acc(logits.dtype))
    return rows, torch.empty_like(rows)


@cross_entropy_rows_bwd.register_fake
def _(logits, target, weight, weight_sum, scale, lse, grad_rows, ignore_index, label_smoothing, softcap, z_loss):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@cross_entropy_with_grad.register_fake
def _(logits, target, weight, weight_sum, grad_scale, share, ignore_index, label_smoothing, softcap, z_loss):
    rows = logits.new_empty(logits.shape[:1], dtype=_acc(logits.dtype))
    return rows, torch.empty_like(rows), torch.empty_like(logits, memory_format=torch.contiguous_format)


class _CrossEntropyRows(torch.autograd.Function):
    """Differentiable per-row loss. An ``autograd.Function`` (not ``register_autograd``) because only these
    compose with torch.func's grad/jacrev; batching falls through to the ops' vmap rules below. No ``jvp``:
    Dynamo refuses to trace Functions that define one, so forward mode (jacfwd, hessian) raises PyTorch's
    own NotImplementedError."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, weight, weight_sum, scale, ignore_index, label_smoothing, softcap, z_loss):
        args = (logits, target, weight, weight_sum, scale, ignore_index, label_smoothing, softcap, z_loss)
        if transforms_active():  # the op carries the vmap rule and stays opaque to torch.compile
            return cross_entropy_rows(*args)
        # Plain eager: skip the custom-op dispatcher, whose Python overhead is larger than a small kernel.
        loss, lse, _ = forward_impl(*args, False, share=scale is not None)
        return loss, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, weight_sum, scale, *options = inputs
        ctx.save_for_backward(logits, target, weight, weight_sum, scale, output[1])
        ctx.options = options
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zeros for the lse's gradient, which is never used

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        if grad_loss is None:
            return None, None, None, None, None, None, None, None, None
        logits, target, weight, weight_sum, scale, lse = ctx.saved_tensors
        args = (logits, target, weight, weight_sum, scale, lse, grad_loss, *ctx.options)
        if torch.compiler.is_compiling():
            # torch.compile traces the op itself (nested autograd.Functions in a backward trip Dynamo).
            grad = cross_entropy_rows_bwd(*args)
        elif transforms_active() or torch.is_grad_enabled():
            # Under torch.func, or a backward with create_graph=True: through a Function that batches
            # and refuses to be differentiated again.
            grad = _CrossEntropyRowsBwd.apply(*args)
        else:
            grad = backward_impl(*args[:4], lse, grad_loss, *ctx.options, scale=scale)
        return grad, None, None, None, None, None, None, None, None


class _CrossEntropyRowsBwd(torch.autograd.Function):
    """The backward as a function of its own, so that torch.func can batch it and so that a second
    derivative raises instead of silently treating the gradient as a constant."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, weight, weight_sum, scale, lse, grad_loss, *options):
        return cross_entropy_rows_bwd(logits, target, weight, weight_sum, scale, lse, grad_loss, *options)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("persample.cross_entropy does not support second derivatives "
                                  "(double backward, hessian, jacrev of grad)")


def with_grad(logits, target, weight, weight_sum, grad_scale, share, ignore_index, label_smoothing, softcap,
              z_loss):
    """(loss (N,), lse (N,), gradient (N, V)) for the scale ``grad_scale`` (see :func:`forward_impl`): the loss
    per row, or with ``share`` its share of a reduction, and the gradient of the shares; not differentiable.
    Plain eager calls skip the custom op's dispatcher (its Python overhead is a sizeable part of one call);
    transforms need the op."""
    if transforms_active():
        return cross_entropy_with_grad(logits, target, weight, weight_sum, grad_scale, share, ignore_index,
                                       label_smoothing, softcap, z_loss)
    return forward_impl(logits, target, weight, weight_sum, grad_scale, ignore_index, label_smoothing, softcap,
                        z_loss, True, share=share)


class _PlainRows(torch.autograd.Function):
    """The plain case on the PyTorch path in eager autograd: the forward keeps the log-probabilities (as
    F.cross_entropy's log_softmax does), not the logits, and the backward turns them into the gradient in place
    of a copy. The gradient is computed once: a second derivative raises, as on the other paths."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index):
        loss, _, log_probs, counted, invalid, t = plain_rows(logits, target, weight, ignore_index, keep_dtype=True)
        ctx.save_for_backward(log_probs, counted, invalid, t, weight)
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        log_probs, counted, invalid, t, weight = ctx.saved_tensors
        # Not in place: a second backward through the same graph (retain_graph=True) reads them again.
        grad = plain_grad(probs_from(log_probs, in_place=False), counted, invalid, t, weight, grad_loss, ctx.dtype)
        if torch.is_grad_enabled():  # create_graph=True: a gradient whose own derivative raises
            grad = _Refuses.apply(grad, torch.zeros((), device=grad.device, requires_grad=True))
        return grad, None, None, None


class _Refuses(torch.autograd.Function):
    """A copy of ``grad`` that requires grad through the scalar leaf ``anchor`` and whose derivative raises."""

    @staticmethod
    def forward(ctx, grad, anchor):
        return grad.clone()

    @staticmethod
    def backward(ctx, grad):
        return _CrossEntropyRowsBwd.backward(ctx, grad)


def plain_differentiable_rows(logits, target, weight, ignore_index):
    """Each row's loss (N,) (float32, float64 for float64 logits), differentiable w.r.t. ``logits``: the plain
    case (see :func:`is_plain`) on the PyTorch path, outside torch.func transforms and torch.compile."""
    return _PlainRows.apply(logits, target, weight, ignore_index)


def differentiable_rows(logits, target, weight, weight_sum, scale, ignore_index, label_smoothing, softcap, z_loss):
    """(loss (N,), lse (N,)), differentiable w.r.t. logits under autograd and torch.func; with ``scale``, a
    pair per row (N, 2), the loss is each row's share ``a * CE + b * Z`` of a reduction."""
    return _CrossEntropyRows.apply(logits, target, weight, weight_sum, scale, ignore_index, label_smoothing,
                                   softcap, z_loss)


# ---------------------------------------------------------------------------------------------------
# vmap: every op is row-wise, so a batch of B problems of N rows is one problem of B*N rows, as long as
# the per-call tensors (weight, weight_sum, grad_scale) are shared; otherwise loop over the batch.
# ---------------------------------------------------------------------------------------------------


def _rowwise_vmap(op, row_args: tuple[int, ...]):
    def rule(info, in_dims, *args):
        B = info.batch_size
        shared_batched = [i for i, d in enumerate(in_dims) if d is not None and i not in row_args]
        if shared_batched:
            per_example = []
            for b in range(B):
                sliced = [a.select(d, b) if d is not None else a for a, d in zip(args, in_dims, strict=True)]
                per_example.append(op(*sliced))
            outs = tuple(torch.stack(o) for o in zip(*per_example, strict=True)) if isinstance(
                per_example[0], tuple) else torch.stack(per_example)
        else:
            flat = list(args)
            n_rows = None
            for i in row_args:
                a, d = args[i], in_dims[i]
                if a is None:
                    continue
                a = a.movedim(d, 0) if d is not None else a.expand(B, *a.shape)
                n_rows = a.shape[1]
                flat[i] = a.reshape(B * n_rows, *a.shape[2:])
            out = op(*flat)
            unflat = lambda o: o.reshape(B, n_rows, *o.shape[1:])  # noqa: B023
            outs = tuple(unflat(o) for o in out) if isinstance(out, tuple) else unflat(out)
        out_dims = tuple(0 for _ in outs) if isinstance(outs, tuple) else 0
        return outs, out_dims

    return rule


torch.library.register_vmap(cross_entropy_rows, _rowwise_vmap(cross_entropy_rows, (0, 1, 4)))
torch.library.register_vmap(cross_entropy_rows_bwd, _rowwise_vmap(cross_entropy_rows_bwd, (0, 1, 4, 5, 6)))
torch.library.register_vmap(cross_entropy_with_grad, _rowwise_vmap(cross_entropy_with_grad, (0, 1)))


# ---------------------------------------------------------------------------------------------------
# Eager fast path for reduction="mean"/"sum" (see the module docstring).
# ---------------------------------------------------------------------------------------------------


class _FusedMeanSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, weight_sum, mean, verdict, options):
        with _on_device_of(logits):
            loss, lse, grad, scale = _kernels.cross_entropy_fused(logits, target, weight, weight_sum, options,
                                                                  "mean" if mean else "sum", verdict)
        ctx.save_for_backward(logits, target, weight, weight_sum, lse, scale)
        ctx.options = options
        ctx.grad = grad  # handed out by the first backward, then dropped
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grad is not None:
            grad, ctx.grad = ctx.grad, None
            return scale_impl(grad, grad_output), None, None, None, None, None, None
        # A second backward through the same graph (retain_graph=True): the buffer above already went
        # out as a gradient, so recompute from the logits instead of scaling it twice.
        logits, target, weight, weight_sum, lse, scale = ctx.saved_tensors
        grad_rows = grad_output.to(lse.dtype).expand(lse.shape)
        return (backward_impl(logits, target, weight, weight_sum, lse, grad_rows, *ctx.options, scale=scale),
                *([None] * 6))


def _eager_apply(function):
    """``function.apply`` for plain eager callers, without the Python half of ``autograd.Function.apply``: that
    half binds default arguments (none here: the Functions below take ``ctx`` in ``forward``), unwraps tensors
    left over from finished torch.func transforms and hands calls inside transforms to functorch, and costs
    a few µs on every training step. Callers check that no transform is active, and the fused functions below
    fall back to ``function.apply`` for a leftover wrapped tensor."""
    return torch._C._FunctionBase.__dict__["apply"].__get__(None, function)


def fused_mean_sum(logits, target, weight, weight_sum, mean, verdict, ignore_index, label_smoothing, softcap,
                   z_loss):
    """The mean (``mean``) or sum of the rows' losses, a scalar in the logits' dtype, differentiable w.r.t.
    ``logits``; Triton only, outside torch.func transforms. ``verdict``: the one-element int64 tensor the range
    check's verdict goes to (see :mod:`persample.loss._verdicts`)."""
    apply = _FusedMeanSum.apply if _is_wrapped(logits) else _fused_mean_sum_apply
    return apply(logits, target, weight, weight_sum, mean, verdict, (ignore_index, label_smoothing, softcap, z_loss))


class _FusedNone(torch.autograd.Function):
    """``reduction="none"`` in plain eager: the kernel writes each row's loss in the logits' dtype and the
    backward reads the upstream gradient in whatever dtype and strides it comes, so no cast or copy runs
    around the two kernels (each would be one more launch, and one more autograd node)."""

    @staticmethod
    def forward(ctx, logits, target, weight, weight_sum, shape, verdict, options):
        with _on_device_of(logits):
            loss, lse, _, _ = _kernels.cross_entropy_fused(logits, target, weight, weight_sum, options, "none",
                                                           verdict)
        ctx.save_for_backward(logits, target, weight, weight_sum, lse)
        ctx.options = options
        return loss.reshape(shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, weight, weight_sum, lse = ctx.saved_tensors
        grad_rows = grad_loss.reshape(-1)
        # With create_graph=True, through the Function that refuses a second derivative.
        if torch.is_grad_enabled():
            grad = _CrossEntropyRowsBwd.apply(logits, target, weight, weight_sum, None, lse, grad_rows, *ctx.options)
        else:
            grad = backward_impl(logits, target, weight, weight_sum, lse, grad_rows, *ctx.options)
        return grad, None, None, None, None, None, None


def fused_none(logits, target, weight, weight_sum, shape, verdict, ignore_index, label_smoothing, softcap, z_loss):
    """Each row's loss, shaped ``shape`` and in the logits' dtype, differentiable w.r.t. ``logits``; Triton
    only, outside torch.func transforms. ``verdict``: as in :func:`fused_mean_sum`."""
    apply = _FusedNone.apply if _is_wrapped(logits) else _fused_none_apply
    return apply(logits, target, weight, weight_sum, shape, verdict, (ignore_index, label_smoothing, softcap, z_loss))


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_fused_mean_sum_apply = _eager_apply(_FusedMeanSum)
_fused_none_apply = _eager_apply(_FusedNone)
