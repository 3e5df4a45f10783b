"""nn.GroupNorm: a per-channel scale and shift of the input normalized over each group of channels.

With ``x (B, C, *spatial)`` split into ``groups`` groups of ``C / groups`` channels, ``mu`` and ``rstd`` each
example's mean and ``1 / sqrt(var + eps)`` over a group (its channels and positions), each example's gradients
are materialized (they are as small as the parameters): ``d_bias[c] = sum_s G[c, s]`` and
``d_weight[c] = rstd * (sum_s G[c, s] x[c, s] - mu * d_bias[c])``, the sums over positions ``s`` (the formula of
PyTorch's own GroupNorm backward), in float32 (float64 for float64 inputs). The statistics are the ones the
forward computed, taken from the call's autograd node (which saves them for its own backward) when they are there
in that dtype; else (an input that PyTorch's kernel normalized in bfloat16 on the CPU, an output whose node is
not GroupNorm's) they are recomputed, by one ``var_mean`` reduction on a GPU and by PyTorch's GroupNorm forward
kernel on the CPU. On the Triton path (CUDA, or ``TRITON_INTERPRET=1``) one kernel forms both sums and the scale's
gradient (:mod:`persample.kernels.group_norm_affine_grads`), and the engine holds the calls to the end of the
backward (within :func:`~persample.engine.recording.hold_budget`) so that :func:`batched` runs one launch for all
calls of one shape; elsewhere PyTorch ops, ``sum_s G x`` by :func:`~persample.engine.forms.batched_dot` over
channels, in float32 over chunks of examples (:func:`_sum_gx`).
"""

import math

import torch
from torch import Tensor, nn

from persample.backend import use_triton
from persample.engine.forms import Dense, Form, acc_dtype, batched_dot
from persample.engine.recording import saved_tensor_hooks
from persample.engine.registry import Call, register_rule
from persample.kernels import group_norm_affine_grads as _kernel

STATS: str | None = None  # "var_mean" or "kernel" forces one way of recomputing the statistics (tests); None: the
# forward's own where the autograd node has them, else by device


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are on: unpacking a saved tensor then runs their unpack hook now, which may
    recompute a checkpointed region's forward. True when it cannot be told (:data:`CANNOT_TELL` is not None)."""
    return saved_tensor_hooks() is not None


def _saved_stats(output: Tensor) -> dict:
    """The forward's ``mean`` and ``rstd`` ``(B, groups)``, from the output's ``native_group_norm`` node (saved for
    its backward; taking them keeps two tiny tensors alive until the rule runs), or ``{}``: no such node, or
    saved-tensor hooks on."""
    node = output.grad_fn
    if node is None or type(node).__name__ != "NativeGroupNormBackward0" or _saved_tensor_hooks_active():
        return {}
    try:
        return {"mean": node._saved_result1, "rstd": node._saved_result2}
    except (AttributeError, RuntimeError):  # another PyTorch's names, or freed
        return {}


