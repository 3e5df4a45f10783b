"""Cross-entropy of a linear head, ``cross_entropy(hidden @ weight.T + bias, target)``, without the logits.

A language model's last layer maps ``N`` token states of width ``d`` to ``V`` vocabulary logits; at
``N = 8192`` and ``V = 128256`` those logits alone take 2 GiB in bfloat16, and their gradient as much again.
:func:`linear_cross_entropy` processes the tokens in chunks, computing each chunk's logits, loss and logit
gradient with the fused kernel of :func:`persample.cross_entropy` and folding the gradient into the gradients
of ``hidden``, ``weight`` and ``bias`` at once, so only one chunk of logits ever exists (see
:mod:`persample.loss._linear_cross_entropy_ops` for the schedule). :func:`linear_cross_entropy_head_grad_norms`
gives each example's gradient norm of the head for DP clipping, again without the logits.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from persample.backend import transforms_active
from persample.loss import _linear_cross_entropy_ops as _ops
from persample.loss._cross_entropy import Reduction, cross_entropy
from persample.loss.checks import check_options, check_target, kernel_options, prepare


def _check_head(hidden, weight, bias, target, chunk_size):
    """Validates the linear head's tensors; returns V."""
    for name, value in (("hidden", hidden), ("weight", weight)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if hidden.ndim == 0:
        raise ValueError("hidden must have a feature dimension: expected shape (..., d), got a scalar")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, d) with d={hidden.shape[-1]} (the last dimension of "
                         f"hidden), got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has zero rows: the head must have V >= 1 classes")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise TypeError(f"weight ({weight.dtype}, {weight.device}) must have the dtype and device of hidden "
                        f"({hidden.dtype}, {hidden.device})")
    V = weight.shape[0]
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape ({V},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(f"bias ({bias.dtype}, {bias.device}) must have the dtype and device of hidden "
                            f"({hidden.dtype}, {hidden.device})")
    if isinstance(target, Tensor) and tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match hidden shape {tuple(hidden.shape)}: "
                         f"expected target of shape {tuple(hidden.shape[:-1])}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int (rows per chunk), got {chunk_size!r}")
    return V


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """``persample.cross_entropy(hidden @ weight.T + bias, target, ...)`` without materializing the logits.

    Args:
        hidden: ``(..., d)`` float16/bfloat16/float32/float64 token states.
        weight: ``(V, d)`` head weight, same dtype and device as ``hidden`` (``nn.Linear(d, V).weight``).
        target: ``(...)`` integer class indices in ``[0, V)`` or ``ignore_index``.
        bias: ``(V,)`` head bias or None.
        class_weight: ``(V,)`` class weights: the ``weight`` argument of :func:`persample.cross_entropy`
            (renamed here, where ``weight`` is the head's).
        ignore_index, reduction, label_smoothing, softcap, z_loss, mask: as in :func:`persample.cross_entropy`.
        chunk_size: tokens per chunk; the extra memory is about ``chunk_size x V`` elements of ``hidden``'s
            dtype. Default: about ``N / 24`` (about 4% of the full logits), at least 256 rows.

    Returns:
        The loss in ``hidden``'s dtype, accumulated in float32: a scalar for ``"mean"``/``"sum"``, shape
        ``(...)`` for ``"none"``. Differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` under eager
        autograd. With ``"mean"``/``"sum"`` the gradients are computed during the forward (the matmuls run
        3 passes over the head, like the unfused layer); with ``"none"`` the backward recomputes the logits
        chunk by chunk (4 passes). ``grad_weight`` is accumulated in ``weight``'s dtype, chunk by chunk.
        Under ``torch.func`` transforms and ``torch.compile`` this falls back to
        ``persample.cross_entropy(F.linear(hidden, weight, bias), ...)``, which does hold the logits.

    Raises:
        TypeError: non-floating or mismatched dtypes/devices, non-integer target, non-bool mask.
        ValueError: shape mismatch, target outside ``[0, V)``, bad options or chunk_size.

    Examples:
        >>> import torch
        >>> import persample
        >>> hidden = torch.randn(2, 8, 16, requires_grad=True)  # (B, T, d)
        >>> head = torch.nn.Linear(16, 100, bias=False)  # weight (V, d)
        >>> target = torch.randint(0, 100, (2, 8))
        >>> loss = persample.linear_cross_entropy(hidden, head.weight, target, chunk_size=4)  # 4 rows of logits at once
        >>> torch.allclose(loss, persample.cross_entropy(head(hidden), target))
        True
        >>> loss.backward()
        >>> hidden.grad.shape, head.weight.grad.shape
        (torch.Size([2, 8, 16]), torch.Size([100, 16]))

    References:
        The same chunking as Liger-Kernel's fused linear cross-entropy: Hsu et al., "Liger Kernel: Efficient
        Triton Kernels for LLM Training", 2024.
    """
    V = _check_head(hidden, weight, bias, target, chunk_size)
    check_options(reduction, label_smoothing, softcap, z_loss)
    if transforms_active():
        return cross_entropy(F.linear(hidden, weight, bias), target, weight=class_weight, ignore_index=ignore_index,
                             reduction=reduction, label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss,
                             mask=mask)
    shape = tuple(target.shape) if isinstance(target, Tensor) else None
    target1d, class_weight_sum = check_target(target, V, hidden.device, class_weight, ignore_index, mask,
                                               weight_name="class_weight", scores_name="hidden", check_range=False)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    N = hidden2d.shape[0]
    grad_on = torch.is_grad_enabled()
    needs = _ops.Needs(grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
                       grad_on and bias is not None and bias.requires_grad)
    scale, finish = prepare(hidden2d, V, target1d, class_weight, ignore_index, reduction, scores_name="hidden")
    loss = _ops.linear_cross_entropy(
        hidden2d, weight, bias, target1d, class_weight, class_weight_sum, scale, reduction,
        chunk_size or _ops.default_chunk_size(N), needs, kernel_options(ignore_index, label_smoothing, softcap, z_loss))
    finish()
    return loss.reshape(shape) if reduction == "none" else loss


