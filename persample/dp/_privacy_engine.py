"""``PrivacyEngine``: DP-SGD behind a user's own training loop, with Opacus's vocabulary.

    engine = PrivacyEngine()                                   # accountant="prv", as Opacus 1.6
    model, optimizer, criterion, loader = engine.make_private(module=model, optimizer=optimizer,
        data_loader=loader, criterion=nn.CrossEntropyLoss(), noise_multiplier=1.1, max_grad_norm=1.0)
    for x, y in loader:                                        # the loop is the user's, unchanged
        optimizer.zero_grad(); loss = criterion(model(x), y); loss.backward(); optimizer.step()
    engine.get_epsilon(1e-5)

Design:

* **The model is the user's own module**, not a wrapper: ``make_private`` registers a forward pre-hook and a
  forward hook on it (removed by :meth:`PrivacyEngine.detach`). Its ``state_dict`` keeps the user's keys (no
  ``_module.`` prefix), ``model is module`` holds, ``train()``/``eval()`` are untouched, and
  ``torch.compile(model)`` of the returned model runs the hooks (a model compiled before is refused). A forward
  with gradients enabled is recorded by the fast engine (:meth:`persample.GhostClipping.recording`): the
  trainable parameters are frozen for that forward, each hooked layer keeps its input, and the user's
  ``loss.backward()`` delivers each layer's output gradient, from which the engine forms per-example norms
  (ghost norms or per-example gradients, whichever is cheaper per layer, the ``torch.func`` fallback for a
  module without a rule) and the clipped sum, with no ``param.grad`` computed by the backward. Forwards
  under ``torch.no_grad()`` (evaluation) are not recorded.
* **Per-example losses.** The backward of ``loss = sum_b s_b * loss_b`` gives each layer ``s_b`` times example
  ``b``'s own output gradient; the engine divides the ``s_b`` out (:meth:`persample.engine.Recording.
  clipped_grad_sum`), so it needs them:

  - ``criterion=`` given (Opacus 1.6's ghost-clipping form; ``make_private`` then returns four objects): the
    returned criterion computes the per-element losses with ``reduction="none"``, reduces them to one loss
    per example (the criterion's own mean or sum over that example's elements — for a sequence flattened to
    ``(B * T, V)`` the mean over its counted tokens, ``ignore_index`` and class weights respected) and returns
    their mean or sum over examples as an ordinary tensor; a hook on the per-example losses reads the exact
    ``s_b`` in the backward, whatever the loss is later multiplied by (``loss / accumulation_steps``).
    The backward must go through it: one that reaches the model without passing through it raises.
  - no criterion (Opacus's hooks form, three objects returned): the loss must be a mean (``loss_reduction=
    "mean"``, ``s_b = 1 / B``) or a sum (``"sum"``, ``s_b = 1``) over the batch of losses each depending on
    its own example only; ``criterion(model(x), y)`` with any ``torch.nn`` loss's default reduction is one.
    A sequence loss averaged over all tokens of the batch is then treated as ``B`` times each example's sum
    over its tokens divided by the batch's token count, as Opacus does.

  Either way the step is the noisy average of clipped per-example gradients of ``loss_b``: scaling the loss
  does not change it. BatchNorm (whose output mixes examples) is refused with the fix named.
* **When the clipped sum is formed.** A tensor hook on the model's output queues a callback on autograd's
  engine that runs when the backward ends; it turns the recording into the clipped sum and adds it to the
  optimizer's accumulation (:meth:`persample.DPOptimizer.accumulate`). ``loss.backward()`` thus returns with
  the work done, the layers' saved inputs released; ``param.grad`` stays untouched until ``optimizer.step()``
  writes the noisy average.
* **The optimizer** (:class:`PrivateOptimizer`) is a ``torch.optim.Optimizer`` (so LR schedulers accept it)
  sharing the user's optimizer's ``param_groups`` and ``state``; ``step()`` runs :meth:`persample.DPOptimizer.
  step` (noise ``N(0, (sigma C)^2)`` on the sum, division by the expected batch size, the user's update, the
  accountant's record). A second backward before ``step()`` raises: with Poisson sampling one logical batch is
  one step, and a loop that accumulates several loader batches would be accounted as one (Opacus forbids it
  too); :class:`persample.BatchMemoryManager` splits a logical batch into physical ones and defers the step
  to the last, and the sum over its physical batches is exactly that of the whole batch.
* **The data loader** (:class:`persample.DPDataLoader`) samples Poisson batches over the user's dataset with its
  ``collate_fn``, empty batches included (a forward on an empty batch records nothing and its backward adds
  nothing; the step then adds noise only).
* **Defaults: those of Opacus 1.6's ``PrivacyEngine``**, so that a run reports the same epsilon after the switch.
  ``accountant="prv"`` (tighter than RDP for the same run; :class:`persample.DPOptimizer` and ``persample train``
  keep ``"rdp"``). The sample rate is ``1 / len(data_loader)`` with ``len(data_loader)`` steps per epoch: an
  epoch is one pass over the data in expectation, and ``make_private_with_epsilon``'s ``epochs`` mean that.
  The expected batch size is then ``len(dataset) / len(data_loader)``: the loader's ``batch_size`` when it
  divides the dataset, slightly less otherwise; the noisy sum is divided by exactly that (Opacus by its
  integer part). ``persample train`` samples at ``batch_size / n`` for ``round(n / batch_size)`` steps per
  epoch, which keeps the batch size and makes an epoch about one pass.
* **Checkpoints**: :meth:`PrivacyEngine.state_dict` holds the accountant's history and, outside secure mode, the
  states of the sampling and noise generators; the model's and optimizer's own ``state_dict`` are the user's.
  A run resumed from them reports the same epsilon and, with seeded generators, draws the same batches and
  noise as an uninterrupted one.
* ``grad_sample_mode="vmap"`` replaces the engine by the ``torch.func`` pipeline
  (:func:`persample.per_sample_grads` of ``<model(x_b), dL/dout_b>`` per example): one tensor input, slower,
  for checking the engine or models it cannot hook.
"""

