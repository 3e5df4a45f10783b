"""The engine's recording: which module calls it hooks, and what the hooks keep during one step.

* :func:`make_plan` — once per set of trainable parameters: the modules that use them (found by
  :func:`~persample.engine.uses.parameter_uses`), each with its rule from :mod:`persample.engine.registry`
  or the ``torch.func`` fallback (:mod:`persample.engine.rules.fallback`).
* :func:`recording` — for the duration of the forward: the trainable parameters frozen and one global forward
  hook (and, under autocast, one pre-hook) that looks each called module up in the plan.
* :func:`record_rule` / :func:`record_fallback` — what a hooked call keeps: its inputs, and a pre-hook on the
  autograd node that receives its output's gradient. When the gradient arrives in the backward, a rule turns
  inputs and gradient into factored per-example gradients at once (:meth:`Step.add`), or, if it has a batched
  form (a norm layer's, one launch for all its calls), the call is held with its gradient and computed with the
  others of its rule at the end of the backward (:meth:`Step.release_held`); a fallback call keeps the gradient
  for the engine to replay after the backward.
* :class:`Step` — what one step's hooks collect, and which inputs count as batched (the assumptions in
  :mod:`persample.engine.ghost_clipping`'s docstring).
"""

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map_only, tree_unflatten

from persample.backend import use_triton
from persample.engine.forms import Dense, Form, as_dense
from persample.engine.registry import Call, Rule, rule_for
from persample.engine.stacks import OuterStack
from persample.engine.uses import parameter_uses

PACK_ELEMENTS = 1 << 20
# The most memory the held calls of batched rules may keep beyond what autograd would have freed (their inputs and
# output gradients): past it they are computed at once, so that a model of many large norm layers pays a few
# launches more instead of holding a copy of its activations. On a GPU also at most 1 / HELD_FRACTION of the memory
# allocated when the backward holds its first call (the activations, among others): holding adds at most that to
# the step's peak. A Wide-ResNet's GroupNorm inputs and gradients are most of its activations, so its norm calls
# are then computed one by one; a transformer's LayerNorm calls, a small part of its memory, are still held.
HELD_BYTES = 1 << 28
HELD_FRACTION = 16


def allocated_bytes(device: torch.device) -> int | None:
    """The memory the caching allocator has handed out on ``device`` now; None off CUDA (no allocator to ask)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def hold_budget(grad: Tensor) -> int:
    """How many bytes the held calls of one step may keep (:data:`HELD_BYTES`, :data:`HELD_FRACTION`)."""
    allocated = allocated_bytes(grad.device)
    return HELD_BYTES if allocated is None else min(HELD_BYTES, allocated // HELD_FRACTION)


@dataclass
class Hooked:
    """A module whose calls the engine records: by its rule, or by the fallback (``rule`` None), for the
    trainable parameters it uses. ``constant`` are the planned descendants that use some of the same
    parameters: their uses have records of their own, so the fallback holds their outputs constant."""

    module: nn.Module
    rule: Rule | None
    used: dict[str, nn.Parameter]
    constant: list[nn.Module]


@dataclass
class Plan:
    """Which modules to hook and with what, for one set of trainable parameters."""

    trainable: dict[str, nn.Parameter]
    modules: dict[nn.Module, Hooked]
    used: list[nn.Parameter]  # the parameters the hooked modules use, each once
    parameters: list[nn.Parameter]  # all of the model's, and their requires_grad flags when planned
    flags: list[bool]

    def is_current(self) -> bool:
        """Whether the model's trainable parameters are still the ones planned for."""
        return [p.requires_grad for p in self.parameters] == self.flags


def make_plan(model: nn.Module, args: tuple, kwargs: dict | None = None) -> Plan:
    """The plan for ``model``'s trainable parameters, from one extra forward on ``args`` (and ``kwargs``) under
    ``no_grad``."""
    parameters = list(model.parameters())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    uses = parameter_uses(model, lambda: model(*args, **(kwargs or {})), {id(p): p for p in trainable.values()})
    hooked = {}
    for module, used in uses.items():
        ids = {id(p) for p in used.values()}
        constant = [m for m in module.modules() if m is not module and m in uses
                    and ids & {id(p) for p in uses[m].values()}]
        hooked[module] = Hooked(module, rule_for(module, set(used)), used, constant)
    used = list({id(p): p for h in hooked.values() for p in h.used.values()}.values())
    return Plan(trainable, hooked, used, parameters, [p.requires_grad for p in parameters])


