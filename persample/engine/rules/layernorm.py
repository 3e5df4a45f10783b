"""nn.LayerNorm and nn.RMSNorm: an elementwise scale (and shift) of the normalized input ``x_hat``.

Each example's gradients are materialized (they are as small as the parameters): ``sum G * x_hat`` for the
scale and ``sum G`` for the shift, summed over the positions between the batch and the normalized dims, in
float32 (float64 for float64 inputs). On the Triton path (CUDA, or ``TRITON_INTERPRET=1``) one kernel
recomputes ``x_hat`` from the saved input and forms both sums
(:mod:`persample.kernels.norm_affine_grads`); elsewhere PyTorch ops do the same.
"""

import math

import torch
from torch import Tensor, nn

from persample.backend import use_triton
from persample.engine.forms import Dense, Form, acc_dtype
from persample.engine.registry import Call, register_rule
from persample.kernels import norm_affine_grads as _kernel


def _forms(call: Call, grad_output: Tensor, eps: float, center: bool) -> dict[str, Form]:
    x = call.args[0]
    shape = tuple(call.module.normalized_shape)
    dims, D = len(shape), math.prod(shape)
    B = x.shape[0]
    if use_triton(x) and D <= _kernel.MAX_FEATURES:
        sums = _kernel.norm_affine_grads(x.reshape(B, -1, D), grad_output.reshape(B, -1, D), eps, center)
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
    forms: dict[str, Form] = {}
    if "weight" in call.params:
        forms["weight"] = Dense(d_scale)
    if "bias" in call.params:
        forms["bias"] = Dense(d_shift)
    return forms


@register_rule(nn.LayerNorm, params=("weight", "bias"))
def layer_norm(call: Call, grad_output: Tensor, strategy: str) -> dict[str, Form]:
    return _forms(call, grad_output, call.module.eps, center=True)


@register_rule(nn.RMSNorm, params=("weight",))
def rms_norm(call: Call, grad_output: Tensor, strategy: str) -> dict[str, Form]:
    # nn.RMSNorm's default eps is that of the input's dtype, not of the float32 copy.
    eps = call.module.eps if call.module.eps is not None else torch.finfo(call.args[0].dtype).eps
    return _forms(call, grad_output, eps, center=False)