import copy
import warnings
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.autograd import Variable
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten
from torch.utils.data import DataLoader

from persample.checks import check_max_grad_norm, check_mechanism, check_noise_multiplier
from persample.dp._accounting import Mechanism, PrivacyAccountant, noise_multiplier_for
from persample.dp._data_loader import DPDataLoader
from persample.dp._optimizer import DPOptimizer
from persample.engine import GhostClipping
from persample.engine.ghost_clipping import Recording
from persample.per_sample import clip_per_sample, per_sample_grads, per_sample_norms

GradSampleMode = Literal["ghost", "vmap"]
_NORM_FIX = ("replace it by nn.GroupNorm (opacus.validators.ModuleValidator.fix(model) does this), or freeze it "
             "and keep it in eval mode")


class PrivateOptimizer(torch.optim.Optimizer):
    """The optimizer :meth:`PrivacyEngine.make_private` returns: the user's optimizer behind DP-SGD.

    Shares ``param_groups``, ``state`` and ``defaults`` with ``original_optimizer``; ``step()`` adds the
    noise to the clipped sum the backward accumulated, averages over the expected batch size and steps the
    original optimizer; ``zero_grad()`` also drops the accumulation (except inside a logical batch that
    :class:`persample.BatchMemoryManager` split). ``noise_multiplier``, ``max_grad_norm``,
    ``expected_batch_size`` and ``accountant`` are those of the :class:`persample.DPOptimizer` in ``dp``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, dp: DPOptimizer):
        # No Optimizer.__init__: the parameter groups and state are the original optimizer's own objects.
        self.original_optimizer = optimizer
        self.dp = dp
        self._skip_next = False
        self._mid_batch = False  # the last step() was skipped: the logical batch goes on
        self._accepting = True  # no physical batch accumulated since the last step
        self._reports: list[Callable[..., None]] = []  # the engine's non-finite warnings, read after step()
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}

    @property
    def param_groups(self) -> list[dict]:
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        self.original_optimizer.param_groups = groups

    @property
    def state(self):
        return self.original_optimizer.state

    @property
    def defaults(self) -> dict:
        return self.original_optimizer.defaults

    @property
    def noise_multiplier(self) -> float:
        return self.dp.noise_multiplier

    @property
    def max_grad_norm(self) -> float:
        return self.dp.max_grad_norm

    @property
    def expected_batch_size(self) -> float:
        return self.dp.expected_batch_size

    @property
    def accountant(self) -> PrivacyAccountant:
        return self.dp.accountant

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Makes the next ``step()`` only keep the accumulation (the logical batch is not over)."""
        self._skip_next = do_skip

    def step(self, closure: Callable[[], Any] | None = None):
        """One DP-SGD step from what the backward accumulated (noise only if nothing was); ``closure``, if
        given, runs first with gradients enabled (forward and backward) and its value is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._skip_next:
            self._skip_next, self._mid_batch, self._accepting = False, True, True
            self._report_nonfinite()
            return loss
        self.dp.step()
        self._mid_batch, self._accepting = False, True
        self._report_nonfinite()
        return loss

    def _report_nonfinite(self) -> None:
        """The warnings for examples dropped as non-finite, read only now: the host waits for the backward's end
        here, with the noise and the update already queued behind it, not before queueing them."""
        while self._reports:
            self._reports.pop(0)(stacklevel=3)  # the user's optimizer.step() line

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._report_nonfinite()
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        if not self._mid_batch:
            self.dp.zero_grad(set_to_none=set_to_none)
            self._accepting = True

    def add_param_group(self, param_group: dict) -> None:
        raise ValueError("parameters cannot be added to a private optimizer: their gradients would not be clipped "
                         "or noised; add them to the optimizer before make_private")

    def state_dict(self) -> dict:
        """The original optimizer's state dict (load it into the original optimizer or this one)."""
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return (f"PrivateOptimizer({self.original_optimizer!r}, noise_multiplier={self.noise_multiplier}, "
                f"max_grad_norm={self.max_grad_norm}, expected_batch_size={self.expected_batch_size})")

    def _accumulate(self, grads: dict[str, Tensor], num_examples: int,
                    report: Callable[..., None] | None = None) -> None:
        if not self._accepting:
            raise RuntimeError("a second loss.backward() before optimizer.step(): with Poisson sampling each "
                               "batch of the data loader is one DP-SGD step, so gradients cannot be accumulated over "
                               "several of them (the accountant would count one step). Step after every batch, or "
                               "split a large batch with persample.BatchMemoryManager")
        # The engine's fresh sums, read by nobody else, and clipped: each example adds at most max_grad_norm.
        self.dp._add(grads, num_examples, owned=True, clipped_to=self.dp.max_grad_norm)
        self._accepting = False
        if report is not None:
            self._reports.append(report)


