"""nn.GroupNorm: a per-channel scale (and shift) of the input normalized over each group of channels.

Each example's gradients are materialized (they are as small as the parameters): ``sum G * x_hat`` for the
scale and ``sum G`` for the shift over the positions after the channel dimension (``x: (B, C, *)``), in float32
(float64 for float64 inputs), with ``x_hat`` recomputed from the saved input by ``F.group_norm`` without affine.
"""

import torch.nn.functional as F
from torch import Tensor, nn

from persample.engine.forms import Dense, Form, acc_dtype
from persample.engine.registry import Call, register_rule


@register_rule(nn.GroupNorm, params=("weight", "bias"))
def group_norm(call: Call, grad_output: Tensor, strategy: str) -> dict[str, Form]:
    x = call.args[0]
    module = call.module
    acc = acc_dtype(x)
    x_hat = F.group_norm(x.to(acc), module.num_groups, None, None, module.eps)
    G = grad_output.to(acc)
    positions = tuple(range(2, G.ndim))
    forms: dict[str, Form] = {}
    if "weight" in call.params:
        forms["weight"] = Dense((G * x_hat).sum(positions) if positions else G * x_hat)
    if "bias" in call.params:
        forms["bias"] = Dense(G.sum(positions) if positions else G)
    return forms