@dataclass
class Step:
    """The state of one step: what the hooks collect."""

    batch_size: int
    index_ndim: int | None
    strategy: str
    classes: int | None = None  # what the default loss's targets index, once the output is known
    forms: dict[nn.Parameter, list[Form]] = field(default_factory=dict)
    fallbacks: list[tuple[Call, list, list[nn.Module]]] = field(default_factory=list)
    packed: list[tuple[Tensor, list[nn.Parameter]]] = field(default_factory=list)
    stacks: list[OuterStack] = field(default_factory=list)
    anchors: dict[torch.device, Tensor] = field(default_factory=dict)
    head: object = None  # the fused head's HeadStep (persample.engine.fused_head), when the engine has a head
    held: dict[Callable, list[tuple[Call, Tensor]]] = field(default_factory=dict)  # by Rule.batched
    held_bytes: int = 0
    held_budget: int | None = None  # hold_budget() at the first held call
    capturing: bool | None = None  # whether a CUDA graph capture records this step, once asked

    def is_batched(self, x: Tensor) -> bool:
        if x.ndim == 0 or x.shape[0] != self.batch_size:
            return False
        return x.is_floating_point() or self.index_ndim is None or x.ndim >= self.index_ndim

    def is_broadcast(self, x: Tensor) -> bool:
        """An integer input with a batch dimension of 1 that broadcasts against the batch, like transformers'
        ``position_ids = arange(T)[None]``: shared by the batch like ``arange(T)``."""
        return (self.batch_size != 1 and not x.is_floating_point() and self.index_ndim is not None
                and x.ndim == self.index_ndim and x.shape[0] == 1)

    def watch(self, out: Tensor, shared: bool, broadcast: bool = False) -> Tensor:
        """``out`` as the model goes on with it: with an autograd node (whose pre-hook then receives its gradient,
        at ``out.output_nr`` among the node's inputs) and the batch dimension."""
        if out.grad_fn is None:
            # No node to hook (frozen parameters only, or a leaf): ``+ 0`` from a scalar leaf makes one.
            anchor = self.anchors.get(out.device)
            if anchor is None:
                anchor = self.anchors[out.device] = torch.zeros((), device=out.device, requires_grad=True)
            out = out + anchor
        if broadcast:
            out = out.squeeze(0)
        if shared:
            out = out.expand(self.batch_size, *out.shape)
        return out

    def add(self, call: Call, forms: dict[str, Form]) -> None:
        for name, form in forms.items():
            self.forms.setdefault(call.params[name], []).append(form)

    def may_hold(self, grad: Tensor) -> bool:
        """Whether a call of a batched rule may wait for the end of the backward: on the Triton path, where the
        batched rule saves launches, and not under a CUDA graph capture (which would keep the held memory in its
        pool for good, and where launches cost nothing at replay)."""
        if not use_triton(grad):
            return False
        if self.capturing is None:
            self.capturing = grad.is_cuda and torch.cuda.is_current_stream_capturing()
        return not self.capturing

    def hold(self, batched: Callable, call: Call, grad: Tensor) -> None:
        """Keeps ``call`` and its output gradient for ``batched`` (its rule's); past :func:`hold_budget` (asked at
        the step's first held call) every held call is computed now."""
        if self.held_budget is None:
            self.held_budget = hold_budget(grad)
        self.held.setdefault(batched, []).append((call, grad))
        x = call.args[0]
        self.held_bytes += x.numel() * x.element_size() + grad.numel() * grad.element_size()
        if self.held_bytes > self.held_budget:
            self.release_held()

    def release_held(self) -> None:
        """Computes the held calls, each batched rule's in one go, and adds their forms."""
        while self.held:
            batched, calls = self.held.popitem()
            for (call, _), forms in zip(calls, batched(calls), strict=True):
                self.add(call, forms)
                call.args = call.kwargs = None
        self.held_bytes = 0

    def pack_dense(self) -> None:
        """Concatenates the parameters whose one form is Dense (after :func:`as_dense`: biases not stacked
        with their weights, norm scales, small layers) into ``(B, K)`` blocks, one per dtype: their norms and
        clipped sums are then one op each, not a few per parameter. Forms of more than ``PACK_ELEMENTS``
        elements (materialized conv weights) stay apart: copying them costs more than the ops it saves, and the
        copy would double their memory at the step's peak."""
        groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
        for p, forms in self.forms.items():
            forms[:] = [as_dense(x) for x in forms]
            if len(forms) == 1 and isinstance(forms[0], Dense) and forms[0].g.numel() <= PACK_ELEMENTS:
                groups.setdefault((forms[0].g.dtype, forms[0].g.device), []).append(p)
        for params in groups.values():
            # (B, K) blocks as they are (norm scales: most of them): a reshape is an op's host time, for nothing.
            blocks = [self.forms.pop(p)[0].g for p in params]
            flat = torch.cat([g if g.ndim == 2 else g.reshape(self.batch_size, -1) for g in blocks], 1)
            self.packed.append((flat, params))