def _per_example_scale(target: Tensor, class_weight: Tensor | None, ignore_index: int, reduction: Reduction,
                       dtype) -> Tensor:
    """Each example's scale pair (B, 2) for target (B, T): for ``"mean"`` 1 / (sum of its counted target
    weights) for the cross-entropy and 1 / (number of its counted tokens) for the z-loss, each 0 when its
    denominator is; for ``"sum"`` 1 and 1."""
    if reduction == "sum":
        return torch.ones(target.shape[0], 2, dtype=dtype, device=target.device)
    counted = target != ignore_index
    count = counted.sum(1, dtype=dtype)
    if class_weight is None:
        denom = torch.stack([count, count], 1)
    else:
        weight_sum = torch.where(counted, class_weight.to(dtype)[torch.where(counted, target, 0)], 0.0).sum(1)
        denom = torch.stack([weight_sum, count], 1)
    return torch.where(denom > 0, 1.0 / torch.where(denom > 0, denom, 1.0), 0.0)


class HeadGradNorms(NamedTuple):
    """Per-example results of :func:`linear_cross_entropy_head_grad_norms`, each of shape ``(B,)``: ``loss``,
    and the gradient norms of the head's ``weight`` and ``bias`` (None without a bias).

    Examples:
        >>> import torch
        >>> import persample
        >>> out = persample.linear_cross_entropy_head_grad_norms(torch.randn(2, 3, 4), torch.randn(5, 4),
        ...                                                      torch.randint(0, 5, (2, 3)))
        >>> out._fields, out.weight.shape, out.bias
        (('loss', 'weight', 'bias'), torch.Size([2]), None)
    """

    loss: Tensor
    weight: Tensor
    bias: Tensor | None


