"""Cross-entropy on raw logits, fused into one Triton kernel: the public API and its argument checks.

``logits`` are ``(..., V)`` with the class dimension LAST (the language-model convention; unlike
``F.cross_entropy``'s ``(N, C, d1, ...)``), ``target`` is ``(...)`` of integer class indices. Semantics
follow ``F.cross_entropy`` on the same arguments, with three additions — ``softcap``, ``z_loss`` and
``mask`` — and one deliberate difference: when no row is counted, the mean is 0 with zero gradients
(PyTorch returns NaN).
"""

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from persample import _cross_entropy_ops as _ops
from persample import _verdicts
from persample._cross_entropy_ops import transforms_active as _transforms_active

Reduction = Literal["none", "mean", "sum"]
_REDUCTIONS = ("none", "mean", "sum")


def _concrete(t: Tensor) -> Tensor | None:
    """The plain tensor under torch.func wrappers (its batch dimensions included), or None if it has no
    data (fake/meta tensors, tracing)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    if t.device.type == "meta" or torch._subclasses.fake_tensor.is_fake(t):
        return None
    return t


def _check_options(reduction, label_smoothing, softcap, z_loss) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    if not z_loss >= 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")


def _check_target(target, V, device, weight, ignore_index, mask, weight_name="weight", scores_name="logits",
                  check_range=True):
    """Checks ``target``, the class ``weight`` (V,) and ``mask`` against scores with V classes on ``device``;
    returns (target (N,) int64 with masked rows set to ``ignore_index``, weight_sum (1,) or None).
    ``check_range=False`` leaves the range of the class indices to :func:`_check_target_range`."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype} "
                        "(class-probability targets are not supported)")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but {scores_name} are on {device}")
    if weight is not None:
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            raise TypeError(f"{weight_name} must be a floating-point tensor, got {getattr(weight, 'dtype', weight)}")
        if tuple(weight.shape) != (V,):
            raise ValueError(f"{weight_name} must have shape ({V},) (one per class), got {tuple(weight.shape)}")
        if weight.device != device:
            raise ValueError(f"{weight_name} is on {weight.device} but {scores_name} are on {device}")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != tuple(target.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match target shape {tuple(target.shape)}")
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but {scores_name} are on {device}")

    if target.dtype != torch.int64:
        target = target.long()
    if mask is not None:
        target = torch.where(mask, target, ignore_index)
    weight_sum = weight.sum(dtype=torch.float32 if weight.dtype != torch.float64 else torch.float64).reshape(
        1) if weight is not None else None
    if target.ndim != 1:
        target = target.reshape(-1)
    if check_range:
        _check_target_range(target, V, ignore_index, scores_name)
    return target, weight_sum


def _check_target_range(target: Tensor, V: int, ignore_index: int, scores_name: str = "logits") -> None:
    """Raises ValueError for a class index outside ``[0, V)`` that is not ``ignore_index``.

    A host sync on CUDA. Callers place it after the small ops that prepare a launch (they run on the GPU
    while the host waits) and right before the kernel, which then has only its own launch latency exposed.
    Skipped while tracing (no data), where the kernel's NaN rows are the fallback."""
    if torch.compiler.is_compiling() or (concrete := _concrete(target)) is None:
        return
    bad = (concrete != ignore_index) & ((concrete < 0) | (concrete >= V))
    if bool(bad.any()):
        raise _out_of_range(int(concrete[bad].reshape(-1)[0]), V, ignore_index, scores_name)


def _out_of_range(value: int, V: int, ignore_index: int, scores_name: str = "logits") -> ValueError:
    return ValueError(f"target contains class index {value}, outside [0, {V}) for {scores_name} with V={V} "
                      f"classes (and not ignore_index={ignore_index})")


def _verdict_for(scores2d: Tensor, target1d: Tensor, V: int, ignore_index: int, scores_name: str = "logits",
                 ) -> tuple[Tensor, Callable[[], None]]:
    """``(word, finish)`` for a kernel that checks the range of ``target1d`` against V classes: the kernel
    writes its verdict to ``word`` and ``finish()`` waits for that verdict alone (see
    :mod:`persample._verdicts`) and raises ValueError for a class index outside ``[0, V)``. Until then a bad
    target's rows hold NaN; the kernel touches nothing outside them."""
    if scores2d.is_cuda and torch.cuda.is_current_stream_capturing():
        # A CUDA graph being captured cannot wait: as under torch.compile, a bad target's rows hold NaN, and
        # whoever replays the graph checks the targets (see engine/graphed.py).
        return torch.empty(1, dtype=torch.int64, device=scores2d.device), _no_check
    verdict = _verdicts.take(scores2d.device)

    def finish() -> None:
        row = verdict.wait()
        if row is not None:
            raise _out_of_range(int(target1d[row]), V, ignore_index, scores_name)

    return verdict.word, finish


def _no_check() -> None:
    pass


def _prepare(scores2d, V, target1d, weight, ignore_index, reduction,
             scores_name="logits") -> tuple[Tensor, Callable[[], None]]:
    """The reduction's scale (1,) (see :func:`_reduction_scale`) and the target range check, returned as
    ``(scale, finish)``: ``finish()`` raises ValueError for a class index outside ``[0, V)``. ``scores2d``
    (the logits, or the hidden states of a fused head) gives the device and the accumulation dtype.

    On the kernel path (plain eager, CUDA or the interpreter) one small kernel computes the scale and the
    check (see :func:`_verdict_for`): the GPU starts the main kernel without waiting for the host, and a bad
    target still raises before anything is returned. Elsewhere: PyTorch ops and a plain check.
    """
    if _transforms_active() or not _ops.use_triton(scores2d):
        scale = _reduction_scale(scores2d, target1d, weight, ignore_index, reduction)
        _check_target_range(target1d, V, ignore_index, scores_name)
        return scale, _no_check
    word, finish = _verdict_for(scores2d, target1d, V, ignore_index, scores_name)
    scale = _ops.target_stats(target1d, V, weight, ignore_index, reduction == "mean",
                              torch.float64 if scores2d.dtype == torch.float64 else torch.float32, word)
    return scale, finish


def check_targets_later(target: Tensor, V: int, ignore_index: int) -> Callable[[], None]:
    """``finish()`` raising the ValueError of a class index in ``target`` (any shape, integer) outside ``[0, V)``
    that is not ``ignore_index``: on CUDA one small kernel now and, in ``finish()``, a wait for that kernel only
    (see :func:`_prepare`), so the caller can queue more work in between."""
    target1d = target.reshape(-1).long()
    # The targets stand in for the scores: _prepare takes only their device from them here.
    return _prepare(target1d, V, target1d, None, ignore_index, "none")[1]


def _check(logits, target, weight, ignore_index, reduction, label_smoothing, softcap, z_loss, mask):
    """Validates once at the boundary; returns (logits (N, V), target (N,), weight, weight_sum, shape)."""
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"logits and target must be tensors, got {type(logits).__name__} and "
                        f"{type(target).__name__}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.ndim == 0:
        raise ValueError("logits must have a class dimension: expected shape (..., V), got a scalar")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits shape "
                         f"{tuple(logits.shape)}: expected target of shape {tuple(logits.shape[:-1])} "
                         "(the class dimension is the last one)")
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits have zero classes (V == 0)")
    _check_options(reduction, label_smoothing, softcap, z_loss)
    shape = tuple(target.shape)
    target1d, weight_sum = _check_target(target, V, logits.device, weight, ignore_index, mask, check_range=False)
    logits2d = logits if logits.ndim == 2 else logits.reshape(-1, V)  # (a reshape costs the host a dispatch)
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    return logits2d, target1d, weight, weight_sum, shape


