"""The engine through CUDA graphs: its post-backward (``GhostClipping(..., cuda_graph="post")``, :class:`GraphedPost`)
or its whole step (``cuda_graph="step"``, :class:`GraphedStep`), captured once per set of shapes and replayed.

Neither captures anything for an empty batch: the engine answers ``B = 0`` before it gets here (zero sums,
empty norms and losses, as eagerly).

**The post-backward** — norms, clipping factors and clipped sums:

After the backward, a step holds each parameter's per-example gradient in factored form (the stacks, the packed
Dense block and the remaining forms) and runs about a hundred small ops on them. On a GPU each op is a launch
and some Python: a step of small layers waits on the host for that part, not on the GPU. With the same shapes
every step, the ops can be captured in a CUDA graph once and replayed with one launch:

1. The step's factor tensors and the losses, in a fixed order, and a signature of their shapes, dtypes and the
   parameters they belong to. A new signature (another batch size, say) is captured anew; the last ``keep`` are
   kept.
2. Capture: the factors are copied into static buffers, the post-backward runs once on a side stream (warm-up,
   as CUDA graphs require) and once under capture.
3. Replay: the factors are copied into the static buffers in one multi-tensor copy (a pass over them on the
   GPU, no op per tensor), the step's own copies are released, the graph is replayed.

The norms, clipped sums and the mask of finite examples come back in the graph's static output buffers: the next
call with the same shapes overwrites them. The static inputs stay allocated between steps: the factors' size in
extra memory.

**The whole step** — forward with the engine's hooks, loss side, backward, post-backward — for a step of small
layers, where the host's Python and launches take longer than the GPU's work:

1. The inputs and targets are copied into static buffers, the step runs twice eagerly on a side stream (warm-up:
   kernels compiled, a bad target raises here) and once under capture. Hooks and rules run during the capture
   only; the parameters are read in place at every replay, so optimizer updates between steps are seen.
2. Replay: the target check's small kernel runs eagerly on the call's own targets (the graph cannot wait for
   it), the inputs are copied in, the graph is replayed, and the check is waited for before returning.
3. The mask of finite examples, which the host must read before the step returns, is copied inside the graph to
   pinned host memory as soon as the norms give it, and the graph records an event behind that copy (an external
   event, which a replay records anew). The host waits for that event: for the norms, not for the whole replay,
   and goes on to queue the noise and the optimizer's update while the GPU forms the clipped sums (as the eager
   step does; waiting for the replay's end left the GPU idle while the host queued them).

Everything the step allocates lives in the graph's private memory pool between replays (about a step's peak),
and its results are overwritten by the next replay with the same shapes. The model must be capturable: no host
synchronization, no data-dependent shapes or control flow in its forward. Dropout draws new numbers each replay
(PyTorch advances the CUDA generator's offset per replay).
"""

import copy
import functools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from persample.engine.forms import Dense, Implicit, Outer, Rows
from persample.engine.stacks import OuterStack

Post = Callable[[object, Tensor], tuple]


# The tensor fields of each form a step holds after the backward (Summed forms are Dense by then).
_TENSOR_FIELDS = {Dense: ("g",), Outer: ("G", "A"), Rows: ("G", "index"), Implicit: ("x", "G"),
                  OuterStack: ("G", "A")}


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
        signature.append((type(obj), getattr(obj, "shape", None), getattr(obj, "ops", None),
                          tuple(map(id, getattr(obj, "params", ()))),
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


class _Recent(OrderedDict):
    """The graphs captured for the last ``keep`` signatures."""

    def __init__(self, keep: int):
        super().__init__()
        self.keep = keep

    def get_or_capture(self, signature: tuple, capture: Callable[[], object]) -> tuple[object, bool]:
        """``(entry, fresh)``: the entry of ``signature``, made by ``capture()`` (``fresh``) if there is none."""
        entry = self.get(signature)
        if entry is not None:
            self.move_to_end(signature)
            return entry, False
        entry = self[signature] = capture()
        while len(self) > self.keep:
            self.popitem(last=False)
        return entry, True


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]
    outputs: tuple


class GraphedPost:
    """``post(step, losses) -> outputs`` (a tuple: norms, clipped sums, finite mask) through CUDA graphs, one per
    signature of the step (see the module docstring). ``post`` must only read the step's tensors and the losses
    ``(B,)``, launch no host sync and use no random numbers; ``state()`` is what else it depends on (the clipping
    bound), compared at every call."""

    def __init__(self, post: Post, state: Callable[[], tuple] = tuple, keep: int = 2):
        self.post = post
        self.state = state
        self._captured = _Recent(keep)

    def __call__(self, step, losses: Tensor) -> tuple:
        tensors, signature, rebuild = _flatten(step)
        tensors.append(losses)
        signature = (*signature, (tuple(losses.shape), losses.dtype, losses.device))
        captured, fresh = self._captured.get_or_capture((signature, self.state()),
                                                        functools.partial(self._capture, tensors, rebuild))
        if not fresh:
            torch._foreach_copy_(captured.inputs, tensors)
        del tensors
        step.packed, step.stacks, step.forms = [], [], {}  # the step's own factors are no longer needed
        captured.graph.replay()
        return captured.outputs

    def _capture(self, tensors: list[Tensor], rebuild) -> _Captured:
        inputs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
        torch._foreach_copy_(inputs, tensors)
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self.post(rebuild(inputs[:-1]), inputs[-1])  # warm-up, off the capture
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.post(rebuild(inputs[:-1]), inputs[-1])
        return _Captured(graph, inputs, outputs)


Step = Callable[[tuple, Tensor], tuple[object, Callable[[], None], int | None]]
Check = Callable[[Tensor, int | None], Callable[[], None]]


@dataclass
class _CapturedStep:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]
    result: object
    classes: int | None
    early: Tensor | None = None  # pinned host copy of the step's early output, written by the graph
    copied: torch.cuda.Event | None = None  # recorded by the graph once ``early`` is copied


