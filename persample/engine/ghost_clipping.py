"""The engine: per-example gradient norms and the clipped, summed gradient from one forward and one backward.

One step, for a physical batch of ``B`` examples:

1. **Forward** with hooks on the modules that use trainable parameters (:mod:`~persample.engine.recording`:
   found once by :func:`~persample.engine.uses.parameter_uses`; one global hook looks each called module up
   in the plan).
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
   gradients in factored form (:mod:`persample.engine.forms`); the inputs are released. A rule with a batched
   form (the norm layers') is run at the end of the backward for all its calls at once, in one launch per shape
   (within :func:`~persample.engine.recording.hold_budget` of held inputs and gradients: 256 MiB, and on a GPU a
   sixteenth of the memory allocated when the first call is held).
4. **Norms and clipping**: the squared norm of example ``b`` sums ``<grad_b(x), grad_b(y)>`` over all pairs
   of forms of the same parameter (one form per use; pairs of different uses are the cross terms of a tied
   parameter), then ``c_b = min(1, max_grad_norm / (norm_b + 1e-6))`` and each parameter's
   ``sum_b c_b grad_b`` is formed once per form, which is released right after (book-keeping). Parameters
   with one form each are batched so that the step's op count does not grow with the depth: same-shaped
   Outer forms are stacked (:mod:`~persample.engine.stacks`), Dense ones concatenated. Autocast is off for
   this part: the forms already have the dtypes the forward chose.
5. **Non-finite examples**: an example whose norm or loss is not finite (a NaN or inf anywhere in its gradient
   makes its norm so) gets ``c_b = 0`` and its factors are replaced by zeros (``0 * NaN`` is NaN), so it
   contributes nothing and the sensitivity bound holds; on CUDA the factors go through that ``where`` every step
   (deciding first would make the host wait for the norms). The ``(B,)`` mask of finite examples is copied to
   the host after the step's work is queued and read at its end, with the target check; the step then warns
   (:class:`~persample.checks.NonFiniteGradientWarning`) naming the batch positions, or raises with
   ``nonfinite="raise"``, and the result counts them.

Modules that mix examples are refused before the first step computes anything: a BatchNorm that uses batch
statistics (training mode, or no running statistics); a module the fallback cannot run one example at a time
raises the ``ValueError`` of :func:`persample.per_sample_grads` when the step reaches it. An empty batch
(``B = 0``, which Poisson sampling produces) returns zero sums and empty norms and losses without running the
model.

Assumptions (as in Opacus): the batch dimension is first in every module input and output; a module call
whose first input has no batch dimension (``pos_emb(arange(T))``) is shared by the batch, and its output is
expanded to ``(B, ...)`` — combine it with batched tensors by broadcasting, as ``x + pos_emb(arange(T))``
does. Integer inputs with fewer dimensions than an integer model input count as unbatched even when their
first size equals ``B``; an integer input with a leading dimension of 1 (``arange(T)[None]``, transformers'
``position_ids``) is shared the same way. Every use of a parameter must happen inside a module that owns it.
"""

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointError

from persample.backend import is_dtensor, use_triton
from persample.checks import check_nonfinite, handle_nonfinite, refuse_batch_norm
from persample.engine import fused_head, rules  # noqa: F401  (rules: registers the rules)
from persample.engine.forms import Dense, Form, batched_dot, clipped_sum, inner
from persample.engine.graphed import GraphedPost, GraphedStep
from persample.engine.output_grad import loss_and_output_grad
from persample.engine.recording import CHECKPOINTING, Plan, Step, make_plan, recording
from persample.engine.rules import fallback
from persample.engine.stacks import as_parameters, pop_stacks, stack_clipped_sums, stack_norms
from persample.kernels.zero_rows import zero_rows_
from persample.loss import check_targets_later

Strategy = Literal["auto", "ghost", "materialize"]
_STRATEGIES = ("auto", "ghost", "materialize")