def linear_cross_entropy_head_grad_norms(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> HeadGradNorms:
    """Each example's loss and the norm of its gradient w.r.t. the head, for DP clipping, without the logits.

    Example ``i`` has the tokens ``hidden[i]`` and its loss is ``L_i = cross_entropy(hidden[i] @ weight.T +
    bias, target[i], reduction=reduction, ...)``: the ``"mean"`` over its counted tokens (0 when none is
    counted; with ``class_weight`` the weighted mean of the cross-entropy plus the plain mean of the z-loss
    terms, as :func:`persample.cross_entropy`) or their ``"sum"``. This returns ``L_i`` and
    ``||dL_i/dweight||_F`` and ``||dL_i/dbias||`` computed with the ghost-norm identity
    ``||G.T @ A||_F^2 = <A @ A.T, G @ G.T>`` (``A``: the example's token states, ``G``: its logit gradients),
    which needs ``T x T`` matrices instead of the ``V x d`` gradient. Cost: one more forward pass over the
    head plus ``O(B * T^2 * (V + d))``; memory: one chunk of whole examples' logits (at least one example,
    ``T x V``) and ``T x T`` Grams in float32. Cheaper than forming per-example gradients while ``T`` is
    below about ``d``.

    Args:
        hidden: ``(B, T, d)``; weight: ``(V, d)``; target: ``(B, T)``; bias: ``(V,)`` or None.
        reduction: ``"mean"`` or ``"sum"`` over each example's tokens.
        chunk_size: tokens per chunk, rounded down to whole examples (at least one).
        Other options: as in :func:`linear_cross_entropy`.

    Returns:
        :class:`HeadGradNorms` ``(loss, weight, bias)``, each ``(B,)`` float32 (float64 for float64 inputs),
        ``bias`` None without a bias. Detached: nothing here is differentiable.

    Raises:
        TypeError, ValueError: as :func:`linear_cross_entropy`; ValueError if ``hidden`` is not 3-D or
        ``reduction`` is ``"none"``.

    Examples:
        >>> import torch
        >>> import persample
        >>> hidden, head = torch.randn(3, 5, 8), torch.nn.Linear(8, 20)  # (B, T, d), V = 20
        >>> target = torch.randint(0, 20, (3, 5))
        >>> out = persample.linear_cross_entropy_head_grad_norms(hidden, head.weight, target, bias=head.bias)
        >>> out.loss.shape, out.weight.shape, out.bias.shape
        (torch.Size([3]), torch.Size([3]), torch.Size([3]))
        >>> persample.cross_entropy(head(hidden[1]), target[1]).backward()  # example 1 alone, by autograd
        >>> torch.allclose(out.weight[1], head.weight.grad.norm(), rtol=1e-4)
        True

    References:
        Goodfellow, "Efficient Per-Example Gradient Computations", 2015; Li, Tramèr, Liang and Hashimoto, "Large
        Language Models Can Be Strong Differentially Private Learners", ICLR 2022 (the ghost norm of a layer
        applied to a sequence, ``<A @ A.T, G @ G.T>``).
    """
    V = _check_head(hidden, weight, bias, target, chunk_size)
    if hidden.ndim != 3:
        raise ValueError(f"hidden must have shape (B, T, d) (examples, tokens, features), got {tuple(hidden.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' (over each example's tokens), got {reduction!r}")
    check_options(reduction, label_smoothing, softcap, z_loss)
    target1d, class_weight_sum = check_target(target, V, hidden.device, class_weight, ignore_index, mask,
                                               weight_name="class_weight", scores_name="hidden")
    B, T, _ = hidden.shape
    target2d = target1d.reshape(B, T)
    with torch.no_grad():
        scale = _per_example_scale(target2d, class_weight, ignore_index, reduction,
                                   torch.float64 if hidden.dtype == torch.float64 else torch.float32)
        loss, weight_norm, bias_norm = _ops.head_grad_norms(
            hidden.detach(), weight.detach(), bias.detach() if bias is not None else None, target2d, class_weight,
            class_weight_sum, kernel_options(ignore_index, label_smoothing, softcap, z_loss),
            chunk_size or _ops.default_chunk_size(B * T), scale)
    return HeadGradNorms(loss, weight_norm, bias_norm)
