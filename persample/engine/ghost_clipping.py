"""The engine: per-example gradient norms and the clipped, summed gradient from one forward and one backward.

One step, for a physical batch of ``B`` examples:

1. **Forward** with hooks on the modules that use trainable parameters (found once by
   :func:`~persample.engine.uses.parameter_uses`; one global hook looks each called module up in the plan).
   Each call keeps its inputs; each output's gradient is caught by a pre-hook on the autograd node that
   receives it. The trainable parameters are set to ``requires_grad=False`` for the forward, so
   the autograd graph reaches the activations only: the backward computes no parameter gradient (the
   weight-gradient matmuls are done once, clipped, in step 4) and saves no extra copy of anything. An
   output that then has no autograd node (the first layer) gets ``+ 0`` from a scalar leaf, so the
   backward still reaches it.
2. **Loss side**: each example's loss and ``d loss_b / d output`` in one pass
   (:func:`~persample.engine.output_grad.loss_and_output_grad`). The check that every target is in range
   waits for the GPU; it runs at the end of the step, when it finds the check's small kernel long done,
   and still raises before anything is returned.
3. **Backward** from the output with those gradients. When a module's output gradient arrives, its rule
   (:mod:`persample.engine.rules`) turns the saved inputs and the gradient into each example's parameter
   gradients in factored form (:mod:`persample.engine.forms`); the inputs are released.
4. **Norms and clipping**: the squared norm of example ``b`` sums ``<grad_b(x), grad_b(y)>`` over all pairs
   of forms of the same parameter (one form per use; pairs of different uses are the cross terms of a tied
   parameter), then ``c_b = min(1, max_grad_norm / (norm_b + 1e-6))`` and each parameter's
   ``sum_b c_b grad_b`` is formed once per form, which is released right after (book-keeping). Parameters
   with one form each are batched so that the step's op count does not grow with the depth: same-shaped
   Outer forms are stacked (:mod:`~persample.engine.stacks`), Dense ones concatenated. Autocast is off for
   this part: the forms already have the dtypes the forward chose.

Assumptions (as in Opacus): the batch dimension is first in every module input and output; a module call
whose first input has no batch dimension (``pos_emb(arange(T))``) is shared by the batch, and its output is
expanded to ``(B, ...)`` — combine it with batched tensors by broadcasting, as ``x + pos_emb(arange(T))``
does. Integer inputs with fewer dimensions than an integer model input count as unbatched even when their
first size equals ``B``; an integer input with a leading dimension of 1 (``arange(T)[None]``, transformers'
``position_ids``) is shared the same way. Every use of a parameter must happen inside a module that owns it.
"""

from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map_only, tree_unflatten

from persample.engine import rules  # noqa: F401  (registers the rules)
from persample.engine.forms import Dense, Form, as_dense, batched_dot, clipped_sum, inner
from persample.engine.graphed import GraphedPost, GraphedStep
from persample.engine.output_grad import loss_and_output_grad
from persample.engine.registry import Call, Rule, rule_for
from persample.engine.rules import fallback
from persample.engine.stacks import OuterStack, as_parameters, pop_stacks, stack_clipped_sums, stack_norms
from persample.engine.uses import parameter_uses
from persample.loss import check_targets_later

Strategy = Literal["auto", "ghost", "materialize"]
_STRATEGIES = ("auto", "ghost", "materialize")


class ClippedGradSum(NamedTuple):
    """What one step of the engine returns.

    ``grads``: ``{name: sum_b c_b grad_b}`` for every trainable parameter (names of
    ``model.named_parameters()``, a tied parameter once), in the parameter's shape and dtype.
    ``norms``: ``(B,)`` each example's gradient norm before clipping (float32, float64 for float64 models).
    ``losses``: ``(B,)`` each example's loss (detached).
    """

    grads: dict[str, Tensor]
    norms: Tensor
    losses: Tensor


@dataclass
class _Hooked:
    """A module whose calls the engine records: by its rule, or by the fallback (``rule`` None), for the
    trainable parameters it uses. ``constant`` are the planned descendants that use some of the same
    parameters: their uses have records of their own, so the fallback holds their outputs constant."""

    module: nn.Module
    rule: Rule | None
    used: dict[str, nn.Parameter]
    constant: list[nn.Module]


@dataclass
class _Plan:
    """Which modules to hook and with what, for one set of trainable parameters."""

    trainable: dict[str, nn.Parameter]
    modules: dict[nn.Module, _Hooked]
    used: list[nn.Parameter]  # the parameters the hooked modules use, each once
    parameters: list[nn.Parameter]  # all of the model's, and their requires_grad flags when planned
    flags: list[bool]


