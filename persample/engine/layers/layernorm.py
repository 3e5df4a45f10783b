"""nn.LayerNorm and nn.RMSNorm: an elementwise scale (and shift) of the normalized input ``x_hat``.

Each example's gradients are materialized (they are as small as the parameters): ``sum G * x_hat`` for the
scale and ``sum G`` for the shift, summed over the positions between the batch and the normalized dims.
``x_hat`` is recomputed from the saved input in float32 (float64 for float64 inputs).
"""

import torch
from torch import Tensor, nn

from persample.engine.forms import Dense, Form, acc_dtype
from persample.engine.registry import Call, register_rule


def _scale_and_shift(call: Call, grad_output: Tensor, x_hat: Tensor, dims: int) -> dict[str, Form]:
    G = grad_output.to(x_hat.dtype)
    positions = tuple(range(1, G.ndim - dims))
    forms: dict[str, Form] = {}
    if "weight" in call.params:
        gw = G * x_hat
        forms["weight"] = Dense(gw.sum(positions) if positions else gw)
    if "bias" in call.params:
        forms["bias"] = Dense(G.sum(positions) if positions else G)
    return forms


@register_rule(nn.LayerNorm, params=("weight", "bias"))
def layer_norm(call: Call, grad_output: Tensor, strategy: str) -> dict[str, Form]:
    module = call.module
    x = call.args[0]
    dims = len(module.normalized_shape)
    x = x.to(acc_dtype(x))
    var, mean = torch.var_mean(x, dim=tuple(range(-dims, 0)), correction=0, keepdim=True)
    return _scale_and_shift(call, grad_output, (x - mean) * torch.rsqrt(var + module.eps), dims)


@register_rule(nn.RMSNorm, params=("weight",))
def rms_norm(call: Call, grad_output: Tensor, strategy: str) -> dict[str, Form]:
    module = call.module
    x = call.args[0]
    dims = len(module.normalized_shape)
    eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
    x = x.to(acc_dtype(x))
    mean_square = x.square().mean(dim=tuple(range(-dims, 0)), keepdim=True)
    return _scale_and_shift(call, grad_output, x * torch.rsqrt(mean_square + eps), dims)