CHECKPOINTING = ("the engine does not support activation checkpointing (torch.utils.checkpoint): its backward "
                 "recomputes the forward outside the engine's recording. Turn it off "
                 "(model.gradient_checkpointing_disable() for transformers models)")


CANNOT_TELL = object()  # what saved_tensor_hooks() returns where this PyTorch cannot say


def saved_tensor_hooks():
    """The innermost saved-tensor hooks on now (``torch.utils.checkpoint``'s non-reentrant mode, ``save_on_cpu``, a
    user's own), ``(pack, unpack)``; None if there are none; :data:`CANNOT_TELL` where this PyTorch cannot say
    (PyTorch has no public query)."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError, RuntimeError):
        return CANNOT_TELL


def checkpointing() -> bool:
    """Whether ``torch.utils.checkpoint``'s non-reentrant mode is running this forward: its saved-tensor hooks are
    the innermost ones. ``save_on_cpu`` and a user's own hooks, which the engine allows, are told apart by the
    module that defines the pack hook. False when it cannot be told (the engine's backward then turns torch's
    recomputation error into the same ValueError)."""
    hooks = saved_tensor_hooks()
    return (hooks is not None and hooks is not CANNOT_TELL
            and getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint")


def autocast_state(x: Tensor) -> tuple[str, torch.dtype] | None:
    """``(device_type, dtype)`` of the autocast on for ``x``'s device, or None."""
    device = x.device.type
    return (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None


def cast_for_autocast(args: tuple, to: bool | str = True):
    """Casts the first input as autocast would inside the op, so the copy the engine keeps is that one: to the
    autocast dtype (``to=True``: matmuls, convolutions), or with ``to="float32"`` to float32 under CUDA autocast
    (ops on its float32 list, GroupNorm; CPU autocast runs them in the input's dtype)."""
    x = args[0] if args else None
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dtype == torch.float64:
        return None
    state = autocast_state(x)
    if state is None:
        return None
    dtype = state[1] if to is True else torch.float32 if state[0] == "cuda" else x.dtype
    return None if x.dtype == dtype else (x.to(dtype), *args[1:])


def record_rule(step: Step, hooked: Hooked, module: nn.Module, args: tuple, output) -> Tensor:
    """Records a call of a module with a rule; the rule runs when the output's gradient arrives."""
    if not isinstance(output, Tensor) or not args or not isinstance(args[0], Tensor):
        raise TypeError(f"{type(module).__name__} must take a tensor first and return a tensor, got "
                        f"{type(args[0]).__name__ if args else 'no input'} -> {type(output).__name__}")
    x = args[0].detach()
    broadcast = step.is_broadcast(x)
    if broadcast:
        x = x.squeeze(0)
    shared = not step.is_batched(x)
    # The rules need no autocast state (only the fallback replays a call): not looking it up saves two calls
    # into torch per hooked call.
    rule = hooked.rule
    call = Call(module, (x.expand(step.batch_size, *x.shape) if shared else x, *args[1:]),
                rule.saved(output) if rule.saved is not None and not shared else {}, hooked.used, None)
    out = step.watch(output, shared, broadcast)
    # A pre-hook on the node that receives the output's gradient does what a tensor hook does (which registers one
    # there) without the tensor hook's Python book-keeping, a few microseconds per call.
    out.grad_fn.register_prehook(RuleHook(step, rule, call, x._version, out.output_nr))
    return out


class RuleHook:
    """The pre-hook on the autograd node that receives a recorded call's output gradient: the rule's forms of
    the call, from its input and that gradient. One object per call (no closures), the hook Python runs for
    every recorded call of every step."""

    __slots__ = ("step", "rule", "call", "version", "index")

    def __init__(self, step: Step, rule: Rule, call: Call, version: int, index: int):
        self.step, self.rule, self.call, self.version, self.index = step, rule, call, version, index

    def __call__(self, grads: tuple) -> None:
        grad = grads[self.index]
        if grad is None:
            return
        call = self.call
        if call.args[0]._version != self.version:  # a view shares its base's version counter
            raise ValueError(f"the input of {type(call.module).__name__} was modified in place after the call; the "
                             "engine needs it unchanged to form per-example gradients")
        if self.rule.batched is not None and self.step.may_hold(grad):
            self.step.hold(self.rule.batched, call, grad)  # its inputs are released when it is computed
            return
        self.step.add(call, self.rule.compute(call, grad, self.step.strategy))
        # The hook lives as long as the autograd graph does: in a make_private loop the user's loss keeps that graph
        # through the clipping, and what the hook still held (the input, through call.args, not a field of its
        # own) would stay alive after the forms that hold it are consumed.
        call.args = call.kwargs = None


def record_fallback(step: Step, hooked: Hooked, module: nn.Module, args: tuple, kwargs: dict, output):
    """Records a call of a module without a rule: its inputs and its outputs' gradients, replayed by the
    fallback after the backward."""
    args, kwargs = tree_map_only(Tensor, Tensor.detach, (args, kwargs))
    first = next((v for v in tree_leaves((args, kwargs)) if isinstance(v, Tensor)), None)
    shared = first is None or not step.is_batched(first)
    leaves, spec = tree_flatten(output)
    grads: list[Tensor | None] = [None] * len(leaves)
    probe = first if first is not None else leaves[0]
    step.fallbacks.append((Call(module, args, kwargs, hooked.used, autocast_state(probe)), grads, hooked.constant))
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor) and leaf.is_floating_point():
            leaves[i] = out = step.watch(leaf, shared)
            out.grad_fn.register_prehook(_keep_grad(grads, i, out.output_nr))
    return tree_unflatten(leaves, spec)