class ClippedGrads(dict):
    """``{name: sum_b c_b grad_b}`` as the engine returns it: a dict, which also says what bound each example's
    gradient was clipped to (``clipped_to``, the engine's ``max_grad_norm``), the examples whose norm or loss is
    not finite already zeroed. :meth:`persample.DPOptimizer.accumulate` reads that bound: no element of a sum of
    ``n`` such gradients exceeds ``n * clipped_to``, so where every dtype holds that bound the sums are finite
    without looking at them (a host sync, which would stop the host queueing the step's work).

    Examples:
        >>> import torch
        >>> import persample
        >>> model = torch.nn.Linear(4, 3)
        >>> grads = persample.GhostClipping(model, max_grad_norm=0.5).clipped_grad_sum(
        ...     torch.randn(5, 4), torch.randint(0, 3, (5,))).grads
        >>> sorted(grads), grads.clipped_to, isinstance(grads, dict)
        (['bias', 'weight'], 0.5, True)
    """

    def __init__(self, grads: dict[str, Tensor], clipped_to: float):
        super().__init__(grads)
        self.clipped_to = float(clipped_to)


class ClippedGradSum(NamedTuple):
    """What one step of the engine returns.

    ``grads``: ``{name: sum_b c_b grad_b}`` for every trainable parameter (names of
    ``model.named_parameters()``, a tied parameter once), in the parameter's shape and dtype
    (a :class:`ClippedGrads`, which is a dict).
    ``norms``: ``(B,)`` each example's gradient norm before clipping (float32, float64 for float64 models).
    ``losses``: ``(B,)`` each example's loss (detached).
    ``nonfinite``: how many examples had a norm or loss that is not finite and contributed zero to ``grads``
    (their ``norms`` and ``losses`` are as computed: NaN or inf).

    Examples:
        >>> import torch
        >>> import persample
        >>> out = persample.clipped_grad_sum(torch.nn.Linear(4, 3), torch.randn(5, 4), torch.randint(0, 3, (5,)),
        ...                                  max_grad_norm=1.0)
        >>> grads, norms, losses, nonfinite = out
        >>> sorted(grads), norms.shape, losses.shape, nonfinite
        (['bias', 'weight'], torch.Size([5]), torch.Size([5]), 0)
    """

    grads: dict[str, Tensor]
    norms: Tensor
    losses: Tensor
    nonfinite: int = 0


@contextmanager
def _no_autocast(plan: Plan):
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
    if first is None or first.ndim == 0:
        raise ValueError("inputs must contain a tensor with a batch dimension first, got "
                         f"{tuple(first.shape) if first is not None else type(inputs).__name__}")
    return first.shape[0]


@contextmanager
def _checkpointing_refused():
    """Turns the error of a model with non-reentrant activation checkpointing into one that names the fix, where
    the recording could not tell checkpointing apart (see :func:`~persample.engine.recording.checkpointing`): its
    backward recomputes the forward with the parameters trainable again, which the engine's forward froze, so the
    recomputed tensors differ from the saved ones."""
    try:
        yield
    except CheckpointError as e:
        raise ValueError(CHECKPOINTING) from e


