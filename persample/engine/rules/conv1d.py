"""transformers' ``Conv1D`` (GPT-2's attention and MLP layers): ``y = x W + b`` with ``W (in, out)``, a Linear
whose weight is stored transposed.

Each example's weight gradient is ``A_b^T G_b`` (``A`` the inputs, ``G`` the output gradients, flattened to
``(B, T, .)``): the Linear rule's factors with their roles swapped, kept or materialized by the same cost
test. The bias gradient is ``G_b`` summed over positions. transformers stays an optional dependency: the
rule is registered by the class's import path, and only a model that holds a ``Conv1D`` meets it.
"""

from torch import Tensor

from persample.engine.forms import Form
from persample.engine.registry import Call, register_rule
from persample.engine.rules.linear import affine_forms


@register_rule("transformers.pytorch_utils.Conv1D", params=("weight", "bias"), cast_input=True)
def conv1d(call: Call, grad_output: Tensor, strategy: str) -> dict[str, Form]:
    return affine_forms(call, grad_output, strategy, weight_transposed=True)
