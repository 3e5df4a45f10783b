"""nn.Conv2d: a Linear over unfolded patches.

With ``A = unfold(x)`` ``(B, L, C_in/groups * kh * kw)`` (``L`` output positions) and ``G`` the output
gradients ``(B, L, C_out)``, each example's weight gradient is ``G_b^T A_b`` — the Linear rule's factors,
kept or materialized by the same cost test. Grouped convolutions are materialized group by group. Padding
modes other than zeros and string paddings are applied with ``F.pad`` before unfolding.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from persample.engine.forms import Dense, Form, acc_dtype, outer_or_dense
from persample.engine.registry import Call, register_rule


def _explicit_padding(module: nn.Conv2d) -> list[int]:
    """F.pad's ``[left, right, top, bottom]`` for the module's padding."""
    if module.padding == "valid":
        return [0, 0, 0, 0]
    if module.padding == "same":
        pads = []
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    ph, pw = module.padding
    return [pw, pw, ph, ph]


@register_rule(nn.Conv2d, params=("weight", "bias"), cast_input=True)
def conv2d(call: Call, grad_output: Tensor, strategy: str) -> dict[str, Form]:
    module = call.module
    x = call.args[0]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, _explicit_padding(module), mode=mode)
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)  # (B, C k k, L)
    B, L = cols.shape[0], cols.shape[2]
    G = grad_output.reshape(B, module.out_channels, L)
    forms: dict[str, Form] = {}
    if "weight" in call.params:
        shape = module.weight.shape
        if module.groups == 1:
            forms["weight"] = outer_or_dense(G.transpose(1, 2), cols.transpose(1, 2), shape, strategy)
        else:
            g = module.groups
            per_group = torch.einsum("bgol,bgcl->bgoc", G.reshape(B, g, -1, L), cols.reshape(B, g, -1, L).to(G.dtype))
            forms["weight"] = Dense(per_group.reshape(B, *shape).to(acc_dtype(G)))
    if "bias" in call.params:
        forms["bias"] = Dense(G.sum(2, dtype=acc_dtype(G)))
    return forms