@dataclass
class _Pending:
    """One recorded forward waiting for its backward."""

    batch_size: int
    finish: Callable[[Tensor | float], tuple[dict[str, Tensor], Tensor]] | None  # None: empty batch
    scale: Tensor | None = None  # d loss / d loss_b, from the criterion's hook
    done: bool = False
    stale: bool = False
    grad_output: Tensor | None = None  # the vmap pipeline's: d loss / d output
    recording: Recording | None = None  # the engine's (mode "ghost")


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    first = next((v for v in tree_leaves((args, kwargs)) if isinstance(v, Tensor)), None)
    return None if first is None or first.ndim == 0 else first.shape[0]


class _Attached:
    """The hooks that make one module private, and the state of its current step."""

    def __init__(self, module: nn.Module, optimizer: PrivateOptimizer, *, max_grad_norm: float,
                 loss_reduction: str, with_criterion: bool, mode: GradSampleMode):
        self.module, self.optimizer = module, optimizer
        self.loss_reduction, self.with_criterion, self.mode = loss_reduction, with_criterion, mode
        self.max_grad_norm = max_grad_norm
        self.engine = GhostClipping(module, max_grad_norm=max_grad_norm)
        self.pending: _Pending | None = None
        self._stack: ExitStack | None = None
        self._depth = 0
        self._busy = False  # inside the finishing work (the vmap pipeline calls the model)
        self.handles = [module.register_forward_pre_hook(self._before, with_kwargs=True),
                        module.register_forward_hook(self._after, with_kwargs=True, always_call=True)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def _before(self, module: nn.Module, args: tuple, kwargs: dict):
        if not torch.is_grad_enabled() or self._busy:
            return None
        if self._depth > 0:
            self._depth += 1
            return None
        batch_size = _batch_size(args, kwargs)
        if batch_size is None:
            raise ValueError(f"{type(module).__name__}'s inputs must include a tensor with the batch dimension "
                             "first: DP-SGD clips each example's gradient")
        if self.pending is not None and not self.pending.done:
            self.pending.stale = True
        stack = ExitStack()
        try:
            if batch_size == 0 or self.mode == "vmap":
                params = self._trainable()
                for p in params:
                    p.requires_grad_(False)
                stack.callback(lambda: [p.requires_grad_(True) for p in params])
                pending = _Pending(batch_size, None)
                if batch_size:
                    pending.finish = self._vmap_finish(pending, args, kwargs)
            else:
                recording = stack.enter_context(self.engine.recording(args, kwargs))
                pending = _Pending(batch_size, recording.clipped_grad_sum, recording=recording)
        except BaseException:
            stack.close()
            raise
        self._depth, self._stack, self.pending = 1, stack, pending
        return None

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output):
        if not torch.is_grad_enabled() or self._busy or self._depth == 0:
            return None
        self._depth -= 1
        if self._depth > 0:
            return None
        self._stack.close()
        self._stack = None
        pending = self.pending
        if output is None:  # the forward raised (the hook is called anyway, to restore the parameters)
            return None
        leaves, spec = tree_flatten(output)
        floating = [i for i, v in enumerate(leaves) if isinstance(v, Tensor) and v.is_floating_point()]
        if pending.finish is None or self.mode == "vmap":
            # No parameter takes part in the backward (frozen): a zero leaf gives the outputs a node to reach.
            anchor = torch.zeros((), device=leaves[floating[0]].device, requires_grad=True) if floating else None
            for i in floating:
                leaves[i] = leaves[i] + anchor
        queued = []

        def on_grad(grad: Tensor) -> None:
            if pending.stale:
                raise RuntimeError("the model was called again before the loss of its earlier call was "
                                   "backpropagated: one forward, one loss.backward() per batch (concatenate the "
                                   "inputs to use them in one loss)")
            if pending.done:
                raise RuntimeError("loss.backward() ran twice through one forward of the private model: each "
                                   "example's gradient is clipped and summed once per forward")
            pending.grad_output = grad if self.mode == "vmap" else None
            if not queued:
                queued.append(True)
                Variable._execution_engine.queue_callback(lambda: self._finish(pending))

        for i in floating:
            if leaves[i].requires_grad:
                leaves[i].register_hook(on_grad)
        return tree_unflatten(leaves, spec)

    def _finish(self, pending: _Pending) -> None:
        pending.done = True
        if pending.finish is None:
            return
        if self.with_criterion:
            if pending.scale is None:
                raise RuntimeError("loss.backward() reached the private model without passing through the "
                                   "criterion make_private returned: compute the loss as criterion(model(x), y) "
                                   "with that criterion, whose per-example losses the clipping needs")
            scale = pending.scale
        else:
            # One number: the engine makes it on the model's device (a tensor from the host would be a copy that
            # waits for the backward).
            scale = 1.0 / pending.batch_size if self.loss_reduction == "mean" else 1.0
        self._busy = True
        try:
            if self.mode == "vmap":
                grads, _ = pending.finish(scale)
                report = None
            else:
                grads, _ = pending.finish(scale, report_later=True)
                report = pending.recording.report
        finally:
            self._busy = False
        pending.finish = None
        self.optimizer._accumulate(grads, pending.batch_size, report)

    def _vmap_finish(self, pending: _Pending, args: tuple, kwargs: dict,
                     ) -> Callable[[Tensor | float], tuple[dict[str, Tensor], Tensor]]:
        if len(args) != 1 or kwargs or not isinstance(args[0], Tensor):
            raise ValueError("grad_sample_mode='vmap' takes a model called with one tensor, model(x); use the "
                             "default grad_sample_mode='ghost' for other signatures")
        x = args[0].detach()
        device = x.device.type
        autocast = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None

        def finish(scale: Tensor | float) -> tuple[dict[str, Tensor], Tensor]:
            grad_out = pending.grad_output
            if not isinstance(scale, Tensor):
                scale = torch.full((pending.batch_size,), scale, device=grad_out.device, dtype=grad_out.dtype)
            inverse = torch.where(scale != 0, scale.reciprocal(), torch.zeros_like(scale)).to(grad_out)
            targets = grad_out * inverse.view(-1, *([1] * (grad_out.ndim - 1)))
            with torch.autocast(*autocast) if autocast else nullcontext():
                grads = per_sample_grads(self.module, x, targets, loss_fn=_linear)
            norms = per_sample_norms(grads)
            return clip_per_sample(grads, self.max_grad_norm, norms=norms), norms

        return finish


