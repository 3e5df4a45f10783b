"""transformers' ``Conv1D`` (GPT-2's attention and MLP layers): ``y = x W + b`` with ``W (in, out)``, a Linear
whose weight is stored transposed.

Each example's weight gradient is ``A_b^T G_b`` (``A`` the inputs, ``G`` the output gradients, flattened to
``(B, T, .)``): the Linear rule's factors with their roles swapped, kept or materialized by the same cost
test. The bias gradient is ``G_b`` summed over positions. transformers stays an optional dependency: the
rule is registered by the class's import path, and only a model that holds a ``Conv1D`` meets it.
"""

from torch import Tensor

from persample.engine.forms import Form, Outer, Summed, as_dense, outer_or_dense
from persample.engine.registry import Call, register_rule


@register_rule("transformers.pytorch_utils.Conv1D", params=("weight", "bias"), cast_input=True)
def conv1d(call: Call, grad_output: Tensor, strategy: str) -> dict[str, Form]:
    A, G = call.args[0], grad_output
    if A.ndim != 3:
        A, G = A.reshape(A.shape[0], -1, A.shape[-1]), G.reshape(G.shape[0], -1, G.shape[-1])
    forms: dict[str, Form] = {}
    if "weight" in call.params:
        forms["weight"] = outer_or_dense(A, G, call.module.weight.shape, strategy)
    if "bias" in call.params:
        # Unsummed only next to factors, which hold G anyway; it is then summed once, packed with the others.
        bias = Summed(G)
        forms["bias"] = bias if isinstance(forms.get("weight"), Outer) else as_dense(bias)
    return forms
