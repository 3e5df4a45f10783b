"""Which module calls use which trainable parameters: found once by running the forward under a
``TorchFunctionMode``.

Every torch function that receives a trainable parameter is attributed to the innermost module whose
``forward`` is running. That is what the engine needs to be exact: a rule (or the fallback) of module ``M``
accounts for the parameters used inside ``M.forward`` outside its children's calls — including a child's
parameter used directly (``nn.MultiheadAttention`` passes ``out_proj.weight`` to a function and never calls
``out_proj``), which the fallback of ``M`` then covers. Property reads (``.shape``, ``.dtype``) produce no
tensor and are not uses.

A wrapper may swap a module's parameters for others during its forward: ``fully_shard`` (FSDP2) registers
the gathered, unsharded parameter in place of the sharded DTensor while the module runs. A parameter seen
at a module's call in the slot of a trainable one stands for it, so uses are found, and reported, in terms
of the model's own parameters.
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves


class _Recorder(TorchFunctionMode):
    def __init__(self, trainable: dict[int, nn.Parameter], stack: list[nn.Module], found: set):
        super().__init__()
        self.trainable, self.stack, self.found = trainable, stack, found
        self.stand_ins: dict[int, nn.Parameter] = {}  # id of a swapped-in parameter -> the model's own

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.stack and any(isinstance(v, Tensor) for v in tree_leaves(out)):
            for v in tree_leaves((args, kwargs)):
                if isinstance(v, nn.Parameter):
                    p = self.trainable.get(id(v), self.stand_ins.get(id(v)))
                    if p is not None:
                        self.found.add((self.stack[-1], id(p)))
        return out


def parameter_uses(model: nn.Module, forward: Callable[[], object], trainable: dict[int, nn.Parameter],
                   ) -> dict[nn.Module, dict[str, nn.Parameter]]:
    """``{module: {name relative to module: parameter}}`` for every module whose forward used trainable
    parameters directly, from one run of ``forward()`` (under ``no_grad``).

    Raises:
        ValueError: a parameter used inside a module that does not own it (not in its subtree).
    """
    stack: list[nn.Module] = []
    found: set[tuple[nn.Module, int]] = set()
    handles = []
    recorder = _Recorder(trainable, stack, found)
    own = {(m, name): p for m in model.modules() for name, p in m._parameters.items() if id(p) in trainable}

    def enter(module, args):
        stack.append(module)
        for name, p in module._parameters.items():
            mine = own.get((module, name))
            if mine is not None and p is not mine:
                recorder.stand_ins[id(p)] = mine

    def leave(module, args, output):
        stack.pop()

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    cuda = sorted({p.device.index or 0 for p in trainable.values() if p.device.type == "cuda"})
    try:
        # The extra forward must not advance the random streams (dropout) of the step that follows.
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), recorder:
            forward()
    finally:
        for h in handles:
            h.remove()

    module_names = {m: n for n, m in model.named_modules(remove_duplicate=False)}
    uses: dict[nn.Module, dict[str, nn.Parameter]] = {}
    for module, pid in found:
        names = {id(p): n for n, p in reversed(list(module.named_parameters(remove_duplicate=False)))}
        if pid not in names:
            raise ValueError(f"a parameter of shape {tuple(trainable[pid].shape)} is used inside "
                             f"{type(module).__name__} '{module_names.get(module, '?')}', which does not own it: "
                             "the engine attributes each use of a parameter to the module call it happens in, "
                             "so the module must hold the parameter (e.g. register the tied weight on it)")
        uses.setdefault(module, {})[names[pid]] = trainable[pid]
    order = {m: i for i, m in enumerate(model.modules())}
    return dict(sorted(uses.items(), key=lambda kv: order[kv[0]]))