def _forward_stats(saved: dict, B: int, groups: int, acc: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """The forward's ``(mean, rstd)`` where :func:`_saved_stats` took them (``saved``, the call's kwargs), of the
    shape and dtype the rule needs (and :data:`STATS` forces no recomputation), else ``(None, None)``."""
    mean, rstd = saved.get("mean"), saved.get("rstd")
    if STATS is not None or mean is None or rstd is None:
        return None, None
    if not (mean.dtype == rstd.dtype == acc and mean.shape == rstd.shape == (B, groups)):
        return None, None
    return mean, rstd


def _statistics(call: Call, x: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """The forward's ``(mean, rstd)`` ``(B, groups)`` of ``x (B, C, ...)`` (the call's input), taken or recomputed."""
    module = call.module
    B, C, groups = x.shape[0], x.shape[1], module.num_groups
    mean, rstd = _forward_stats(call.kwargs, B, groups, acc)
    if mean is not None:  # of that shape already
        return mean, rstd
    # On a GPU one reduction that reads x (the forward kernel would also write its output); on the CPU PyTorch's
    # own GroupNorm forward, its output dropped, about 10x faster than var_mean there.
    if STATS == "var_mean" or (STATS is None and x.is_cuda):
        var, mean = torch.var_mean(x.reshape(B, groups, -1).to(acc), dim=2, correction=0)
        rstd = (var + module.eps).rsqrt()
    else:
        _, mean, rstd = torch.ops.aten.native_group_norm(x.to(acc).contiguous(), None, None, B, C,
                                                         math.prod(x.shape[2:]), groups, module.eps)
    return mean.view(B, groups), rstd.view(B, groups)


_CHUNK = 1 << 19  # elements of x per chunk of examples in _sum_gx


def _sum_gx(x: Tensor, G: Tensor, acc: torch.dtype) -> Tensor:
    """``(B, C)`` each example's ``sum_s G[c, s] x[c, s]`` of ``x, G (B, C, S)`` in ``acc``, over chunks of examples
    of at most :data:`_CHUNK` elements: the float32 copies of 16-bit inputs (and the product the dot may form) are
    a chunk's, not the batch's, which would add two copies of the layer's activations to the step's peak."""
    B, C = x.shape[:2]
    step = max(1, _CHUNK // max(1, math.prod(x.shape[1:])))
    parts = [batched_dot(G[i:i + step].reshape(-1, G.shape[2]).to(acc), x[i:i + step].reshape(-1, x.shape[2]).to(acc))
             for i in range(0, B, step)]
    if not parts:  # no examples
        return x.new_zeros(B, C, dtype=acc)
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).view(B, C)


def _as_forms(call: Call, d_weight: Tensor, d_bias: Tensor) -> dict[str, Form]:
    forms: dict[str, Form] = {"weight": Dense(d_weight)}
    if "bias" in call.params:
        forms["bias"] = Dense(d_bias)
    return forms


def batched(calls: list[tuple[Call, Tensor]]) -> list[dict[str, Form]]:
    """The forms of ``calls`` (GroupNorm calls with their output gradients): the calls with a trainable scale whose
    inputs, gradients and statistics have one shape and dtypes share one launch of
    :func:`~persample.kernels.group_norm_affine_grads.group_norm_affine_grads_grouped` (a Wide-ResNet's norm layers
    of one stage); a call with only its shift trainable takes the one-call path (a sum)."""
    forms: list[dict[str, Form] | None] = [None] * len(calls)
    groups: dict[tuple, list[int]] = {}
    operands: list[tuple[Tensor, ...] | None] = []
    for i, (call, grad_output) in enumerate(calls):
        if "weight" not in call.params:
            forms[i] = group_norm(call, grad_output, "auto")
            operands.append(None)
            continue
        # The kernel reads each channel's positions by address: (B, C, *spatial) tensors, not reshaped (a view
        # each, with its host time, for nothing).
        x, G = call.args[0].contiguous(), grad_output.contiguous()
        mean, rstd = _statistics(call, x, acc_dtype(x, G))
        operands.append((x, G, mean.contiguous(), rstd.contiguous()))
        groups.setdefault((x.shape, x.dtype, G.dtype, mean.shape, mean.dtype, x.device), []).append(i)
    for members in groups.values():
        sums = _kernel.group_norm_affine_grads_grouped(*([operands[i][k] for i in members] for k in range(4)))
        # Each layer's two gradients as views from two unbinds, not two selects per layer.
        d_weights, d_biases = (t.unbind(0) for t in sums.unbind(1))
        for i, d_weight, d_bias in zip(members, d_weights, d_biases, strict=True):
            forms[i] = _as_forms(calls[i][0], d_weight, d_bias)
    return forms


# Under CUDA autocast GroupNorm runs in float32: the input is cast before the call, so that the copy kept is the
# one the op saves anyway, and the rule casts nothing in the backward.
@register_rule(nn.GroupNorm, params=("weight", "bias"), cast_input="float32", saved=_saved_stats, batched=batched)
def group_norm(call: Call, grad_output: Tensor, strategy: str) -> dict[str, Form]:
    module = call.module
    x = call.args[0]
    B, C, groups = x.shape[0], x.shape[1], module.num_groups
    acc = acc_dtype(x, grad_output)
    x, G = x.reshape(B, C, -1), grad_output.reshape(B, C, -1)
    if "weight" not in call.params:
        return {"bias": Dense(G.sum(2, dtype=acc))}
    mean, rstd = _statistics(call, x, acc)
    if use_triton(x):
        # Both sums in one pass over x and G, finished with the statistics: one launch, not five.
        d_weight, d_bias = _kernel.group_norm_affine_grads(x, G, mean, rstd)
    else:
        d_bias = G.sum(2, dtype=acc)
        sum_gx = _sum_gx(x, G, acc).view(B, groups, -1)
        # Each group's statistics broadcast over its channels: views, no copies per channel.
        d_weight = ((sum_gx - mean.unsqueeze(2) * d_bias.view(B, groups, -1)) * rstd.unsqueeze(2)).view(B, C)
    return _as_forms(call, d_weight, d_bias)
