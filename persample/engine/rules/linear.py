"""nn.Linear: ``y = x W^T + b`` on inputs ``(B, ..., n)``.

Each example's weight gradient is ``G_b^T A_b`` over its positions (``A`` the inputs, ``G`` the output
gradients, both flattened to ``(B, T, .)``): kept as factors (ghost norm) or materialized, whichever is
cheaper (:func:`~persample.engine.forms.outer_or_dense`). The bias gradient is ``G_b`` summed over positions;
next to factors, which keep ``G`` anyway, it is left unsummed (:class:`~persample.engine.forms.Summed`), so
that the biases of same-shaped layers are summed in one op with their weights' stack.
"""

from torch import Tensor, nn

from persample.engine.forms import Form, Outer, Summed, as_dense, outer_or_dense
from persample.engine.registry import Call, register_rule


def affine_forms(call: Call, grad_output: Tensor, strategy: str, weight_transposed: bool) -> dict[str, Form]:
    """The forms of ``y = x W^T + b`` (``weight_transposed``: ``y = x W + b``, W stored as (in, out))."""
    A, G = call.args[0], grad_output
    if A.ndim != 3:
        A, G = A.reshape(A.shape[0], -1, A.shape[-1]), G.reshape(G.shape[0], -1, G.shape[-1])
    forms: dict[str, Form] = {}
    if "weight" in call.params:
        left, right = (A, G) if weight_transposed else (G, A)
        forms["weight"] = outer_or_dense(left, right, call.module.weight.shape, strategy)
    if "bias" in call.params:
        bias = Summed(G)
        forms["bias"] = bias if isinstance(forms.get("weight"), Outer) else as_dense(bias)
    return forms


@register_rule(nn.Linear, params=("weight", "bias"), cast_input=True)
def linear(call: Call, grad_output: Tensor, strategy: str) -> dict[str, Form]:
    return affine_forms(call, grad_output, strategy, weight_transposed=False)
