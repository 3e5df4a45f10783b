"""Cross-entropy on raw logits, fused into one Triton kernel: the public API and its argument checks.

``logits`` are ``(..., V)`` with the class dimension LAST (the language-model convention; unlike
``F.cross_entropy``'s ``(N, C, d1, ...)``), ``target`` is ``(...)`` of integer class indices. Semantics
follow ``F.cross_entropy`` on the same arguments, with three additions — ``softcap``, ``z_loss`` and
``mask`` — and one deliberate difference: when no row is counted, the mean is 0 with zero gradients
(PyTorch returns NaN).

With ``z_loss = z`` the loss of a counted row ``i`` is ``CE_i + z * lse_i**2`` (``CE_i`` as
``F.cross_entropy(..., reduction="none")`` gives it, class weight included; ``lse_i`` the log-sum-exp of the
row's logits, after the softcap). ``"sum"`` sums those; ``"mean"`` is the weighted mean of the ``CE_i``, as
``F.cross_entropy`` takes it (divided by the sum of the counted rows' target weights), plus the plain mean of
the ``z * lse_i**2`` over the counted rows, so that scaling every class weight leaves the z-loss's strength
unchanged. Without weights that is ``reduction="none"``'s sum over the number of counted rows.
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from persample.backend import transforms_active
from persample.loss import _cross_entropy_ops as _ops
from persample.loss.checks import (
    REDUCTIONS,
    Reduction,
    check_options,
    check_target,
    kernel_options,
    prepare,
    verdict_for,
)


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
    check_options(reduction, label_smoothing, softcap, z_loss)
    shape = tuple(target.shape)
    target1d, weight_sum = check_target(target, V, logits.device, weight, ignore_index, mask, check_range=False)
    logits2d = logits if logits.ndim == 2 else logits.reshape(-1, V)  # (a reshape costs the host a dispatch)
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    return logits2d, target1d, weight, weight_sum, shape


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
            weights; the z-loss term unweighted, see below) or ``"sum"``.
        label_smoothing: in ``[0, 1]``, as in ``F.cross_entropy``.
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` first (Gemma-2).
        z_loss: adds ``z_loss * logsumexp(logits)**2`` to every counted row (PaLM). With ``"mean"`` and
            ``weight`` those terms are averaged over the counted rows, not weighted: the result is
            ``F.cross_entropy(..., weight=weight)`` plus ``z_loss`` times the mean of ``logsumexp**2``, whatever
            the weights' scale.
        mask: bool, shape of ``target``; False rows are dropped exactly like ``ignore_index`` rows.

    Returns:
        The loss in the logits' dtype (accumulated in float32). Rows not counted give loss 0 and gradient
        exactly 0, even if their logits are inf/NaN; with no counted row the mean is 0, not NaN.

    Raises:
        TypeError: non-floating logits, non-integer target, non-bool mask.
        ValueError: shape/device mismatch, bad weight length, target outside ``[0, V)``, bad options.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> import persample
        >>> logits = torch.randn(2, 5, 100, requires_grad=True)  # (B, T, V): the class dimension is last
        >>> target = torch.randint(0, 100, (2, 5))
        >>> loss = persample.cross_entropy(logits, target)
        >>> torch.allclose(loss, F.cross_entropy(logits.flatten(0, 1), target.flatten()))
        True
        >>> loss.backward()
        >>> logits.grad.shape
        torch.Size([2, 5, 100])
        >>> persample.cross_entropy(torch.zeros(1, 4), torch.tensor([-100]))  # nothing counted: 0, not NaN
        tensor(0.)

    References:
        ``z_loss``: Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways", JMLR 2023; Wortsman et
        al., "Small-scale proxies for large-scale Transformer training instabilities", ICLR 2024.
        ``softcap``: Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size", 2024.
    """
    logits2d, target1d, weight, weight_sum, shape = _check(
        logits, target, weight, ignore_index, reduction, label_smoothing, softcap, z_loss, mask)
    options = kernel_options(ignore_index, label_smoothing, softcap, z_loss)
    V = logits2d.shape[-1]
    if logits.requires_grad and torch.is_grad_enabled() and not transforms_active() and _ops.use_triton(logits2d):
        # Plain eager training: one kernel checks the targets, computes the loss and (for mean and sum)
        # the gradient.
        word, finish = verdict_for(logits2d, target1d, V, ignore_index)
        if reduction == "none":
            loss = _ops.fused_none(logits2d, target1d, weight, weight_sum, shape, word, *options)
        else:
            loss = _ops.fused_mean_sum(logits2d, target1d, weight, weight_sum, reduction == "mean", word, *options)
        finish()
        return loss
    scale, finish = prepare(logits2d, V, target1d, weight, ignore_index, reduction)
    if not transforms_active() and not _ops.use_triton(logits2d) and _ops.is_plain(*options[1:]):
        # The PyTorch path without label smoothing, softcap or z-loss: F.cross_entropy's passes (see _ops).
        loss_rows = _ops.plain_differentiable_rows(logits2d, target1d, weight, options[0])
        if reduction == "none":
            loss = loss_rows.reshape(shape).to(logits.dtype)
        else:
            loss = (loss_rows.sum() * scale[0, 0]).to(logits.dtype)
    elif reduction == "none":
        loss_rows, _ = _ops.differentiable_rows(logits2d, target1d, weight, weight_sum, None, *options)
        loss = loss_rows.reshape(shape).to(logits.dtype)
    else:
        # Each row's share of the reduction, weighing its cross-entropy and z-loss terms apart.
        shares, _ = _ops.differentiable_rows(logits2d, target1d, weight, weight_sum,
                                             scale.expand(logits2d.shape[0], 2), *options)
        loss = shares.sum().to(logits.dtype)
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

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> import persample
        >>> logits, target = torch.randn(3, 10), torch.tensor([1, 2, -100])
        >>> loss, grad = persample.cross_entropy_with_grad(logits, target)  # per row, no autograd
        >>> loss.shape, grad.shape
        (torch.Size([3]), torch.Size([3, 10]))
        >>> torch.allclose(grad[0], torch.softmax(logits[0], -1) - F.one_hot(target[0], 10))
        True
        >>> grad[2].abs().sum()  # the ignored row
        tensor(0.)

    References:
        As :func:`cross_entropy` (``z_loss``, ``softcap``).
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
    scale, finish = prepare(logits2d, logits2d.shape[-1], target1d, weight, ignore_index, reduction)
    scale_after = None
    if row_scale is not None:
        if reduction != "none":
            raise ValueError(f"row_scale needs reduction='none', got {reduction!r}")
        rows = row_scale.to(scale.dtype).expand(shape).reshape(-1)
        if transforms_active():  # the op batches rows there, and a per-row scale would not follow them
            scale_after = rows
            scale = scale[:, 0]
        else:
            scale = rows.contiguous()
    share = reduction != "none"  # each row's share of the reduction, its two terms scaled apart
    loss_rows, _, grad = _ops.with_grad(
        logits2d.detach(), target1d, weight, weight_sum, scale, share,
        *kernel_options(ignore_index, label_smoothing, softcap, z_loss))
    if scale_after is not None:
        grad = grad * scale_after.to(grad.dtype)[:, None]
    grad = grad.reshape(logits.shape)
    if reduction == "none":
        return loss_rows.reshape(shape), grad, finish
    return loss_rows.sum(), grad, finish


class CrossEntropyLoss(nn.Module):
    """Module form of :func:`cross_entropy`, with the same keyword arguments (``weight`` is a buffer);
    ``forward(logits, target, mask=None)``.

    Raises:
        ValueError: an unknown ``reduction`` (the other arguments are checked at each call, as
            :func:`cross_entropy` does).

    Examples:
        >>> import torch
        >>> import persample
        >>> criterion = persample.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
        >>> criterion
        CrossEntropyLoss(reduction='mean', ignore_index=-100, label_smoothing=0.1, softcap=None, z_loss=0.0001)
        >>> logits, target = torch.randn(2, 5, 10), torch.randint(0, 10, (2, 5))
        >>> torch.equal(criterion(logits, target),
        ...             persample.cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-4))
        True

    References:
        As :func:`cross_entropy` (``z_loss``, ``softcap``).
    """

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
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
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