class GraphedStep:
    """``graphed(args, targets) -> (result, read)``: ``step`` through CUDA graphs, one per signature of its inputs
    (see the module docstring); ``read()`` waits for the step's early output and returns it on the host.

    ``step(args, targets, early) -> (result, finish, classes)`` is one engine step: eager, or under capture, where
    it must not synchronize; it calls ``early(t)`` once with a small tensor the host needs before the rest of the
    step is done (the mask of finite examples); ``finish()`` raises for bad targets (a no-op under capture);
    ``classes`` is the number of classes the targets index (None with a custom loss). ``check(targets, classes)
    -> finish`` is the target check run eagerly around each replay. ``state()`` is anything else the captured
    work depends on (autocast, training mode, which parameters are trainable), compared at every call.
    """

    def __init__(self, step: Step, check: Check, state: Callable[[], tuple], keep: int = 2):
        self.step = step
        self.check = check
        self.state = state
        self._captured = _Recent(keep)

    def __call__(self, args: tuple, targets: Tensor) -> tuple[object, Callable[[], Tensor]]:
        leaves, spec = tree_flatten((args, targets))
        tensors = [v for v in leaves if isinstance(v, Tensor)]
        others = tuple(v for v in leaves if not isinstance(v, Tensor))
        try:
            hash(others)
        except TypeError:
            raise ValueError("cuda_graph='step' keys its graphs on the inputs' non-tensor values, which must be "
                             f"hashable; got {[type(v).__name__ for v in others]}") from None
        signature = (spec, others, tuple((t.shape, t.dtype, t.device) for t in tensors), self.state())
        captured, fresh = self._captured.get_or_capture(signature, lambda: self._capture(leaves, spec))
        finish = None
        if not fresh:  # a fresh capture checked the targets in its warm-up
            finish = self.check(targets, captured.classes)
            torch._foreach_copy_(captured.inputs, tensors)
        captured.graph.replay()
        if finish is not None:
            finish()
        return captured.result, functools.partial(_read_early, captured)

    def _capture(self, leaves: list, spec) -> _CapturedStep:
        static = [v.clone() if isinstance(v, Tensor) else v for v in leaves]
        args, targets = tree_unflatten(static, spec)
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        shapes = []
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up, off the capture: compiles, allocates workspaces, checks the targets
                _, finish, _ = self.step(args, targets, lambda t: shapes.append((t.shape, t.dtype)))
                finish()
        current.wait_stream(side)
        # The early output's pinned copy is made here (host memory cannot be pinned under capture), and an event
        # that the graph records behind its copy (an external event: a node of the graph, recorded at every replay).
        early = copied = None
        if shapes:
            shape, dtype = shapes[-1]
            early = torch.empty(shape, dtype=dtype, pin_memory=True)
            copied = torch.cuda.Event(external=True)
            copied.record()  # creates the CUDA event now, outside the capture (PyTorch creates it at its first record)

        def copy_early(t: Tensor) -> None:
            early.copy_(t, non_blocking=True)
            copied.record()

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            result, _, classes = self.step(args, targets, copy_early if early is not None else None)
        return _CapturedStep(graph, [v for v in static if isinstance(v, Tensor)], result, classes, early, copied)


def _read_early(captured: _CapturedStep) -> Tensor | None:
    """The replay's early output on the host, once the graph has copied it (None if the step gave none)."""
    if captured.copied is None:
        return None
    captured.copied.synchronize()
    return captured.early