def _linear(output: Tensor, grad_output: Tensor) -> Tensor:
    """The loss whose gradient w.r.t. ``output`` is ``grad_output``: the backward's own, per example."""
    return (output.float() * grad_output.float()).sum()


class PrivateLoss:
    """The criterion :meth:`PrivacyEngine.make_private` returns when given one: ``criterion(output, target)``
    returns the mean (or sum, by the criterion's ``reduction``) over examples of each example's loss, an
    ordinary scalar tensor to log or call ``.backward()`` on. Example ``b``'s loss is the criterion's reduction
    over example ``b``'s elements only (for a sequence, flattened or not, the mean over its counted tokens).
    Outside a recorded forward (evaluation under ``torch.no_grad()``) it is the criterion itself.
    """

    def __init__(self, criterion: nn.Module, attached: _Attached):
        self.criterion = criterion
        self.reduction = criterion.reduction
        self._per_element = copy.copy(criterion)
        self._per_element.reduction = "none"
        self._attached = attached

    def __call__(self, input: Tensor, target: Tensor, *args, **kwargs) -> Tensor:
        pending = self._attached.pending
        if pending is None or pending.done or pending.stale or not torch.is_grad_enabled():
            return self.criterion(input, target, *args, **kwargs)
        B = pending.batch_size
        elements = self._per_element(input, target, *args, **kwargs)
        if not isinstance(elements, Tensor) or elements.ndim == 0:
            raise ValueError(f"{type(self.criterion).__name__} with reduction='none' must return one loss per "
                             "element so that each example's loss is known; it returned a scalar")
        if B == 0:
            return elements.sum()
        if elements.numel() % B:
            raise ValueError(f"the loss is not a mean or sum of per-example losses: {type(self.criterion).__name__} "
                             f"gave {tuple(elements.shape)} losses for a batch of {B} examples. Its input must "
                             "have the batch dimension first (or be (B * T, ...), flattened batch-major)")
        rows = elements.reshape(B, -1)
        if self.reduction == "sum":
            per_example = rows.sum(1)
        else:
            per_example = rows.sum(1) / self._denominators(target, rows)
        # Summed over the criterion's calls that reach the backward (two terms of one loss add their scales).
        per_example.register_hook(lambda g: setattr(pending, "scale", g.detach() if pending.scale is None
                                                    else pending.scale + g.detach()))
        return per_example.mean() if self.reduction == "mean" else per_example.sum()

    def _denominators(self, target: Tensor, rows: Tensor) -> Tensor:
        ignore_index = getattr(self.criterion, "ignore_index", None)
        if ignore_index is None or target.is_floating_point() or target.numel() != rows.numel():
            return torch.full((rows.shape[0],), rows.shape[1], dtype=rows.dtype, device=rows.device)
        counted = (target != ignore_index).reshape(rows.shape)
        weight = getattr(self.criterion, "weight", None)
        counts = (weight[target.clamp(0, len(weight) - 1)].reshape(rows.shape) * counted if weight is not None
                  else counted.to(rows.dtype))
        # An example with no counted element has loss 0, not 0/0.
        return counts.sum(1).to(rows.dtype).clamp_min(torch.finfo(rows.dtype).tiny)


