"""nn.Embedding: each example's table gradient has the output gradients of its positions in the rows they
looked up (a :class:`~persample.engine.forms.Rows` form; norms compare indices, no ``(V, d)`` matrix).

``padding_idx`` rows get no gradient, as in ``F.embedding``; ``scale_grad_by_freq`` divides by the
frequency of each index in the whole call's input, which is what the batch gradient does, split by example.
"""

import torch
from torch import Tensor, nn

from persample.engine.forms import Dense, Form, Rows
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
    if module.scale_grad_by_freq:
        counts = torch.bincount(index.reshape(-1), minlength=module.num_embeddings)
        G = G / counts[index][:, :, None].to(G.dtype)
    if strategy != "materialize":
        return {"weight": Rows(G, index, module.weight.shape)}
    V, d = module.weight.shape
    offset = index + V * torch.arange(B, device=index.device)[:, None]
    g = torch.zeros(B * V, d, dtype=G.dtype, device=G.device).index_add_(0, offset.reshape(-1), G.reshape(-1, d))
    return {"weight": Dense(g.reshape(B, V, d))}