@dataclass
class _Step:
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

    def is_batched(self, x: Tensor) -> bool:
        if x.ndim == 0 or x.shape[0] != self.batch_size:
            return False
        return x.is_floating_point() or self.index_ndim is None or x.ndim >= self.index_ndim

    def is_broadcast(self, x: Tensor) -> bool:
        """An integer input with a batch dimension of 1 that broadcasts against the batch, like transformers'
        ``position_ids = arange(T)[None]``: shared by the batch like ``arange(T)``."""
        return (self.batch_size != 1 and not x.is_floating_point() and self.index_ndim is not None
                and x.ndim == self.index_ndim and x.shape[0] == 1)

    def watch(self, out: Tensor, shared: bool, on_grad: Callable[[Tensor], None], broadcast: bool = False) -> Tensor:
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
        # A pre-hook on the node that receives the output's gradient does what a tensor hook does (which
        # registers one there) without the tensor hook's Python book-keeping, a few microseconds per call.
        index = out.output_nr
        out.grad_fn.register_prehook(lambda grads: None if grads[index] is None else on_grad(grads[index]))
        return out

    def add(self, call: Call, forms: dict[str, Form]) -> None:
        for name, form in forms.items():
            self.forms.setdefault(call.params[name], []).append(form)

    def pack_dense(self) -> None:
        """Concatenates the parameters whose one form is Dense (after :func:`as_dense`: biases not stacked
        with their weights, norm scales, small layers) into ``(B, K)`` blocks, one per dtype: their norms and
        clipped sums are then one op each, not a few per parameter."""
        groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
        for p, forms in self.forms.items():
            forms[:] = [as_dense(x) for x in forms]
            if len(forms) == 1 and isinstance(forms[0], Dense):
                groups.setdefault((forms[0].g.dtype, forms[0].g.device), []).append(p)
        for params in groups.values():
            flat = torch.cat([self.forms.pop(p)[0].g.reshape(self.batch_size, -1) for p in params], 1)
            self.packed.append((flat, params))


def _autocast_state(x: Tensor) -> tuple[str, torch.dtype] | None:
    device = x.device.type
    return (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None


def _cast_for_autocast(args: tuple):
    """Casts the first input as autocast would inside the op, so the copy the engine keeps is that one."""
    x = args[0] if args else None
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dtype == torch.float64:
        return None
    state = _autocast_state(x)
    if state is None or x.dtype == state[1]:
        return None
    return (x.to(state[1]), *args[1:])


def _record_rule(step: _Step, hooked: _Hooked, module: nn.Module, args: tuple, output) -> Tensor:
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
    call = Call(module, (x.expand(step.batch_size, *x.shape) if shared else x, *args[1:]), {}, hooked.used, None)
    rule, version = hooked.rule, x._version

    def on_grad(grad: Tensor) -> None:
        if x._version != version:
            raise ValueError(f"the input of {type(module).__name__} was modified in place after the call; the "
                             "engine needs it unchanged to form per-example gradients")
        step.add(call, rule.compute(call, grad, step.strategy))
        call.args = call.kwargs = None

    return step.watch(output, shared, on_grad, broadcast)


def _record_fallback(step: _Step, hooked: _Hooked, module: nn.Module, args: tuple, kwargs: dict, output):
    args, kwargs = tree_map_only(Tensor, Tensor.detach, (args, kwargs))
    first = next((v for v in tree_leaves((args, kwargs)) if isinstance(v, Tensor)), None)
    shared = first is None or not step.is_batched(first)
    leaves, spec = tree_flatten(output)
    grads: list[Tensor | None] = [None] * len(leaves)
    probe = first if first is not None else leaves[0]
    step.fallbacks.append((Call(module, args, kwargs, hooked.used, _autocast_state(probe)), grads, hooked.constant))
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor) and leaf.is_floating_point():
            leaves[i] = step.watch(leaf, shared, lambda g, i=i: grads.__setitem__(i, g))
    return tree_unflatten(leaves, spec)


@contextmanager
def _recording(plan: _Plan, step: _Step, autocast: bool):
    """The engine's hooks and the trainable parameters frozen, for the duration of the forward.

    One global forward hook (and, under autocast, one pre-hook) looks each called module up in the plan: a step
    registers two hooks, not one or two per module, each a few microseconds of Python to add and remove.
    """
    modules = plan.modules

    def cast(module: nn.Module, args: tuple):
        hooked = modules.get(module)
        if hooked is not None and hooked.rule is not None and hooked.rule.cast_input:
            return _cast_for_autocast(args)
        return None

    def record(module: nn.Module, args: tuple, kwargs: dict, output):
        hooked = modules.get(module)
        if hooked is None:
            return None
        if hooked.rule is None:
            return _record_fallback(step, hooked, module, args, kwargs, output)
        return _record_rule(step, hooked, module, args, output)

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


