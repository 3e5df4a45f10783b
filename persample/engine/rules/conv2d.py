"""nn.Conv2d: a Linear over unfolded patches.

With ``A`` the patches of ``x`` ``(B, L, C_in * kh * kw)`` (``L`` output positions) and ``G`` the output
gradients ``(B, L, C_out)``, each example's weight gradient is ``G_b^T A_b`` — the Linear rule's factors,
kept or materialized by the same cost test. Grouped convolutions are materialized group by group. The
padding (any mode) is applied with ``F.pad``, then the patches are strided views of the padded input,
copied once into ``A``: ``F.unfold`` would give the same values, but on CUDA it launches one ``im2col``
kernel per example (256 launches per layer at a batch of 256, most of a small CNN's step).
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


def _patches(module: nn.Conv2d, x: Tensor) -> Tensor:
    """``(B, L, C * kh * kw)``: the input patch of every output position, channels outermost (the order of
    ``weight.reshape(C_out, -1)``)."""
    pads = _explicit_padding(module)
    if any(pads):
        x = F.pad(x, pads, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    for dim, k, d, s in zip((2, 3), module.kernel_size, module.dilation, module.stride, strict=True):
        # A window spanning d * (k - 1) + 1 inputs, of which every d-th is a tap: views only.
        x = x.unfold(dim, d * (k - 1) + 1, s)[..., ::d]
    B, C, Lh, Lw, kh, kw = x.shape  # after the unfolds: (B, C, Lh, Lw, kh, kw) with the taps last
    return x.permute(0, 2, 3, 1, 4, 5).reshape(B, Lh * Lw, C * kh * kw)


@register_rule(nn.Conv2d, params=("weight", "bias"), cast_input=True)
def conv2d(call: Call, grad_output: Tensor, strategy: str) -> dict[str, Form]:
    module = call.module
    A = _patches(module, call.args[0])
    B, L = A.shape[0], A.shape[1]
    G = grad_output.reshape(B, module.out_channels, L)
    forms: dict[str, Form] = {}
    if "weight" in call.params:
        shape = module.weight.shape
        if module.groups == 1:
            forms["weight"] = outer_or_dense(G.transpose(1, 2), A, shape, strategy)
        else:
            g = module.groups
            per_group = torch.einsum("bgol,blgc->bgoc", G.reshape(B, g, -1, L), A.reshape(B, L, g, -1).to(G.dtype))
            forms["weight"] = Dense(per_group.reshape(B, *shape).to(acc_dtype(G)))
    if "bias" in call.params:
        forms["bias"] = Dense(G.sum(2, dtype=acc_dtype(G)))
    return forms
