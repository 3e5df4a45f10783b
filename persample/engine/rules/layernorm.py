"""nn.LayerNorm and nn.RMSNorm: an elementwise scale (and shift) of the normalized input ``x_hat``.

Each example's gradients are materialized (they are as small as the parameters): ``sum G * x_hat`` for the
scale and ``sum G`` for the shift, summed over the positions between the batch and the normalized dims, in
float32 (float64 for float64 inputs). On the Triton path (CUDA, or ``TRITON_INTERPRET=1``) one kernel
recomputes ``x_hat`` from the saved input and forms both sums
(:mod:`persample.kernels.norm_affine_grads`); elsewhere PyTorch ops do the same. There the engine holds the calls
until the end of the backward and :func:`batched` computes all calls of one shape in one launch: a transformer's
two norm layers per block are then one launch, not one each with its host time around it.
"""

import math

import torch
from torch import Tensor, nn

from persample.backend import use_triton
from persample.engine.forms import Dense, Form, acc_dtype
from persample.engine.registry import Call, register_rule
from persample.kernels import norm_affine_grads as _kernel


def _eps(call: Call) -> float:
    # nn.RMSNorm's default eps is that of the input's dtype, not of the float32 copy.
    eps = call.module.eps
    return eps if eps is not None else torch.finfo(call.args[0].dtype).eps


def _as_forms(call: Call, d_scale: Tensor, d_shift: Tensor) -> dict[str, Form]:
    forms: dict[str, Form] = {}
    if "weight" in call.params:
        forms["weight"] = Dense(d_scale)
    if "bias" in call.params:
        forms["bias"] = Dense(d_shift)
    return forms


def _rows(call: Call, grad_output: Tensor) -> tuple[Tensor, Tensor]:
    """The call's input and output gradient as ``(B, P, D)`` rows, the last dimension contiguous."""
    x = call.args[0]
    D = math.prod(call.module.normalized_shape)
    x, g = x.reshape(x.shape[0], -1, D), grad_output.reshape(x.shape[0], -1, D)
    return x if x.stride(-1) == 1 else x.contiguous(), g if g.stride(-1) == 1 else g.contiguous()


def _forms(call: Call, grad_output: Tensor, eps: float, center: bool) -> dict[str, Form]:
    x = call.args[0]
    shape = tuple(call.module.normalized_shape)
    dims, D = len(shape), math.prod(shape)
    B = x.shape[0]
    if use_triton(x) and D <= _kernel.MAX_FEATURES:
        sums = _kernel.norm_affine_grads(*_rows(call, grad_output), eps, center)
        d_scale, d_shift = sums[0].view(B, *shape), sums[1].view(B, *shape)
    else:
        acc = acc_dtype(x)
        if center:
            x_hat = torch.native_layer_norm(x.to(acc), shape, None, None, eps)[0]
        else:
            x_hat = torch.rms_norm(x.to(acc), shape, None, eps)
        G = grad_output.to(x_hat.dtype)
        positions = tuple(range(1, G.ndim - dims))
        d_scale = (G * x_hat).sum(positions) if positions else G * x_hat
        d_shift = G.sum(positions) if positions else G
    return _as_forms(call, d_scale, d_shift)


def batched(calls: list[tuple[Call, Tensor]]) -> list[dict[str, Form]]:
    """The forms of ``calls`` (LayerNorm and RMSNorm calls with their output gradients): the calls whose rows have
    one shape, dtypes, strides, device, eps and kind share one launch of
    :func:`~persample.kernels.norm_affine_grads.norm_affine_grads_grouped`; rows wider than the kernel's take
    the one-call path."""
    forms: list[dict[str, Form] | None] = [None] * len(calls)
    groups: dict[tuple, list[int]] = {}
    rows = []
    for i, (call, grad_output) in enumerate(calls):
        center, eps = isinstance(call.module, nn.LayerNorm), _eps(call)
        if math.prod(call.module.normalized_shape) > _kernel.MAX_FEATURES:
            forms[i] = _forms(call, grad_output, eps, center)
            rows.append(None)
            continue
        x, g = _rows(call, grad_output)
        rows.append((x, g))
        key = (x.shape, x.dtype, x.stride(), g.dtype, g.stride(), x.device, eps, center)
        groups.setdefault(key, []).append(i)
    for (_, _, _, _, _, _, eps, center), members in groups.items():
        sums = _kernel.norm_affine_grads_grouped([rows[i][0] for i in members], [rows[i][1] for i in members],
                                                 eps, center)
        for i, layer in zip(members, sums, strict=True):
            call = calls[i][0]
            shape = (call.args[0].shape[0], *call.module.normalized_shape)
            forms[i] = _as_forms(call, layer[0].view(shape), layer[1].view(shape))
    return forms


@register_rule(nn.LayerNorm, params=("weight", "bias"), batched=batched)
def layer_norm(call: Call, grad_output: Tensor, strategy: str) -> dict[str, Form]:
    return _forms(call, grad_output, _eps(call), center=True)


@register_rule(nn.RMSNorm, params=("weight",), batched=batched)
def rms_norm(call: Call, grad_output: Tensor, strategy: str) -> dict[str, Form]:
    return _forms(call, grad_output, _eps(call), center=False)