def _keep_grad(grads: list, i: int, index: int) -> Callable[[tuple], None]:
    """The pre-hook that keeps a fallback call's ``i``-th output gradient in ``grads``."""

    def keep(node_grads: tuple) -> None:
        if node_grads[index] is not None:
            grads[i] = node_grads[index]

    return keep


@contextmanager
def recording(plan: Plan, step: Step, autocast: bool):
    """The engine's hooks and the trainable parameters frozen, for the duration of the forward.

    One global forward hook (and, under autocast, one pre-hook) looks each called module up in the plan: a step
    registers two hooks, not one or two per module, each a few microseconds of Python to add and remove.
    """
    modules = plan.modules

    def cast(module: nn.Module, args: tuple):
        hooked = modules.get(module)
        if hooked is not None and hooked.rule is not None and hooked.rule.cast_input:
            return cast_for_autocast(args, hooked.rule.cast_input)
        return None

    def record(module: nn.Module, args: tuple, kwargs: dict, output):
        hooked = modules.get(module)
        if hooked is None:
            return None
        if not torch.is_grad_enabled():
            raise ValueError(
                f"{type(module).__name__} has trainable parameters and ran with gradients off (under torch.no_grad, "
                "or inside reentrant activation checkpointing): the engine needs the gradient of each such call's "
                "output. Run it with gradients on, or turn activation checkpointing off (model."
                "gradient_checkpointing_disable() for transformers models)")
        if checkpointing():
            # Raised here, in the forward, so that a make_private loop's own loss.backward() never meets
            # torch's recomputation mismatch (the parameters the recording froze are trainable again by then).
            raise ValueError(CHECKPOINTING)
        if hooked.rule is None:
            return record_fallback(step, hooked, module, args, kwargs, output)
        return record_rule(step, hooked, module, args, output)

    handles = []
    try:
        for p in plan.used:
            p.requires_grad_(False)
        if autocast:
            handles.append(register_module_forward_pre_hook(cast))
        handles.append(register_module_forward_hook(record, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
        for p in plan.used:
            p.requires_grad_(True)
