"""Any other module with parameters: each example's gradients from ``torch.func``.

For one call of the module, example ``b``'s gradient of the parameters the call used is the gradient of
``sum_k <out_k(x_b), G_k[b]>`` (``out_k`` the call's outputs, ``G_k`` their gradients from the backward):
``vmap(grad(...))`` over the examples, re-running the module's forward on each example with a batch of
one (so modules that require a batch dimension work). Exact for any module, at the cost of a per-example
forward and backward through it; the results are materialized (:class:`~persample.engine.forms.Dense`).
"""

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

from persample.engine.forms import Dense, Form
from persample.engine.registry import Call


def per_example_grads(call: Call, grad_outputs: list[Tensor | None], is_batched: Callable[[Tensor], bool],
                      constant: list[nn.Module] = ()) -> dict[str, Form]:
    """``{name: Dense (B, *shape)}`` for ``call.params``; ``grad_outputs`` follow the flattened outputs
    (None for outputs that received no gradient).

    The outputs of the submodules in ``constant`` are detached while the module re-runs: they use some of
    the same parameters, and those uses are accounted for by their own records (a table looked up by an
    ``nn.Embedding`` child and multiplied directly by its parent, as a hand-tied LM head does).
    """
    leaves, spec = tree_flatten((call.args, call.kwargs))
    dims = [0 if isinstance(v, Tensor) and is_batched(v) else None for v in leaves]
    used = [i for i, g in enumerate(grad_outputs) if g is not None]
    params = {name: p.detach() for name, p in call.params.items()}

    def contribution(params, leaves, grads):
        leaves = [v.unsqueeze(0) if d == 0 else v for v, d in zip(leaves, dims, strict=True)]
        args, kwargs = tree_unflatten(leaves, spec)
        with torch.autocast(*call.autocast) if call.autocast else nullcontext():
            outputs = tree_flatten(functional_call(call.module, params, args, kwargs))[0]
        return sum((outputs[i].to(g.dtype) * g.unsqueeze(0)).sum(dtype=torch.float64 if g.dtype == torch.float64
                   else torch.float32) for i, g in zip(used, grads, strict=True))

    grads = [grad_outputs[i] for i in used]
    handles = [m.register_forward_hook(_detached) for m in constant]
    try:
        per_example = vmap(grad(contribution), in_dims=(None, dims, 0))(params, leaves, grads)
    except RuntimeError as error:
        if not any(word in str(error) for word in ("vmap", "functorch", "transform")):
            raise
        # The wording of persample.per_sample_grads, which meets the same modules.
        raise ValueError(
            f"{type(call.module).__name__} cannot be run one example at a time under torch.func.vmap (data-dependent "
            "Python control flow, .item(), in-place updates of buffers, or an op without a batching rule), which "
            f"the engine does for modules without a rule; torch said: {error}") from error
    finally:
        for h in handles:
            h.remove()
    return {name: Dense(g) for name, g in per_example.items()}


def _detached(module: nn.Module, args: tuple, output):
    return tree_map_only(Tensor, Tensor.detach, output)
