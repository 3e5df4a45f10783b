"""nn.LayerNorm and nn.RMSNorm: an elementwise scale (and shift) of the normalized input ``x_hat``.

Each example's gradients are materialized (they are as small as the parameters): ``sum G * x_hat`` for the
scale and ``sum G`` for the shift, summed over the positions between the batch and the normalized dims.
``x_hat`` is recomputed from the saved input in float32 (float64 for float64 inputs), in one kernel.
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
    x_hat = torch.native_layer_norm(x.to(acc_dtype(x)), module.normalized_shape, None, None, module.eps)[0]
    return _scale_and_shift(call, grad_output, x_hat, len(module.normalized_shape))


@register_rule(nn.RMSNorm, params=("weight",))
def rms_norm(call: Call, grad_output: Tensor, strategy: str) -> dict[str, Form]:
    module = call.module
    x = call.args[0]
    # nn.RMSNorm's default eps is that of the input's dtype, not of the float32 copy.
    eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
    x_hat = torch.rms_norm(x.to(acc_dtype(x)), module.normalized_shape, None, eps)
    return _scale_and_shift(call, grad_output, x_hat, len(module.normalized_shape))