def _options(ignore_index, label_smoothing, softcap, z_loss):
    return int(ignore_index), float(label_smoothing), float(softcap or 0.0), float(z_loss)


def _reduction_scale(scores2d, target, weight, ignore_index, reduction) -> Tensor:
    """What the summed loss is multiplied by, shape (1,): for "mean" 1 / (sum of target weights over counted
    rows), or 0 when nothing is counted; otherwise 1."""
    acc = torch.float64 if scores2d.dtype == torch.float64 else torch.float32
    if reduction != "mean":
        return torch.ones(1, dtype=acc, device=scores2d.device)
    counted = target != ignore_index
    if weight is None:
        denom = counted.sum(dtype=acc)
    else:
        denom = torch.where(counted, weight.to(acc)[torch.where(counted, target, 0)], 0.0).sum()
    return torch.where(denom > 0, 1.0 / torch.where(denom > 0, denom, 1.0), 0.0).reshape(1)


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Cross-entropy between raw ``logits`` and class indices ``target``, in one fused kernel.

    Args:
        logits: ``(..., V)`` float16/bfloat16/float32/float64 raw scores (never log-probabilities).
        target: ``(...)`` integer class indices in ``[0, V)`` or ``ignore_index``.
        weight: ``(V,)`` class weights, as in ``F.cross_entropy``.
        ignore_index: target value whose rows are not counted.
        reduction: ``"none"`` (shape of ``target``), ``"mean"`` (over counted rows, weighted by the target
            weights) or ``"sum"``.
        label_smoothing: in ``[0, 1]``, as in ``F.cross_entropy``.
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` first (Gemma-2).
        z_loss: adds ``z_loss * logsumexp(logits)**2`` to every counted row (PaLM).
        mask: bool, shape of ``target``; False rows are dropped exactly like ``ignore_index`` rows.

    Returns:
        The loss in the logits' dtype (accumulated in float32). Rows not counted give loss 0 and gradient
        exactly 0, even if their logits are inf/NaN; with no counted row the mean is 0, not NaN.

    Raises:
        TypeError: non-floating logits, non-integer target, non-bool mask.
        ValueError: shape/device mismatch, bad weight length, target outside ``[0, V)``, bad options.
    """
    logits2d, target1d, weight, weight_sum, shape = _check(
        logits, target, weight, ignore_index, reduction, label_smoothing, softcap, z_loss, mask)
    options = _options(ignore_index, label_smoothing, softcap, z_loss)
    V = logits2d.shape[-1]
    if logits.requires_grad and torch.is_grad_enabled() and not _transforms_active() and _ops.use_triton(logits2d):
        # Plain eager training: one kernel checks the targets, computes the loss and (for mean and sum)
        # the gradient.
        word, finish = _verdict_for(logits2d, target1d, V, ignore_index)
        if reduction == "none":
            loss = _ops.fused_none(logits2d, target1d, weight, weight_sum, shape, word, *options)
        else:
            loss = _ops.fused_mean_sum(logits2d, target1d, weight, weight_sum, reduction == "mean", word, *options)
        finish()
        return loss
    scale, finish = _prepare(logits2d, V, target1d, weight, ignore_index, reduction)
    loss_rows, _ = _ops.differentiable_rows(logits2d, target1d, weight, weight_sum, *options)
    if reduction == "none":
        loss = loss_rows.reshape(shape).to(logits.dtype)
    else:
        loss = (loss_rows.sum() * scale[0]).to(logits.dtype)
    finish()
    return loss


def cross_entropy_with_grad(
    logits: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "none",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The loss and its gradient w.r.t. the logits from one kernel pass, with no autograd involved.

    With the default ``reduction="none"`` this returns each row's loss ``(...)`` and
    ``d loss_i / d logits_i`` ``(..., V)``: the per-example gradients w.r.t. the logits. With ``"mean"``
    or ``"sum"`` it returns the reduced loss (a scalar) and the gradient of that scalar. Same keyword
    arguments and semantics as :func:`cross_entropy`; the loss is float32 (float64 for float64 logits),
    the gradient has the logits' dtype. Both results are detached.
    """
    loss, grad, finish = with_grad_check_later(
        logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss, mask=mask)
    finish()
    return loss, grad


def with_grad_check_later(logits: Tensor, target: Tensor, *, weight: Tensor | None, ignore_index: int,
                          reduction: Reduction, label_smoothing: float, softcap: float | None, z_loss: float,
                          mask: Tensor | None, row_scale: Tensor | None = None,
                          ) -> tuple[Tensor, Tensor, Callable[[], None]]:
    """:func:`cross_entropy_with_grad`, plus ``finish()``, which raises the ValueError of an out-of-range
    target: the caller queues more work on the results first and calls ``finish()`` before it hands anything
    back. On CUDA, ``finish()`` waits for the small check kernel only; called once the rest of a training
    step is queued, it finds that kernel long done, so the host never waits for the GPU mid-step. Until then,
    the rows of a bad target hold NaN (the kernel touches nothing outside them).

    ``row_scale`` (``reduction="none"`` only): a tensor of the target's shape (or broadcastable to it) that
    multiplies each row's gradient, inside the kernel (no extra pass over the gradient); the losses are
    not scaled."""
    logits2d, target1d, weight, weight_sum, shape = _check(
        logits, target, weight, ignore_index, reduction, label_smoothing, softcap, z_loss, mask)
    scale, finish = _prepare(logits2d, logits2d.shape[-1], target1d, weight, ignore_index, reduction)
    scale_after = None
    if row_scale is not None:
        if reduction != "none":
            raise ValueError(f"row_scale needs reduction='none', got {reduction!r}")
        rows = row_scale.to(scale.dtype).expand(shape).reshape(-1)
        if _transforms_active():  # the op batches rows there, and a per-row scale would not follow them
            scale_after = rows
        else:
            scale = rows.contiguous()
    loss_rows, _, grad = _ops.with_grad(
        logits2d.detach(), target1d, weight, weight_sum, scale,
        *_options(ignore_index, label_smoothing, softcap, z_loss))
    if scale_after is not None:
        grad = grad * scale_after.to(grad.dtype)[:, None]
    grad = grad.reshape(logits.shape)
    if reduction == "none":
        return loss_rows.reshape(shape), grad, finish
    return loss_rows.sum() * scale[0], grad, finish


class CrossEntropyLoss(nn.Module):
    """Module form of :func:`cross_entropy`, with the same keyword arguments (``weight`` is a buffer)."""

    def __init__(
        self,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        label_smoothing: float = 0.0,
        softcap: float | None = None,
        z_loss: float = 0.0,
    ):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.softcap = softcap
        self.z_loss = z_loss

    def forward(self, logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return cross_entropy(
            logits, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, softcap=self.softcap, z_loss=self.z_loss, mask=mask)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, softcap={self.softcap}, z_loss={self.z_loss}")