class PrivacyEngine:
    """DP-SGD for a model, optimizer and data loader the user already has (see the module docstring).

    Args:
        accountant: ``"prv"`` (default, as Opacus 1.6) or ``"rdp"``; one accountant for every
            ``make_private`` of this engine.
        secure_mode: noise and Poisson sampling from the OS CSPRNG (no seedable generator may be passed).

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> import persample
        >>> data = TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> engine = persample.PrivacyEngine()
        >>> private, optimizer, loader = engine.make_private(
        ...     module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        ...     data_loader=DataLoader(data, batch_size=16), noise_multiplier=1.1, max_grad_norm=1.0)
        >>> private is model, type(loader).__name__, len(loader)  # the user's model, with hooks
        (True, 'DPDataLoader', 4)
        >>> for x, y in loader:  # the user's loop, unchanged
        ...     optimizer.zero_grad(); F.cross_entropy(model(x), y).backward(); optimizer.step()
        >>> round(engine.get_epsilon(delta=1e-5), 1)  # 4 steps at sample rate 1/4, "prv"
        3.6
        >>> engine.detach()  # the hooks are gone: the model trains normally again

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016. Li et al., "Large Language Models
        Can Be Strong Differentially Private Learners", ICLR 2022 (ghost clipping). Yousefpour et al.,
        "Opacus: User-Friendly Differential Privacy Library in PyTorch", 2021 (the vocabulary).
    """

    def __init__(self, *, accountant: Mechanism = "prv", secure_mode: bool = False):
        check_mechanism(accountant)
        if not isinstance(secure_mode, bool):
            raise TypeError(f"secure_mode must be a bool, got {type(secure_mode).__name__}")
        self.accountant = PrivacyAccountant(accountant)
        self.secure_mode = secure_mode
        self._attached: list[_Attached] = []
        self._loaders: list[DataLoader] = []

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float,
        criterion: nn.Module | None = None,
        loss_reduction: Literal["mean", "sum"] = "mean",
        poisson_sampling: bool = True,
        clipping: Literal["flat"] = "flat",
        noise_generator: torch.Generator | None = None,
        grad_sample_mode: GradSampleMode = "ghost",
    ) -> tuple:
        """Makes the training loop private: ``(module, optimizer, data_loader)``, or ``(module, optimizer,
        criterion, data_loader)`` when ``criterion`` is given (as Opacus 1.6 in ghost mode).

        Args:
            module: the model; returned as is, with hooks (its ``state_dict`` keeps its keys). Its inputs
                have the batch dimension first. No BatchNorm.
            optimizer: any ``torch.optim.Optimizer`` over the module's parameters.
            data_loader: a ``DataLoader`` over a map-style dataset; Poisson sampling at ``1 / len(data_loader)``
                (see the module docstring).
            noise_multiplier: ``sigma`` >= 0; the noise std on the clipped sum is ``sigma * max_grad_norm``.
            max_grad_norm: the per-example clipping bound ``C`` > 0 (flat clipping over all parameters).
            criterion: a ``torch.nn`` loss module with ``reduction`` ``"mean"`` or ``"sum"``, wrapped to give
                each example's loss (see the module docstring); None: the loss is computed by the user, with
                ``loss_reduction``.
            loss_reduction: without ``criterion``, whether the loss is the ``"mean"`` or ``"sum"`` over the
                batch of per-example losses.
            poisson_sampling: replace the loader by a :class:`persample.DPDataLoader` (the accountant's
                assumption). ``False`` keeps the loader, accounted at ``1 / len(data_loader)``: an approximation,
                with a warning.
            clipping: ``"flat"`` only.
            noise_generator: seeded ``torch.Generator`` for the noise (not in secure mode).
            grad_sample_mode: ``"ghost"`` (the fast engine, default) or ``"vmap"`` (the ``torch.func`` pipeline).

        Raises:
            ValueError: a value out of range, BatchNorm in the module, optimizer parameters not in the module,
                a module made private already, a criterion without a ``"mean"``/``"sum"`` reduction,
                ``noise_generator`` in secure mode.
            TypeError: arguments of the wrong type, a module compiled already (compile the returned one) or
                wrapped in ``DataParallel``/``DistributedDataParallel``.

        Examples:
            >>> import torch
            >>> from torch.utils.data import DataLoader, TensorDataset
            >>> import persample
            >>> data = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
            >>> model = torch.nn.Linear(4, 3)
            >>> model, optimizer, criterion, loader = persample.PrivacyEngine(accountant="rdp").make_private(
            ...     module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            ...     data_loader=DataLoader(data, batch_size=8), criterion=torch.nn.CrossEntropyLoss(),
            ...     noise_multiplier=1.0, max_grad_norm=1.0, noise_generator=torch.Generator().manual_seed(0))
            >>> x, y = next(iter(loader))
            >>> optimizer.zero_grad(); criterion(model(x), y).backward(); optimizer.step()
            >>> optimizer.noise_multiplier, optimizer.expected_batch_size  # 32 examples / 4 batches
            (1.0, 8.0)

        References:
            Yousefpour et al., "Opacus: User-Friendly Differential Privacy Library in PyTorch", 2021 (the
            signature); Li et al., "Large Language Models Can Be Strong Differentially Private Learners", ICLR
            2022 (ghost clipping, behind ``criterion=``).
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, PrivateOptimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer that is not private yet, got "
                            f"{type(optimizer).__name__}")
        if not isinstance(data_loader, DataLoader):
            raise TypeError(f"data_loader must be a torch.utils.data.DataLoader, got {type(data_loader).__name__}")
        check_noise_multiplier(noise_multiplier)
        check_max_grad_norm(max_grad_norm)
        if clipping != "flat":
            raise ValueError(f"clipping must be 'flat' (one bound over all parameters), got {clipping!r}; for "
                             "per-layer clipping use persample.clip_per_layer on persample.per_sample_grads")
        if grad_sample_mode not in ("ghost", "vmap"):
            raise ValueError(f"grad_sample_mode must be 'ghost' (the fast engine) or 'vmap', got {grad_sample_mode!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum' (a per-example mean or sum over the batch), "
                             f"got {loss_reduction!r}")
        if criterion is not None and getattr(criterion, "reduction", None) not in ("mean", "sum"):
            raise ValueError(f"criterion must be a torch.nn loss with reduction 'mean' or 'sum' (it is called with "
                             f"reduction='none' for per-example losses), got {type(criterion).__name__} with "
                             f"reduction={getattr(criterion, 'reduction', None)!r}; or pass no criterion and "
                             "compute a per-example mean or sum yourself (loss_reduction)")
        if self.secure_mode and noise_generator is not None:
            raise ValueError("secure_mode=True draws the noise from the OS CSPRNG: pass noise_generator=None")
        if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
            raise TypeError("module is compiled (torch.compile) already: make the model private first, then compile "
                            "the returned one (model = torch.compile(model)), whose forward then runs the hooks")
        if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            raise TypeError(f"module is wrapped in {type(module).__name__}: make_private takes the model itself, on "
                            "one process (its noise and accounting are those of a single process)")
        if any(a.module is module for a in self._attached):
            raise ValueError("this module is private already (make_private was called on it)")
        batch_norms = [name for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if batch_norms:
            raise ValueError(f"BatchNorm layers {batch_norms} mix the examples of a batch, so an example's gradient "
                             f"depends on the others and clipping it bounds nothing: {_NORM_FIX}")
        in_module = {id(p) for p in module.parameters()}
        if any(id(p) not in in_module for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("the optimizer holds parameters that are not the module's")

        if poisson_sampling:
            loader = DPDataLoader.from_data_loader(data_loader, secure_mode=self.secure_mode)
        else:
            warnings.warn(f"poisson_sampling=False: the accountant assumes each example joins each batch "
                          f"independently with probability 1/{len(data_loader)}, which data_loader's batches do not "
                          "do; the epsilon reported is an approximation", UserWarning, stacklevel=2)
            loader = data_loader
        sample_rate = 1 / len(data_loader)
        expected_batch_size = sample_rate * len(loader.dataset)
        dp = DPOptimizer(optimizer, module.named_parameters(), noise_multiplier=noise_multiplier,
                         max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                         sample_rate=sample_rate, accountant=self.accountant, generator=noise_generator,
                         secure_mode=self.secure_mode)
        private = PrivateOptimizer(optimizer, dp)
        attached = _Attached(module, private, max_grad_norm=float(max_grad_norm), loss_reduction=loss_reduction,
                             with_criterion=criterion is not None, mode=grad_sample_mode)
        self._attached.append(attached)
        self._loaders.append(loader)
        if criterion is not None:
            return module, private, PrivateLoss(criterion, attached), loader
        return module, private, loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float,
        epsilon_tolerance: float = 0.01,
        **kwargs,
    ) -> tuple:
        """:meth:`make_private` with the smallest noise multiplier whose ``epochs`` epochs (of
        ``len(data_loader)`` steps each) spend at most ``target_epsilon`` at ``target_delta`` under this
        engine's accountant.

        Raises:
            ValueError: as :meth:`make_private`, ``epochs`` not an int >= 1, or a budget no noise reaches.

        Examples:
            >>> import torch
            >>> from torch.utils.data import DataLoader, TensorDataset
            >>> import persample
            >>> data = TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
            >>> model = torch.nn.Linear(4, 3)
            >>> engine = persample.PrivacyEngine(accountant="rdp")
            >>> model, optimizer, loader = engine.make_private_with_epsilon(
            ...     module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            ...     data_loader=DataLoader(data, batch_size=16), target_epsilon=3.0, target_delta=1e-5, epochs=5,
            ...     max_grad_norm=1.0)
            >>> steps = 5 * len(loader)  # the run the noise was chosen for
            >>> epsilon = persample.epsilon_for(optimizer.noise_multiplier, 1e-5, 1 / len(loader), steps)
            >>> 2.9 < epsilon <= 3.0
            True

        References:
            Mironov, "Rényi Differential Privacy", CSF 2017; Gopi, Lee and Wutschitz, "Numerical Composition of
            Differential Privacy", NeurIPS 2021 (the accountants whose epsilon is inverted).
        """
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        if not isinstance(data_loader, DataLoader) or len(data_loader) == 0:
            raise ValueError("data_loader must be a DataLoader with at least one batch")
        sigma = noise_multiplier_for(target_epsilon, target_delta, 1 / len(data_loader),
                                     steps=epochs * len(data_loader),
                                     accountant=self.accountant.mechanism, epsilon_tolerance=epsilon_tolerance)
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                 noise_multiplier=sigma, max_grad_norm=max_grad_norm, **kwargs)

    def get_epsilon(self, delta: float) -> float:
        """The epsilon spent so far at ``delta`` in (0, 1) (0 before any step, inf after a step without noise)."""
        return self.accountant.epsilon(delta)

    def detach(self) -> None:
        """Removes the hooks from every module this engine made private (they train normally again)."""
        for attached in self._attached:
            attached.remove()
        self._attached.clear()

    def state_dict(self) -> dict:
        """The privacy state: the accountant's history and, outside secure mode, the sampling and noise
        generators' states (one entry per ``make_private``, None where PyTorch's global generator is used)."""
        return {
            "accountant": self.accountant.state_dict(),
            "secure_mode": self.secure_mode,
            "sample_generators": [None if self.secure_mode else _generator_state(getattr(
                loader.batch_sampler, "generator", None)) for loader in self._loaders],
            "noise_generators": [None if self.secure_mode else _generator_state(a.optimizer.dp.generator)
                                 for a in self._attached],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores :meth:`state_dict`'s privacy state, after the same ``make_private`` calls as when saved.

        Raises:
            ValueError: a different accountant or secure mode, or another number of ``make_private`` calls.
        """
        mechanism = state_dict["accountant"]["mechanism"]
        if mechanism != self.accountant.mechanism or state_dict["secure_mode"] != self.secure_mode:
            raise ValueError(f"the state is of a {mechanism!r} accountant with secure_mode="
                             f"{state_dict['secure_mode']}, this engine has {self.accountant.mechanism!r} and "
                             f"secure_mode={self.secure_mode}")
        if len(state_dict["noise_generators"]) != len(self._attached):
            raise ValueError(f"the state has {len(state_dict['noise_generators'])} private models, this engine "
                             f"{len(self._attached)}: call make_private as in the saved run before loading")
        self.accountant.load_state_dict(state_dict["accountant"])
        for loader, state in zip(self._loaders, state_dict["sample_generators"], strict=True):
            _set_generator_state(getattr(loader.batch_sampler, "generator", None), state, "sampling")
        for attached, state in zip(self._attached, state_dict["noise_generators"], strict=True):
            _set_generator_state(attached.optimizer.dp.generator, state, "noise")


def _generator_state(generator: torch.Generator | None) -> Tensor | None:
    return None if generator is None else generator.get_state()


def _set_generator_state(generator: torch.Generator | None, state: Tensor | None, what: str) -> None:
    if (generator is None) != (state is None):
        raise ValueError(f"the saved {what} generator is {'absent' if state is None else 'present'} but this run's "
                         f"is {'absent' if generator is None else 'present'}: seed both runs alike")
    if generator is not None:
        generator.set_state(state)


