"""Where the backward starts: each example's loss and its gradient w.r.t. the model output.

By default the output holds logits ``(B, ..., V)`` and ``targets`` are ``(B, ...)`` class indices; example
``b``'s loss is the mean cross-entropy over its counted targets (not ``ignore_index``), 0 if none is
counted — the per-example loss of the ``vmap`` pipeline. :func:`persample.cross_entropy_with_grad` gives
every row's loss and ``d loss_row / d logits`` in one kernel pass; scaling the rows of example ``b`` by
``1 / count_b`` turns that into ``d loss_b / d logits``, so the backward starts from per-example gradients
with no autograd graph through the loss.

A custom ``loss_fn(output, targets) -> (B,)`` goes through autograd instead.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from persample.engine.forms import acc_dtype
from persample.loss import with_grad_check_later


def loss_and_output_grad(output: Tensor, targets: Tensor, *, ignore_index: int,
                         loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
                         ) -> tuple[Tensor, Tensor, Callable[[], None]]:
    """``(losses (B,), d sum_b loss_b / d output, finish)``; the gradient has the output's shape and dtype.

    ``finish()`` raises the ValueError of a target outside ``[0, V)``; call it once the step's remaining work is
    queued (see :func:`persample.loss.with_grad_check_later`): on CUDA the check then costs the host no
    wait for the GPU. Until then the rows of such a target hold NaN.

    Raises:
        TypeError: the output is not a floating-point tensor.
        ValueError: ``targets`` do not match the logits, or ``loss_fn`` does not return shape ``(B,)``.
    """
    if not isinstance(output, Tensor) or not output.is_floating_point():
        raise TypeError(f"the model must return one floating-point tensor, got {type(output).__name__}"
                        + (f" of dtype {output.dtype}" if isinstance(output, Tensor) else ""))
    B = output.shape[0] if output.ndim else 0
    if loss_fn is not None:
        leaf = output.detach().requires_grad_()
        with torch.enable_grad():
            losses = loss_fn(leaf, targets)
            if not isinstance(losses, Tensor) or tuple(losses.shape) != (B,):
                raise ValueError(f"loss_fn must return one loss per example, shape ({B},), got "
                                 f"{tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__}")
            (grad,) = torch.autograd.grad(losses.sum(), leaf)
        return losses.detach(), grad, _nothing
    if output.ndim < 2:
        raise ValueError(f"logits must have shape (B, ..., V), got {tuple(output.shape)}")
    if not isinstance(targets, Tensor) or tuple(targets.shape) != tuple(output.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(output.shape[:-1])} (the logits' shape without the "
                         f"class dimension), got {tuple(getattr(targets, 'shape', ())) or type(targets).__name__}")
    counted = (targets != ignore_index).reshape(B, -1).sum(1, dtype=acc_dtype(output))
    # An example with no counted target has loss rows and gradient rows of 0 already: any scale keeps them 0.
    scale = counted.clamp_min(1).reciprocal()
    # The kernel scales each row's gradient by its example's 1 / count_b as it writes it.
    rows, grad, finish = with_grad_check_later(output, targets, weight=None, ignore_index=ignore_index,
                                               reduction="none", label_smoothing=0.0, softcap=None, z_loss=0.0,
                                               mask=None, row_scale=scale.view(B, *([1] * (targets.ndim - 1))))
    losses = rows.reshape(B, -1).sum(1) * scale
    return losses, grad, finish


def _nothing() -> None:
    pass