class _MaskOnHost:
    """The ``(B,)`` mask of finite examples on its way to the host (:func:`_read_later`): calling it gives the
    positions where the mask is False, after waiting for its copy; :meth:`ready` gives them only if the copy has
    already landed, without a wait (None otherwise)."""

    __slots__ = ("host", "copied")

    def __init__(self, host: Tensor, copied: torch.cuda.Event | None):
        self.host, self.copied = host, copied

    def __call__(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()
        return _nonfinite_positions(self.host)

    def ready(self) -> list[int] | None:
        if self.copied is not None:
            capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()  # no query then
            if capturing or not self.copied.query():
                return None
        return _nonfinite_positions(self.host)


def _read_later(finite: Tensor) -> _MaskOnHost:
    """The positions where the ``(B,)`` mask ``finite`` is False, to read later. On CUDA the mask is copied to
    pinned host memory now, behind the work already queued, and reading it waits for that copy alone."""
    if not finite.is_cuda:
        return _MaskOnHost(finite, None)
    host = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
    host.copy_(finite, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return _MaskOnHost(host, copied)


def _all_finite_known(finite: Tensor, read: _MaskOnHost | None) -> bool:
    """Whether every example is known to be finite without waiting for the GPU: on the CPU, or once the mask's copy
    has reached the host. In a step bound by the host's launches the GPU keeps up with the host, and the copy has
    usually landed by the time the zeroing of the non-finite examples' factors would be queued, which is then
    skipped (two launches per stacked group and one per other form, each with its Python)."""
    if not finite.is_cuda:
        return bool(finite.all())
    return read is not None and read.ready() == []


def _nonfinite_positions(finite: Tensor) -> list[int]:
    return (~finite).nonzero().flatten().tolist()


def _nothing() -> None:
    pass


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
            ``nn.Conv1d``/``Conv2d``/``Conv3d``, ``nn.GroupNorm`` and transformers' ``Conv1D``; other modules
            with parameters go through ``torch.func`` (exact, slower). A ``DistributedDataParallel`` model is
            unwrapped (its ``.module`` runs, so DDP's gradient all-reduce never does; reduce the clipped sums with
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
            the next call with the same shapes. ``None`` (default): eager. An empty batch returns the same as
            eagerly, without a graph.
        nonfinite: an example whose gradient norm or loss is not finite: ``"zero"`` (default) contributes zero
            (clip factor 0), is counted in the result's ``nonfinite`` and named in a
            :class:`~persample.checks.NonFiniteGradientWarning`; ``"raise"`` raises ``ValueError`` naming the
            batch positions (after the step's work, before anything is returned).
        head: a causal LM's output ``nn.Linear`` when ``model`` returns the last hidden states ``(B, T, d)``
            instead of the logits: the loss is the cross-entropy of ``head``'s logits computed chunk by chunk
            (:mod:`persample.engine.fused_head`), so the step never holds ``(B, T, V)`` logits; a trainable head
            (it may sit inside ``model``, unused by its forward) is clipped with the fused per-example norms.
            Not with ``loss_fn``, ``cuda_graph`` or :meth:`recording`; a trainable head tied to a parameter the
            model's forward uses (an input embedding) raises ``ValueError`` at the step.
        head_chunk_size: tokens per chunk of the head's logits (see :func:`persample.linear_cross_entropy`).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``loss_fn`` is not callable or ``head`` not an ``nn.Linear``.
        ValueError: ``max_grad_norm`` is not a positive finite number, an unknown ``strategy``, ``cuda_graph``
            or ``nonfinite``, or ``head`` with ``loss_fn`` or ``cuda_graph``.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> engine = GhostClipping(model, max_grad_norm=1.0)
        >>> out = engine.clipped_grad_sum(torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> out.norms.shape, out.grads["0.weight"].shape, out.nonfinite
        (torch.Size([16]), torch.Size([8, 4]), 0)

    References:
        Goodfellow, "Efficient Per-Example Gradient Computations", 2015 (per-example norms of a linear layer from
        its inputs and output gradients); Li, Tramèr, Liang and Hashimoto, "Large Language Models Can Be Strong
        Differentially Private Learners", ICLR 2022 (ghost clipping: the norms of sequence layers without
        per-example gradients); Bu, Wang, Zha and Karypis, "Differentially Private Optimization on Large Model at
        Small Cost", ICML 2023 (book-keeping: the clipped sum from the same backward; ghost norms or materialized
        gradients chosen per layer).
    """

    def __init__(self, model: nn.Module, *, max_grad_norm: float, ignore_index: int = -100,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, strategy: Strategy = "auto",
                 cuda_graph: Literal["post", "step"] | None = None, nonfinite: Literal["zero", "raise"] = "zero",
                 head: nn.Linear | None = None, head_chunk_size: int | None = None):
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
        check_nonfinite(nonfinite)
        if head is not None:
            if not isinstance(head, nn.Linear):
                raise TypeError(f"head must be an nn.Linear (the output layer), got {type(head).__name__}")
            if loss_fn is not None or cuda_graph is not None:
                raise ValueError("head= sets the loss (the fused linear cross-entropy) and runs eagerly: pass "
                                 f"loss_fn=None and cuda_graph=None, got loss_fn={loss_fn!r}, "
                                 f"cuda_graph={cuda_graph!r}")
        self.head, self.head_chunk_size = head, head_chunk_size
        # DDP's forward would prepare its reducer for a backward that, here, computes no parameter gradient;
        # the clipped sums are reduced by persample.DistributedDPOptimizer instead.
        self.model = model.module if isinstance(model, DistributedDataParallel) else model
        self.max_grad_norm = float(max_grad_norm)
        self.ignore_index = ignore_index
        self.loss_fn = loss_fn
        self.strategy = strategy
        self.nonfinite = nonfinite
        # Checked at every step (a model can switch to training mode between steps); listed once.
        self._batch_norms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._plan: Plan | None = None
        self._graphed = GraphedPost(self._norms_and_clipped_sums, self._graph_state) if cuda_graph == "post" else None
        self._graphed_step = GraphedStep(self._step, self._check_targets, self._graph_state) \
            if cuda_graph == "step" else None

    @torch.no_grad()
    def clipped_grad_sum(self, inputs: Tensor | tuple, targets: Tensor) -> ClippedGradSum:
        """One step on a physical batch: ``model(inputs)`` (a tuple is unpacked into positional
        arguments), each example's loss against ``targets``, norms, and ``sum_b c_b grad_b``.

        Call it inside ``torch.autocast`` for mixed precision; the gradients come back in the parameters'
        dtype. Hand ``grads`` and ``len(targets)`` to the DP optimizer, which adds the noise and averages.

        Raises:
            ValueError: a BatchNorm that uses batch statistics, a target out of range, a module that cannot run
                one example at a time, or with ``nonfinite="raise"`` an example whose norm or loss is not finite.
        """
        args = _as_args(inputs)
        refuse_batch_norm(self._batch_norms, running_stats_ok=True)
        if _batch_size(args) == 0:
            return self._empty(targets)
        if self._graphed_step is not None and _all_cuda(args, targets):
            (result, finite), read = self._graphed_step(args, targets)
            # The graph copied the mask to the host as the norms gave it: this waits for the norms, not the sums.
            mask = read()
            return self._report(result, _read_later(finite)() if mask is None else _nonfinite_positions(mask))
        # The mask of finite examples starts its copy to the host as soon as the norms give it, before the
        # clipped sums are queued: the wait below is then for the norms only, and the GPU works on the sums
        # while the host goes on to queue the noise and the optimizer's update.
        reads: list[_MaskOnHost] = []

        def on_mask(finite: Tensor) -> _MaskOnHost:
            reads.append(_read_later(finite))
            return reads[-1]

        (result, _), finish, _ = self._step(args, targets, on_mask=on_mask)
        finish()
        return self._report(result, reads[0]())

    def _report(self, result: ClippedGradSum, positions: list[int]) -> ClippedGradSum:
        # The warning points at the caller of clipped_grad_sum, past its no_grad wrapper.
        handle_nonfinite(positions, len(result.norms), self.nonfinite, stacklevel=4)
        return result._replace(nonfinite=len(positions))

    def _empty(self, targets) -> ClippedGradSum:
        """The result for ``B = 0``: zero sums, empty norms and losses (float32, float64 for float64 models)."""
        if isinstance(targets, Tensor) and targets.ndim and targets.shape[0] != 0:
            raise ValueError(f"inputs have batch size 0 but targets have {targets.shape[0]} (shape "
                             f"{tuple(targets.shape)})")
        trainable = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        params = list(trainable.values())
        acc = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        device = params[0].device if params else torch.device("cpu")
        empty = torch.zeros(0, dtype=acc, device=device)
        return ClippedGradSum(ClippedGrads({name: torch.zeros_like(p) for name, p in trainable.items()},
                                           self.max_grad_norm), empty, empty.clone())

    def _step(self, args: tuple, targets: Tensor, on_mask: Callable[[Tensor], None] | None = None
              ) -> tuple[tuple[ClippedGradSum, Tensor], Callable[[], None], int | None]:
        """One step, before its target check: ``((result, finite), finish, classes)`` (see :class:`GraphedStep`),
        ``finite`` the ``(B,)`` mask of the examples that counted; ``on_mask(finite)`` as soon as it is known."""
        step, losses, finish = self._backward(args, targets)
        with _no_autocast(self._plan):
            if self._graphed is not None and losses.is_cuda:
                norms, grads, finite = self._graphed(step, losses)
                if on_mask is not None:
                    on_mask(finite)
            else:
                norms, grads, finite = self._norms_and_clipped_sums(step, losses, on_mask)
        trainable = self._plan.trainable.items()
        result = ClippedGradSum(ClippedGrads({name: grads[p] if p in grads else
                                              torch.zeros(p.shape, dtype=p.dtype, device=p.device)
                                              for name, p in trainable}, self.max_grad_norm), norms, losses)
        return (result, finite), finish, step.classes

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
        """``(B,)`` each example's gradient norm over all trainable parameters, without clipping (NaN or inf for an
        example whose gradient is not finite)."""
        refuse_batch_norm(self._batch_norms, running_stats_ok=True)
        if _batch_size(_as_args(inputs)) == 0:
            return self._empty(targets).norms
        step, _, finish = self._backward(inputs, targets)
        with _no_autocast(self._plan):
            norms = self._norms(step)
        finish()
        return norms

    def _norms_and_clipped_sums(self, step: Step, losses: Tensor,
                                on_mask: Callable[[Tensor], _MaskOnHost | None] | None = None
                                ) -> tuple[Tensor, dict[nn.Parameter, Tensor], Tensor]:
        """``(norms, clipped sums, finite)``, ``finite`` the ``(B,)`` mask of the examples whose norm and loss are
        finite: the others get a factor of 0 and zeros for factors. ``on_mask(finite)`` runs before the sums are
        queued (not under a CUDA graph's capture); what it returns, the mask on its way to the host, lets the
        zeroing be skipped once the mask is known to be all finite."""
        norms = self._norms(step)
        finite = torch.isfinite(norms) & torch.isfinite(losses).to(norms.device)
        read = on_mask(finite) if on_mask is not None else None
        factors = torch.where(finite, (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0), 0.0)
        kept = self._drop_examples(step, finite, read)
        return norms, self._clipped_sums(step, factors, kept, read), finite

    @staticmethod
    def _drop_examples(step: Step, finite: Tensor, read: _MaskOnHost | None = None) -> Tensor | None:
        """Zeros the factors of the examples that are not ``finite``: the stacks and packed blocks, which the
        engine made, in place. Returns the mask for the other forms' factors (which can be the caller's input, or
        a layer's activation), which :meth:`_clipped_sums` zeroes one form at a time right before its sum, as new
        tensors: all of them at once would be a second copy of every factor at the step's peak. None, and nothing
        zeroed, when every example is known to be finite without a wait (:func:`_all_finite_known`)."""
        if _all_finite_known(finite, read):
            return None
        dropped = None

        def zero(t: Tensor, dim: int) -> None:
            nonlocal dropped
            if use_triton(t) and t.is_contiguous():
                # Reads each example's flag and writes only the dropped examples' rows (nearly always none).
                zero_rows_(t, finite, dim)
                return
            if dropped is None:
                dropped = ~finite
            shape = [1] * t.ndim
            shape[dim] = -1
            t.masked_fill_(dropped.view(shape), 0)

        for flat, _ in step.packed:
            zero(flat, 0)
        for stack in step.stacks:
            zero(stack.G, 1)
            if stack.A is not stack.G:
                zero(stack.A, 1)
        return finite

    @staticmethod
    def _kept(x: Form, finite: Tensor | None) -> Form:
        """``x`` with the factors of the examples that are not ``finite`` replaced by zeros. The tensors the engine
        owns, a Dense form's per-example gradients (which a rule made) and the output gradients ``G`` (which
        nothing else reads once the backward is over), are zeroed in place on the Triton path, reading only each
        example's flag; a layer's input (``A``, ``x``: the caller's input, or an activation) becomes a new
        tensor, as does everything off the Triton path."""
        if finite is None:
            return x

        def drop(t: Tensor, own: bool) -> Tensor:
            if own and use_triton(t) and t.is_contiguous():
                zero_rows_(t, finite, 0)
                return t
            return torch.where(finite.view(-1, *([1] * (t.ndim - 1))), t, 0)

        if isinstance(x, Dense):
            dropped = drop(x.g, True)
            return x if dropped is x.g else replace(x, g=dropped)
        return replace(x, **{name: drop(getattr(x, name), name == "G") for name in ("G", "A", "x")
                             if hasattr(x, name)})

    @staticmethod
    def _clipped_sums(step: Step, factors: Tensor, kept: Tensor | None = None, read: _MaskOnHost | None = None
                      ) -> dict[nn.Parameter, Tensor]:
        grads: dict[nn.Parameter, Tensor] = {}
        for flat, params in step.packed:
            summed = factors.to(flat.dtype) @ flat
            grads.update(zip(params, as_parameters(summed, params, [p.numel() for p in params]), strict=True))
        step.packed.clear()
        while step.stacks:
            grads.update(stack_clipped_sums(step.stacks.pop(), factors))
        if kept is not None and _all_finite_known(kept, read):  # the mask may have landed meanwhile
            kept = None
        for p in list(step.forms):
            forms = step.forms.pop(p)
            total = clipped_sum(GhostClipping._kept(forms.pop(), kept), factors, p.dtype)
            while forms:
                total += clipped_sum(GhostClipping._kept(forms.pop(), kept), factors, p.dtype)
            grads[p] = total
        if step.head is not None and step.head.params:
            grads.update(fused_head.clipped_sums(step.head, factors))
        return grads

    def _plan_for(self, args: tuple, kwargs: dict | None = None) -> Plan:
        if self._plan is None or not self._plan.is_current():
            self._plan = make_plan(self.model, args, kwargs)
            for hooked in self._plan.modules.values():
                if hooked.rule is None and any(is_dtensor(p) for p in hooked.used.values()):
                    raise ValueError(
                        f"{type(hooked.module).__name__} has sharded parameters (fully_shard) and no rule of the "
                        "engine: its torch.func fallback needs the gathered weights after the backward. Use modules "
                        "with rules (Linear, Embedding, LayerNorm, RMSNorm, GroupNorm, Conv, Conv1D)")
        return self._plan

    def _backward(self, inputs, targets) -> tuple[Step, Tensor, Callable[[], None]]:
        """The recorded step, the losses and ``finish()``, the target check: the caller queues the rest of
        the step first (see :func:`~persample.engine.output_grad.loss_and_output_grad`)."""
        args = _as_args(inputs)
        batch_size = _batch_size(args)
        plan = self._plan_for(args)
        first = args[0] if isinstance(args[0], Tensor) else None
        index_ndim = first.ndim if first is not None and not first.is_floating_point() else None
        step = Step(batch_size, index_ndim, self.strategy)
        devices = {p.device.type for p in plan.trainable.values()}
        autocast = any(torch.is_autocast_enabled(d) for d in devices)
        with recording(plan, step, autocast), torch.enable_grad():
            output = self.model(*args)
        if self.head is None:
            losses, output_grad, finish = loss_and_output_grad(output, targets, ignore_index=self.ignore_index,
                                                               loss_fn=self.loss_fn)
            step.classes = output.shape[-1] if self.loss_fn is None else None
        else:  # linear_cross_entropy checks the targets itself
            losses, output_grad, step.head = fused_head.loss_and_hidden_grad(
                output, self.head, targets, self._trainable_head(plan), ignore_index=self.ignore_index,
                chunk_size=self.head_chunk_size)
            finish = _nothing
        if output.requires_grad:
            with torch.autocast(output.device.type, enabled=False), _checkpointing_refused():
                torch.autograd.backward(output, output_grad)
        del output, output_grad
        self._after_backward(step, losses.is_cuda)
        return step, losses, finish

    def _trainable_head(self, plan: Plan) -> dict[str, nn.Parameter]:
        """The head's trainable parameters by role; refuses a trainable head that the model's forward uses too."""
        trainable = {role: p for role, p in self.head.named_parameters(recurse=False) if p.requires_grad}
        tied = [role for role, p in trainable.items() if any(p is q for q in plan.used)]
        if tied:
            raise ValueError(f"the head's {tied[0]} is trainable and used by the model's forward too (tied to an "
                             "input embedding): head= cannot clip it (the cross term of the two uses is not "
                             "computed); freeze it, untie it, or give the engine the logits")
        return trainable

    @staticmethod
    def _after_backward(step: Step, on_cuda: bool) -> None:
        """The held calls of batched rules and the fallbacks' per-example gradients, then the forms stacked and
        packed."""
        step.release_held()
        for call, grads, constant in step.fallbacks:
            if any(g is not None for g in grads):
                step.add(call, fallback.per_example_grads(call, grads, step.is_batched, constant))
            # The hooks that filled grads live as long as the autograd graph (a make_private loop's loss keeps it
            # through the clipping): the output gradients and inputs are dropped here, not with the graph.
            grads[:] = [None] * len(grads)
            call.args = call.kwargs = None
        step.fallbacks.clear()
        # Stacking and packing trade copies for fewer launches. Under CUDA graph capture launches cost nothing
        # at replay, while the stacks' large new blocks, which the memory freed earlier in the step cannot serve,
        # would grow the graph's pool for good (by how much: benchmarks/RESULTS.md, "Figures quoted from code").
        # The forms are then reduced one parameter at a time.
        if not (on_cuda and torch.cuda.is_current_stream_capturing()):
            step.stacks = pop_stacks(step.forms)
            step.pack_dense()

    @contextmanager
    def recording(self, args: tuple, kwargs: dict | None = None) -> Iterator["Recording"]:
        """Records the one forward ``model(*args, **kwargs)`` that the caller runs inside, for a backward that
        the caller runs too, from any loss ``sum_b scale_b * loss_b`` (``loss_b`` depending on example ``b``'s
        output alone); after that backward, :meth:`Recording.clipped_grad_sum` with the ``scale``.

        The trainable parameters are frozen for the forward, so that backward computes no ``param.grad``: the
        clipped sums come from the recording. This is how :class:`persample.PrivacyEngine` keeps a user's
        ``loss.backward()``.

        Raises:
            ValueError: no tensor with a batch dimension among the inputs.
        """
        if self.head is not None:
            raise ValueError("recording() runs the caller's loss: it does not combine with head=")
        kwargs = kwargs or {}
        batch_size = _batch_size((args, kwargs))
        plan = self._plan_for(args, kwargs)
        first = next((v for v in tree_leaves((args, kwargs)) if isinstance(v, Tensor)), None)
        index_ndim = first.ndim if not first.is_floating_point() else None
        step = Step(batch_size, index_ndim, self.strategy)
        autocast = any(torch.is_autocast_enabled(d) for d in {p.device.type for p in plan.trainable.values()})
        with recording(plan, step, autocast):
            yield Recording(self, step)

    def _norms(self, step: Step) -> Tensor:
        params = list(self._plan.trainable.values())
        acc = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        # Rows of (k, B) squared-norm terms, summed in one op.
        terms = [batched_dot(flat, flat).to(acc)[None] for flat, _ in step.packed]
        terms.extend(stack_norms(stack).to(acc) for stack in step.stacks)
        if step.head is not None and step.head.sq_norms is not None:
            terms.append(step.head.sq_norms.to(acc)[None])
        for forms in step.forms.values():
            for i, x in enumerate(forms):
                terms.append(inner(x, x).to(acc)[None])
                terms.extend(2 * inner(x, y).to(acc)[None] for y in forms[i + 1:])
        if not terms:
            device = params[0].device if params else torch.device("cpu")
            return torch.zeros(step.batch_size, dtype=acc, device=device)
        return torch.cat(terms).sum(0).clamp_min(0).sqrt()


class Recording:
    """One forward recorded by :meth:`GhostClipping.recording`, waiting for the caller's backward."""

    def __init__(self, engine: GhostClipping, step: Step):
        self._engine, self._step = engine, step
        # Set by clipped_grad_sum(report_later=True): report(stacklevel=1) warns at its caller's line (2: that
        # caller's caller, ...).
        self.report: Callable[..., None] | None = None

    @property
    def batch_size(self) -> int:
        return self._step.batch_size

    @torch.no_grad()
    def clipped_grad_sum(self, scale: Tensor | float, *, report_later: bool = False
                         ) -> tuple[dict[str, Tensor], Tensor]:
        """``(grads, norms)`` as in :class:`ClippedGradSum`, once the backward of ``sum_b scale_b * loss_b`` is
        done; ``scale``: ``(B,)``, or one number for every example (e.g. ``1 / B`` for a mean, made on the
        norms' device: no copy from the host). The backward's gradients are ``scale_b`` times the per-example
        ones: the norms are divided by ``|scale_b|`` and the clipped sum is of ``grad loss_b`` itself, so the
        loss's scale does not change the step. An example with ``scale_b == 0`` adds nothing (its norm reads 0).
        As in :meth:`GhostClipping.clipped_grad_sum`, the host does not wait for the norms: the non-finite
        examples (policy ``nonfinite``) are found from a copy of their mask read after the clipped sums are
        queued, and the warning or error comes before anything is returned. Call once.

        ``report_later``: with ``nonfinite="zero"``, do not wait for the mask here: :attr:`report` is set to a
        function that reads it and warns, for the caller to run once it has queued the work that follows (the
        optimizer's step), so the host goes on queueing while the GPU finishes the backward. The sums are the same.
        """
        engine, step = self._engine, self._step
        plan = engine._plan
        # Whether a CUDA graph capture may be running: the scale's device, or (a float scale) the parameters'.
        on_cuda = scale.is_cuda if isinstance(scale, Tensor) else any(p.is_cuda for p in plan.trainable.values())
        engine._after_backward(step, on_cuda)
        with _no_autocast(plan):
            scaled = engine._norms(step)
            if isinstance(scale, Tensor):
                scale = scale.to(device=scaled.device, dtype=scaled.dtype).expand(step.batch_size)
            else:
                scale = torch.full((step.batch_size,), float(scale), device=scaled.device, dtype=scaled.dtype)
            inverse = torch.where(scale != 0, scale.reciprocal(), torch.zeros_like(scale))
            norms = scaled * inverse.abs()
            # The engine's non-finite policy: such an example gets a factor of 0 and zeros for its factors.
            finite = torch.isfinite(norms)
            read = _read_later(finite)  # its copy queued before the sums: a wait for the norms only
            factors = torch.where(finite, (engine.max_grad_norm / (norms + 1e-6)).clamp(max=1.0), 0.0)
            kept = engine._drop_examples(step, finite, read)
            grads = engine._clipped_sums(step, factors * torch.where(finite, inverse, 0.0), kept, read)
        if report_later and engine.nonfinite == "zero":
            self.report = lambda stacklevel=1: handle_nonfinite(read(), step.batch_size, "zero", stacklevel + 1)
        else:
            handle_nonfinite(read(), step.batch_size, engine.nonfinite, stacklevel=3)
        return ClippedGrads({name: grads[p] if p in grads else torch.zeros_like(p)
                             for name, p in plan.trainable.items()}, engine.max_grad_norm), norms


def clipped_grad_sum(model: nn.Module, inputs: Tensor | tuple, targets: Tensor, *, max_grad_norm: float,
                     ignore_index: int = -100, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                     strategy: Strategy = "auto") -> ClippedGradSum:
    """One-off form of :meth:`GhostClipping.clipped_grad_sum` (which, in a training loop, finds the
    parameter uses only once). Arguments as :class:`GhostClipping`; returns :class:`ClippedGradSum`.

    Raises:
        TypeError, ValueError: as :class:`GhostClipping` and :meth:`GhostClipping.clipped_grad_sum`.

    Examples:
        >>> import torch
        >>> import persample
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
        >>> fast = persample.clipped_grad_sum(model, x, y, max_grad_norm=0.1)
        >>> slow = persample.clip_per_sample(persample.per_sample_grads(model, x, y), 0.1)  # per-example grads
        >>> all(torch.allclose(fast.grads[name], slow[name], atol=1e-6) for name in slow)
        True

    References:
        As :class:`GhostClipping`.
    """
    engine = GhostClipping(model, max_grad_norm=max_grad_norm, ignore_index=ignore_index, loss_fn=loss_fn,
                           strategy=strategy)
    return engine.clipped_grad_sum(inputs, targets)


def per_sample_grad_norms_fast(model: nn.Module, inputs: Tensor | tuple, targets: Tensor, *,
                               ignore_index: int = -100, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                               strategy: Strategy = "auto") -> Tensor:
    """``(B,)`` each example's gradient norm without materializing per-example gradients: the norms of
    :meth:`GhostClipping.clipped_grad_sum`, without the clipping (float32, float64 for float64 models).

    Raises:
        TypeError, ValueError: as :func:`clipped_grad_sum`.

    Examples:
        >>> import torch
        >>> import persample
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 10))
        >>> tokens, targets = torch.randint(0, 10, (4, 6)), torch.randint(0, 10, (4, 6))  # (B, T)
        >>> fast = persample.per_sample_grad_norms_fast(model, tokens, targets)
        >>> torch.allclose(fast, persample.per_sample_grad_norms(model, tokens, targets), rtol=1e-4)
        True

    References:
        As :class:`GhostClipping`.
    """
    engine = GhostClipping(model, max_grad_norm=1.0, ignore_index=ignore_index, loss_fn=loss_fn,
                           strategy=strategy)
    return engine.per_sample_grad_norms(inputs, targets)
