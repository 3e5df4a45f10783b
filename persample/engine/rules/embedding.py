"""nn.Embedding: each example's table gradient has the output gradients of its positions in the rows they
looked up (a :class:`~persample.engine.forms.Rows` form; norms compare indices, no ``(V, d)`` matrix).

``padding_idx`` rows get no gradient, as in ``F.embedding``; ``scale_grad_by_freq`` divides by the
frequency of each index in the example's own input, as ``vmap`` over the examples does.
"""

import torch
from torch import Tensor, nn

from persample.engine.forms import Dense, Form, Rows, acc_dtype
from persample.engine.registry import Call, register_rule


@register_rule(nn.Embedding, params=("weight",))
def embedding(call: Call, grad_output: Tensor, strategy: str) -> dict[str, Form]:
    module = call.module
    index = call.args[0]
    B = index.shape[0]
    index = index.reshape(B, -1).long()
    G = grad_output.reshape(B, index.shape[1], -1)
    if module.padding_idx is not None:
        G = G.masked_fill((index == module.padding_idx)[:, :, None], 0)
    V, d = module.weight.shape
    if module.scale_grad_by_freq or strategy == "materialize":
        # Row b * V + v of a (B * V, d) table is example b's row v.
        offset = index + V * torch.arange(B, device=index.device)[:, None]
    if module.scale_grad_by_freq:
        counts = torch.bincount(offset.reshape(-1), minlength=B * V)
        G = G / counts[offset][:, :, None].to(G.dtype)
    if strategy != "materialize":
        return {"weight": Rows(G, index, module.weight.shape)}
    g = torch.zeros(B * V, d, dtype=acc_dtype(G), device=G.device)
    return {"weight": Dense(g.index_add_(0, offset.reshape(-1), G.reshape(-1, d).to(g.dtype)).reshape(B, V, d))}