@contextmanager
def _no_autocast(plan: _Plan):
    """Autocast off for the norms and clipped sums: their factors already have the dtypes the step chose, and
    autocast would cast float32 intermediates back to low precision (an op per matmul operand)."""
    with ExitStack() as stack:
        for device in {p.device.type for p in plan.trainable.values()}:
            stack.enter_context(torch.autocast(device, enabled=False))
        yield


def _as_args(inputs) -> tuple:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _all_cuda(args: tuple, targets: Tensor) -> bool:
    return all(v.is_cuda for v in tree_leaves((args, targets)) if isinstance(v, Tensor))


def _batch_size(inputs) -> int:
    first = next((v for v in tree_leaves(inputs) if isinstance(v, Tensor)), None)
    if first is None or first.ndim == 0 or first.shape[0] == 0:
        raise ValueError("inputs must contain a tensor with a batch dimension first, got "
                         f"{tuple(first.shape) if first is not None else type(inputs).__name__}")
    return first.shape[0]


class GhostClipping:
    """Per-example gradient norms and the clipped, summed gradient of ``model``, at about the cost of a
    normal training step (see the module docstring for how).

    The model is not wrapped or changed: hooks live for the duration of a step, and parameters'
    ``requires_grad`` is restored after its forward. ``param.grad`` is not touched. The first step runs one
    extra forward under ``no_grad`` to find which module uses which parameter (again whenever the set of
    trainable parameters changes).

    Args:
        model: any module; its trainable parameters (``requires_grad``) are the ones clipped. Exact rules
            for ``nn.Linear`` (any input rank), ``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``,
            ``nn.Conv2d`` and transformers' ``Conv1D``; other modules with parameters go through
            ``torch.func`` (exact, slower). A ``DistributedDataParallel`` model is unwrapped (its ``.module``
            runs, so DDP's gradient all-reduce never does; reduce the clipped sums with
            :class:`persample.DistributedDPOptimizer`). Under ``fully_shard`` (FSDP2) the forward and backward
            gather each module's weights as usual, the sums come back full-size, named as the model's
            parameters, and every module with trainable parameters needs a rule.
        max_grad_norm: the clipping bound ``C`` (> 0): ``c_b = min(1, C / (norm_b + 1e-6))``.
        ignore_index: targets not counted in an example's mean loss (default loss only).
        loss_fn: ``loss_fn(output, targets) -> (B,)`` per-example losses instead of the default
            cross-entropy (mean over each example's counted targets, from the fused kernel).
        strategy: ``"auto"`` picks per layer between ghost norms and materialized per-example gradients by
            cost; ``"ghost"`` / ``"materialize"`` force one (for tests and measurements).
        cuda_graph: on CUDA, for fixed physical batches, where a step of small layers waits on the host's
            Python and launches (:mod:`persample.engine.graphed`). ``"post"``: the part after the backward
            (norms and clipped sums, about a hundred small ops) runs as a CUDA graph captured once per set of
            shapes; the factors' size stays allocated between steps. ``"step"``: the whole step (forward,
            backward and all) is captured and replayed; the model's forward must be capturable, and the step's
            memory stays in the graph's pool between steps. Either way the returned tensors are overwritten by
            the next call with the same shapes. ``None`` (default): eager.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``loss_fn`` is not callable.
        ValueError: ``max_grad_norm`` is not a positive finite number, or an unknown ``strategy`` or
            ``cuda_graph``.
    """

    def __init__(self, model: nn.Module, *, max_grad_norm: float, ignore_index: int = -100,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, strategy: Strategy = "auto",
                 cuda_graph: Literal["post", "step"] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not (isinstance(max_grad_norm, int | float) and 0 < max_grad_norm < float("inf")):
            raise ValueError(f"max_grad_norm must be a positive finite number, got {max_grad_norm!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
        if strategy not in _STRATEGIES:
            raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
        if cuda_graph not in (None, "post", "step"):
            raise ValueError(f"cuda_graph must be None, 'post' or 'step', got {cuda_graph!r}")
        # DDP's forward would prepare its reducer for a backward that, here, computes no parameter gradient;
        # the clipped sums are reduced by persample.DistributedDPOptimizer instead.
        self.model = model.module if isinstance(model, DistributedDataParallel) else model
        self.max_grad_norm = float(max_grad_norm)
        self.ignore_index = ignore_index
        self.loss_fn = loss_fn
        self.strategy = strategy
        self._plan: _Plan | None = None
        self._graphed = GraphedPost(self._norms_and_clipped_sums, self._graph_state) if cuda_graph == "post" else None
        self._graphed_step = GraphedStep(self._step, self._check_targets, self._graph_state) \
            if cuda_graph == "step" else None

    @torch.no_grad()
    def clipped_grad_sum(self, inputs: Tensor | tuple, targets: Tensor) -> ClippedGradSum:
        """One step on a physical batch: ``model(inputs)`` (a tuple is unpacked into positional
        arguments), each example's loss against ``targets``, norms, and ``sum_b c_b grad_b``.

        Call it inside ``torch.autocast`` for mixed precision; the gradients come back in the parameters'
        dtype. Hand ``grads`` and ``len(targets)`` to the DP optimizer, which adds the noise and averages.
        """
        args = _as_args(inputs)
        if self._graphed_step is not None and _all_cuda(args, targets):
            return self._graphed_step(args, targets)
        result, finish, _ = self._step(args, targets)
        finish()
        return result

    def _step(self, args: tuple, targets: Tensor) -> tuple[ClippedGradSum, Callable[[], None], int | None]:
        """One step, before its target check: ``(result, finish, classes)`` (see :class:`GraphedStep`)."""
        step, losses, finish = self._backward(args, targets)
        with _no_autocast(self._plan):
            if self._graphed is not None and losses.is_cuda:
                norms, grads = self._graphed(step)
            else:
                norms, grads = self._norms_and_clipped_sums(step)
        result = ClippedGradSum({name: grads[p] if p in grads else torch.zeros(p.shape, dtype=p.dtype, device=p.device)
                                 for name, p in self._plan.trainable.items()}, norms, losses)
        return result, finish, step.classes

    def _check_targets(self, targets: Tensor, classes: int | None) -> Callable[[], None]:
        if classes is None:  # a custom loss checks its own targets
            return lambda: None
        return check_targets_later(targets, classes, self.ignore_index)

    def _graph_state(self) -> tuple:
        """What a captured graph depends on besides its inputs' shapes, baked in at capture: the engine's
        settings, autocast, training mode (dropout) and which parameters are trainable."""
        autocast = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        return (self.max_grad_norm, self.ignore_index, self.strategy, autocast, self.model.training,
                tuple(p.requires_grad for p in self.model.parameters()))

    @torch.no_grad()
    def per_sample_grad_norms(self, inputs: Tensor | tuple, targets: Tensor) -> Tensor:
        """``(B,)`` each example's gradient norm over all trainable parameters, without clipping."""
        step, _, finish = self._backward(inputs, targets)
        with _no_autocast(self._plan):
            norms = self._norms(step)
        finish()
        return norms

    def _norms_and_clipped_sums(self, step: _Step) -> tuple[Tensor, dict[nn.Parameter, Tensor]]:
        norms = self._norms(step)
        factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        return norms, self._clipped_sums(step, factors)

    @staticmethod
    def _clipped_sums(step: _Step, factors: Tensor) -> dict[nn.Parameter, Tensor]:
        grads: dict[nn.Parameter, Tensor] = {}
        for flat, params in step.packed:
            summed = factors.to(flat.dtype) @ flat
            grads.update(zip(params, as_parameters(summed, params, [p.numel() for p in params]), strict=True))
        step.packed.clear()
        while step.stacks:
            grads.update(stack_clipped_sums(step.stacks.pop(), factors))
        for p in list(step.forms):
            forms = step.forms.pop(p)
            total = clipped_sum(forms.pop(), factors, p.dtype)
            while forms:
                total += clipped_sum(forms.pop(), factors, p.dtype)
            grads[p] = total
        return grads

    def _plan_for(self, args: tuple) -> _Plan:
        if self._plan is not None and [p.requires_grad for p in self._plan.parameters] == self._plan.flags:
            return self._plan
        parameters = list(self.model.parameters())
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        uses = parameter_uses(self.model, lambda: self.model(*args), {id(p): p for p in trainable.values()})
        hooked = {}
        for module, used in uses.items():
            ids = {id(p) for p in used.values()}
            constant = [m for m in module.modules() if m is not module and m in uses
                        and ids & {id(p) for p in uses[m].values()}]
            rule = rule_for(module, set(used))
            if rule is None and any(isinstance(p, DTensor) for p in used.values()):
                raise ValueError(f"{type(module).__name__} has sharded parameters (fully_shard) and no rule of the "
                                 "engine: its torch.func fallback needs the gathered weights after the backward. "
                                 "Use modules with rules (Linear, Embedding, LayerNorm, RMSNorm, Conv2d, Conv1D)")
            hooked[module] = _Hooked(module, rule, used, constant)
        used = list({id(p): p for h in hooked.values() for p in h.used.values()}.values())
        self._plan = _Plan(trainable, hooked, used, parameters, [p.requires_grad for p in parameters])
        return self._plan

    def _backward(self, inputs, targets) -> tuple[_Step, Tensor, Callable[[], None]]:
        """The recorded step, the losses and ``finish()``, the target check: the caller queues the rest of
        the step first (see :func:`~persample.engine.output_grad.loss_and_output_grad`)."""
        args = _as_args(inputs)
        batch_size = _batch_size(args)
        plan = self._plan_for(args)
        first = args[0] if isinstance(args[0], Tensor) else None
        index_ndim = first.ndim if first is not None and not first.is_floating_point() else None
        step = _Step(batch_size, index_ndim, self.strategy)
        devices = {p.device.type for p in plan.trainable.values()}
        autocast = any(torch.is_autocast_enabled(d) for d in devices)
        with _recording(plan, step, autocast), torch.enable_grad():
            output = self.model(*args)
        losses, output_grad, finish = loss_and_output_grad(output, targets, ignore_index=self.ignore_index,
                                                           loss_fn=self.loss_fn)
        step.classes = output.shape[-1] if self.loss_fn is None else None
        if output.requires_grad:
            with torch.autocast(output.device.type, enabled=False):
                torch.autograd.backward(output, output_grad)
        del output, output_grad
        for call, grads, constant in step.fallbacks:
            if any(g is not None for g in grads):
                step.add(call, fallback.per_example_grads(call, grads, step.is_batched, constant))
        step.fallbacks.clear()
        # Stacking and packing trade copies for fewer launches. Under CUDA graph capture launches cost nothing
        # at replay, while the stacks' large new blocks, which the memory freed earlier in the step cannot serve,
        # would grow the graph's pool for good (1.8 GiB on GPT-2-small in fp32). The forms are then reduced one
        # parameter at a time.
        if not (losses.is_cuda and torch.cuda.is_current_stream_capturing()):
            step.stacks = pop_stacks(step.forms)
            step.pack_dense()
        return step, losses, finish

    def _norms(self, step: _Step) -> Tensor:
        params = list(self._plan.trainable.values())
        acc = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        # Rows of (k, B) squared-norm terms, summed in one op.
        terms = [batched_dot(flat, flat).to(acc)[None] for flat, _ in step.packed]
        terms.extend(stack_norms(stack).to(acc) for stack in step.stacks)
        for forms in step.forms.values():
            for i, x in enumerate(forms):
                terms.append(inner(x, x).to(acc)[None])
                terms.extend(2 * inner(x, y).to(acc)[None] for y in forms[i + 1:])
        if not terms:
            device = params[0].device if params else torch.device("cpu")
            return torch.zeros(step.batch_size, dtype=acc, device=device)
        return torch.cat(terms).sum(0).clamp_min(0).sqrt()


def clipped_grad_sum(model: nn.Module, inputs: Tensor | tuple, targets: Tensor, *, max_grad_norm: float,
                     ignore_index: int = -100, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                     strategy: Strategy = "auto") -> ClippedGradSum:
    """One-off form of :meth:`GhostClipping.clipped_grad_sum` (which, in a training loop, finds the
    parameter uses only once)."""
    engine = GhostClipping(model, max_grad_norm=max_grad_norm, ignore_index=ignore_index, loss_fn=loss_fn,
                           strategy=strategy)
    return engine.clipped_grad_sum(inputs, targets)


def per_sample_grad_norms_fast(model: nn.Module, inputs: Tensor | tuple, targets: Tensor, *,
                               ignore_index: int = -100, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                               strategy: Strategy = "auto") -> Tensor:
    """``(B,)`` each example's gradient norm without materializing per-example gradients: the norms of
    :meth:`GhostClipping.clipped_grad_sum`, without the clipping."""
    engine = GhostClipping(model, max_grad_norm=1.0, ignore_index=ignore_index, loss_fn=loss_fn,
                           strategy=strategy)
    return engine.per_sample_grad_norms(inputs, targets)
