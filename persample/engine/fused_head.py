"""The loss side for a model that stops at its last hidden states ``(B, T, d)``, followed by a linear head and
the cross-entropy, fused by :func:`persample.linear_cross_entropy`: a step of the engine then never holds the
``(B, T, V)`` logits or their gradient (``GhostClipping(..., head=lm_head)``).

* **Losses and the hidden states' gradient**: example ``b``'s loss is the mean of its counted tokens'
  cross-entropy (0 if none is counted), as the engine's default loss on logits: one
  ``linear_cross_entropy(hidden[b], ...)`` per example, whose gradient w.r.t. ``hidden[b]`` is formed chunk by
  chunk during its forward; the body's backward starts from those gradients.
* **A trainable head** (full fine-tuning; a LoRA model's head is frozen and costs nothing more): each example's
  squared gradient norm of the head, ``||dL_b/dW||^2 + ||dL_b/db||^2``, from
  :func:`persample.linear_cross_entropy_head_grad_norms` (the ghost-norm identity on ``T x T`` Grams), is added to
  the body's before clipping; once the clip factors ``c_b`` are known, ``sum_b c_b dL_b/dW`` is one more chunked
  pass, the backward of ``sum_b c_b loss_b``.
* A head tied to a trainable embedding (GPT-2's ``lm_head`` is ``wte``) would need the cross term between the
  embedding's and the head's per-example gradients, which the identity above does not give: it is refused.

Under ``torch.autocast`` the head runs in the autocast dtype, as ``nn.Linear`` would (operands cast, then
autocast off so that nothing inside casts again).
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from persample.engine.forms import acc_dtype
from persample.loss import linear_cross_entropy, linear_cross_entropy_head_grad_norms


@dataclass
class HeadStep:
    """What the loss side keeps for the head's norms and clipped sums: the hidden states and head operands in
    the head's compute dtype (detached), the targets, each example's ``1 / count_b``, the trainable head
    parameters by role (``"weight"``, ``"bias"``) and their ``(B,)`` squared norms."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    targets: Tensor
    scale: Tensor
    params: dict[str, nn.Parameter]
    sq_norms: Tensor | None
    ignore_index: int
    chunk_size: int | None


def _operands(hidden: Tensor, head: nn.Linear) -> tuple[torch.dtype, Tensor, Tensor | None]:
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    bias = head.bias.detach().to(dtype) if head.bias is not None else None
    return dtype, head.weight.detach().to(dtype), bias


def loss_and_hidden_grad(hidden: Tensor, head: nn.Linear, targets: Tensor, trainable: dict[str, nn.Parameter], *,
                         ignore_index: int, chunk_size: int | None) -> tuple[Tensor, Tensor, HeadStep]:
    """``(losses (B,), d sum_b loss_b / d hidden, HeadStep)`` for ``hidden: (B, T, d)`` and ``targets: (B, T)``;
    ``trainable``: the head's parameters to clip, by role.

    Raises:
        ValueError: ``hidden`` is not 3-D, or the errors of :func:`persample.linear_cross_entropy`.
    """
    if not isinstance(hidden, Tensor) or hidden.ndim != 3:
        raise ValueError("with head=, the model must return its last hidden states of shape (B, T, d), got "
                         f"{tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__}")
    dtype, weight, bias = _operands(hidden, head)
    device = hidden.device.type
    acc = acc_dtype(hidden)
    counted = (targets != ignore_index).sum(1, dtype=acc)
    scale = counted.clamp_min(1).reciprocal()
    # One example at a time with the mean over its tokens: that reduction's gradient comes out of the forward's
    # chunks (3 passes over the head), where reduction="none" would recompute the logits in a backward (4 passes,
    # about 3x the time on the CPU).
    losses = torch.zeros(len(hidden), dtype=acc, device=hidden.device)
    grad = torch.empty_like(hidden)
    with torch.enable_grad(), torch.autocast(device, enabled=False):
        for b in range(len(hidden)):
            leaf = hidden[b].detach().requires_grad_()
            loss = linear_cross_entropy(leaf.to(dtype), weight, targets[b], bias=bias, ignore_index=ignore_index,
                                        chunk_size=chunk_size)
            (grad[b],) = torch.autograd.grad(loss, leaf)
            losses[b] = loss.detach()
    x = hidden.detach().to(dtype)
    sq_norms = None
    if trainable:
        with torch.autocast(device, enabled=False):
            norms = linear_cross_entropy_head_grad_norms(x, weight, targets, bias=bias, ignore_index=ignore_index,
                                                         chunk_size=chunk_size)
        sq_norms = norms.weight.square() if "weight" in trainable else torch.zeros_like(norms.weight)
        if "bias" in trainable:
            sq_norms = sq_norms + norms.bias.square()
    return losses, grad, HeadStep(x, weight, bias, targets, scale, trainable, sq_norms, ignore_index,
                                           chunk_size)


def clipped_sums(step: HeadStep, factors: Tensor) -> dict[nn.Parameter, Tensor]:
    """``{param: sum_b factors_b * d loss_b / d param}`` for the trainable head parameters, in their dtypes. An
    example with factor 0 (not finite) has its hidden states zeroed first, so that it adds exactly nothing."""
    factors = factors.to(step.scale.device, step.scale.dtype)
    x = torch.where((factors != 0)[:, None, None], step.hidden, 0)
    leaves = {role: (step.weight if role == "weight" else step.bias).detach().requires_grad_(True)
              for role in step.params}
    weight, bias = leaves.get("weight", step.weight), leaves.get("bias", step.bias)
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        rows = linear_cross_entropy(x, weight, step.targets, bias=bias, ignore_index=step.ignore_index,
                                    reduction="none", chunk_size=step.chunk_size)
        total = (rows.to(factors.dtype) * (factors * step.scale)[:, None]).sum()
        grads = torch.autograd.grad(total, list(leaves.values()))
    return {step.params[role]: g.to(step.params[role].dtype) for role, g in zip(leaves, grads, strict=True)}
