"""The engine's post-backward — norms, clipping factors and clipped sums — captured once in a CUDA graph and
replayed (``GhostClipping(..., cuda_graph=True)``).

After the backward, a step holds each parameter's per-example gradient in factored form (the stacks, the packed
Dense block and the remaining forms) and runs about a hundred small ops on them. On a GPU each op is a launch
and some Python: a step of small layers waits on the host for that part, not on the GPU. With the same shapes
every step, the ops can be captured in a CUDA graph once and replayed with one launch:

1. The step's factor tensors, in a fixed order, and a signature of their shapes, dtypes and the parameters
   they belong to. A new signature (another batch size, say) is captured anew; the last ``keep`` are kept.
2. Capture: the factors are copied into static buffers, the post-backward runs once on a side stream (warm-up,
   as CUDA graphs require) and once under capture.
3. Replay: the factors are copied into the static buffers in one multi-tensor copy (a pass over them on the
   GPU, no op per tensor), the step's own copies are released, the graph is replayed.

The norms and clipped sums come back in the graph's static output buffers: the next call with the same shapes
overwrites them. The static inputs stay allocated between steps: the factors' size in extra memory.
"""

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from persample.engine.forms import Dense, Outer, Rows
from persample.engine.stacks import OuterStack

Post = Callable[[object], tuple[Tensor, dict]]


# The tensor fields of each form a step holds after the backward (Summed forms are Dense by then).
_TENSOR_FIELDS = {Dense: ("g",), Outer: ("G", "A"), Rows: ("G", "index"), OuterStack: ("G", "A")}


def _flatten(step) -> tuple[list[Tensor], tuple, Callable[[list[Tensor]], object]]:
    """``(tensors, signature, rebuild)``: the step's factor tensors in a fixed order, what a graph of the
    post-backward depends on, and ``rebuild(tensors)``, a copy of the step that holds other tensors instead."""
    tensors: list[Tensor] = []
    signature: list = [step.batch_size]

    def place(t: Tensor) -> int:
        tensors.append(t)
        signature.append((tuple(t.shape), t.dtype, t.device))
        return len(tensors) - 1

    def take(obj) -> tuple:
        """``obj`` and its tensor fields' places in ``tensors``; its other fields go into the signature."""
        places = [(name, place(getattr(obj, name))) for name in _TENSOR_FIELDS[type(obj)]]
        signature.append((type(obj), getattr(obj, "shape", None), tuple(map(id, getattr(obj, "params", ()))),
                          None if getattr(obj, "biases", None) is None else tuple(map(id, obj.biases))))
        return obj, places

    packed = [(place(flat), params) for flat, params in step.packed]
    signature.append(tuple(tuple(map(id, params)) for _, params in step.packed))
    stacks = [take(s) for s in step.stacks]
    forms = []
    for p, fs in step.forms.items():
        signature.append(id(p))
        forms.append((p, [take(f) for f in fs]))

    def rebuild(new: list[Tensor]):
        def made(obj, places):
            return replace(obj, **{name: new[i] for name, i in places})

        out = copy.copy(step)
        out.packed = [(new[i], params) for i, params in packed]
        out.stacks = [made(*s) for s in stacks]
        out.forms = {p: [made(*f) for f in fs] for p, fs in forms}
        return out

    return tensors, tuple(signature), rebuild


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]
    norms: Tensor
    grads: dict


class GraphedPost:
    """``post(step) -> (norms, grads)`` through CUDA graphs, one per signature of the step (see the module
    docstring). ``post`` must only read the step's tensors, launch no host sync and use no random numbers."""

    def __init__(self, post: Post, keep: int = 2):
        self.post = post
        self.keep = keep
        self._captured: OrderedDict[tuple, _Captured] = OrderedDict()

    def __call__(self, step) -> tuple[Tensor, dict]:
        tensors, signature, rebuild = _flatten(step)
        captured = self._captured.get(signature)
        if captured is None:
            captured = self._capture(tensors, rebuild)
            self._captured[signature] = captured
            while len(self._captured) > self.keep:
                self._captured.popitem(last=False)
        else:
            self._captured.move_to_end(signature)
            torch._foreach_copy_(captured.inputs, tensors)
        del tensors
        step.packed, step.stacks, step.forms = [], [], {}  # the step's own factors are no longer needed
        captured.graph.replay()
        return captured.norms, captured.grads

    def _capture(self, tensors: list[Tensor], rebuild) -> _Captured:
        inputs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
        torch._foreach_copy_(inputs, tensors)
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self.post(rebuild(inputs))  # warm-up, off the capture
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            norms, grads = self.post(rebuild(inputs))
        return _Captured(graph, inputs, norms, grads)
