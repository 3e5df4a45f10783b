"""DP-SGD's optimizer: noise once per logical step on the sum of clipped per-sample gradients.

One logical step (one Poisson-sampled batch, see :class:`persample.PoissonSampler`) may be split into
several physical batches that fit in memory. For each physical batch some engine produces the clipped
sum ``{name: sum_i clip(g_i)}`` (:func:`persample.clip_per_sample` on :func:`persample.per_sample_grads`,
or a faster engine); :meth:`DPOptimizer.accumulate` adds it up, and :meth:`DPOptimizer.step` finishes the
chain clip -> sum -> add noise -> scale::

    p.grad = (sum of clipped per-sample gradients + N(0, (noise_multiplier * max_grad_norm)**2)) / expected_batch_size

then steps the wrapped optimizer and records the step with the accountant. Dividing by the *expected*
batch size (``sample_rate * dataset size``), not the realized one, keeps the sensitivity of the average
fixed: the realized size depends on which examples were sampled, so it is private too.
"""

import functools
import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from persample.checks import check_max_grad_norm, check_noise_multiplier, check_sample_rate
from persample.dp._accounting import Mechanism, PrivacyAccountant
from persample.dp._noise import gaussian_noise
from persample.engine.ghost_clipping import ClippedGrads

NOISE_BUCKET_NUMEL = 1 << 24  # elements of noise drawn at once by DPOptimizer.step (64 MiB in float32)


class DPOptimizer:
    """Wraps any ``torch.optim.Optimizer`` to take DP-SGD steps from clipped per-sample gradient sums.

    Args:
        optimizer: the optimizer over the model's parameters (SGD, Adam, ...); it only ever sees noisy
            gradients.
        named_parameters: ``model.named_parameters()``; those with ``requires_grad`` are the ones trained,
            and every one of them must be in ``optimizer``.
        noise_multiplier: ``sigma`` >= 0; the noise std is ``noise_multiplier * max_grad_norm``.
        max_grad_norm: the per-example clipping bound ``C`` > 0 the sums were clipped to.
        expected_batch_size: ``sample_rate * dataset size`` > 0, the divisor of the noisy sum.
        sample_rate: the Poisson sampling probability in (0, 1], recorded with every step for accounting.
        accountant: ``"rdp"``, ``"prv"`` or a :class:`PrivacyAccountant` to record into.
        generator: seeded ``torch.Generator`` for the noise (None: PyTorch's global generator).
        secure_mode: draw the noise from the OS CSPRNG instead (see :mod:`persample.dp._noise`).

    Raises:
        ValueError: a value out of range, or a trainable parameter that is not in ``optimizer``.

    Examples:
        >>> import torch
        >>> import persample
        >>> model = torch.nn.Linear(4, 3)
        >>> dp = persample.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
        ...                            noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8,
        ...                            sample_rate=0.01, generator=torch.Generator().manual_seed(0))
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))  # one Poisson batch, here one physical batch
        >>> dp.accumulate(persample.clip_per_sample(persample.per_sample_grads(model, x, y), 1.0), len(x))
        >>> dp.step()  # noise once, divided by expected_batch_size, the SGD step, the accountant's record
        >>> model.weight.grad.shape, dp.accountant.history
        (torch.Size([3, 4]), [(1.0, 0.01, 1)])
        >>> 0 < dp.epsilon(1e-5) < 1
        True

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (DP-SGD); McMahan et al., "Learning
        Differentially Private Recurrent Language Models", ICLR 2018 (the sum divided by the expected batch size).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named_parameters: Iterable[tuple[str, nn.Parameter]],
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        sample_rate: float,
        accountant: Mechanism | PrivacyAccountant = "rdp",
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
    ):
        check_noise_multiplier(noise_multiplier)
        check_max_grad_norm(max_grad_norm)
        check_sample_rate(sample_rate)
        if not (isinstance(expected_batch_size, (int, float)) and math.isfinite(expected_batch_size)
                and expected_batch_size > 0):
            raise ValueError(f"expected_batch_size must be a finite number > 0, got {expected_batch_size!r}")
        if secure_mode and generator is not None:
            raise ValueError("secure_mode=True draws the noise from the OS CSPRNG: pass generator=None")
        self.params = {name: p for name, p in named_parameters if p.requires_grad}
        if not self.params:
            raise ValueError("named_parameters has no parameter with requires_grad=True: nothing to train")
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in self.params.items() if id(p) not in in_optimizer]
        if missing:
            raise ValueError(f"trainable parameters {missing} are not in the optimizer: DPOptimizer only steps "
                             "parameters the wrapped optimizer holds")
        named = {id(p) for p in self.params.values()}
        untracked = [tuple(p.shape) for group in optimizer.param_groups for p in group["params"]
                     if p.requires_grad and id(p) not in named]
        if untracked:
            raise ValueError(f"the optimizer holds trainable parameters (shapes {untracked}) that are not in "
                             "named_parameters: they would be stepped without noise")
        self.optimizer = optimizer
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.sample_rate = float(sample_rate)
        self.accountant = accountant if isinstance(accountant, PrivacyAccountant) else PrivacyAccountant(accountant)
        self.generator = generator
        self.secure_mode = secure_mode
        self.num_examples = 0
        self._summed: dict[str, Tensor] | None = None
        self._borrowed = False  # whether _summed holds the caller's tensors (see _add)

    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimizer's parameter groups (learning rates live there)."""
        return self.optimizer.param_groups

    def accumulate(self, summed_clipped: Mapping[str, Tensor], num_examples: int) -> None:
        """Adds one physical batch's clipped sum ``{name: param.shape}`` over its ``num_examples`` examples.

        An empty physical batch needs no call (or a call with zeros and ``num_examples=0``).

        The tensors are read, never modified, and not copied here: the step (or the next call) makes the
        optimizer's own sums from them, so leave them unchanged until then.

        The sums are checked for NaN and inf, which takes a host sync, except the engine's
        (:class:`~persample.engine.ghost_clipping.ClippedGrads`, the ``grads`` of
        :meth:`persample.GhostClipping.clipped_grad_sum`): those are finite by construction wherever the dtypes
        hold their bound, and the host goes on queueing the step's work.

        Raises:
            ValueError: names or shapes that do not match the trainable parameters, ``num_examples < 0``, or a
                sum that is not finite (clipping gives a finite sum; a NaN or inf comes from gradients that
                bypassed its non-finite policy), which is not added: a NaN never reaches the parameters.
        """
        clipped_to = summed_clipped.clipped_to if isinstance(summed_clipped, ClippedGrads) else None
        self._add(summed_clipped, num_examples, owned=False, clipped_to=clipped_to)

    def _add(self, summed_clipped: Mapping[str, Tensor], num_examples: int, owned: bool,
             clipped_to: float | None = None) -> None:
        """:meth:`accumulate`; with ``owned`` the optimizer may keep the tensors of a first batch as its sums
        rather than copy them (the caller made them for it and does not read them again): one copy of the
        gradients fewer at the peak. ``clipped_to``: the caller vouches that these are sums of ``num_examples``
        gradients clipped to this norm with finite factors (the engine's, non-finite examples zeroed): then no
        element exceeds ``num_examples * clipped_to``, and where every dtype holds that bound (with what was
        accumulated before) the sums are finite without looking (a host sync, which would stop the host queueing
        the step's work)."""
        if not isinstance(num_examples, int) or num_examples < 0:
            raise ValueError(f"num_examples must be an int >= 0, got {num_examples!r}")
        if set(summed_clipped) != set(self.params):
            raise ValueError(f"summed_clipped must have one entry per trainable parameter: expected "
                             f"{sorted(self.params)}, got {sorted(summed_clipped)}")
        for name, p in self.params.items():
            if summed_clipped[name].shape != p.shape:
                raise ValueError(f"summed_clipped[{name!r}] has shape {tuple(summed_clipped[name].shape)}, "
                                 f"expected the parameter's shape {tuple(p.shape)} (sum over the batch first)")
        bound = (self.num_examples + num_examples) * max(self.max_grad_norm, clipped_to or 0.0)
        dtypes = {t.dtype for t in summed_clipped.values()} | {p.dtype for p in self.params.values()}
        if clipped_to is not None and all(_holds(dtype, bound) for dtype in dtypes):
            names = []
        else:
            names = _nonfinite([summed_clipped[name].detach() for name in self.params], list(self.params))
        if names:
            raise ValueError(f"summed_clipped has NaN or inf values in {names}: clipped sums are finite, so these "
                             "gradients bypassed the non-finite policy of clip_per_sample / GhostClipping "
                             "(nonfinite='zero' drops such examples); nothing was accumulated")
        incoming = {name: summed_clipped[name].detach().to(p.dtype) for name, p in self.params.items()}
        if self._summed is None:
            # The caller's tensors are kept as they are, not copied: unless ``owned`` (or converted, a copy
            # already), they are the caller's, and the noise (or a second batch) is added out of place, which
            # makes the optimizer's own copy in the same multi-tensor op.
            self._summed = incoming
            self._borrowed = not owned
        else:
            keys = list(self._summed)
            totals, new = [self._summed[n] for n in keys], [incoming[n] for n in keys]
            if self._borrowed:
                self._summed = dict(zip(keys, torch._foreach_add(totals, new), strict=True))
                self._borrowed = False
            else:
                torch._foreach_add_(totals, new)
        self.num_examples += num_examples

    def step(self) -> None:
        """Adds noise to the accumulated sum (zeros if nothing was accumulated), divides by
        ``expected_batch_size``, writes ``p.grad``, steps the wrapped optimizer, records the step for
        accounting, and clears the accumulation."""
        borrowed = self._borrowed  # the caller's tensors, not to be modified (see _add)
        summed = self._summed or {name: torch.zeros_like(p) for name, p in self.params.items()}
        self._summed = None
        std = self.noise_multiplier * self.max_grad_norm
        # The sums become the gradients: in place, or (the caller's tensors, see _add) out of place, once per
        # tensor either way. The noise is drawn one bucket of parameters (same dtype and device, in the
        # parameters' order, at most NOISE_BUCKET_NUMEL elements unless one parameter is larger) at a time: a few
        # kernel launches per bucket instead of three per parameter, and at most one bucket of noise held beyond
        # the gradients.
        for names in buckets(summed, NOISE_BUCKET_NUMEL):
            totals, own = [summed[name] for name in names], not borrowed
            if std > 0:
                sizes = [t.numel() for t in totals]
                noise = gaussian_noise((sum(sizes),), std, device=totals[0].device, dtype=totals[0].dtype,
                                       generator=self.generator, secure_mode=self.secure_mode)
                noise = [n.view(t.shape) for n, t in zip(noise.split(sizes), totals, strict=True)]
                if own:
                    torch._foreach_add_(totals, noise)
                else:
                    totals, own = torch._foreach_add(totals, noise), True
                del noise
            if own:
                torch._foreach_div_(totals, self.expected_batch_size)
            else:
                totals = torch._foreach_div(totals, self.expected_batch_size)
            summed.update(zip(names, totals, strict=True))
        for name, p in self.params.items():
            p.grad = summed[name]
        self.optimizer.step()
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self._clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drops the accumulated sums and clears the parameters' gradients."""
        self._clear()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def epsilon(self, delta: float) -> float:
        """The epsilon spent by the steps taken so far, at ``delta`` in (0, 1)."""
        return self.accountant.epsilon(delta)

    def _clear(self) -> None:
        self._summed = None
        self._borrowed = False
        self.num_examples = 0


def _holds(dtype: torch.dtype, bound: float) -> bool:
    """Whether every value of magnitude up to ``bound`` is finite in ``dtype``."""
    return dtype.is_floating_point and torch.finfo(dtype).max > bound


def buckets(tensors: Mapping[str, Tensor], cap: int, size=lambda name, t: t.numel()) -> list[list[str]]:
    """The names in order, grouped by dtype and device, a group cut where it would pass ``cap`` (in the units of
    ``size(name, tensor)``, elements by default); a tensor larger than ``cap`` is a bucket alone."""
    done: list[list[str]] = []
    open_: dict[tuple, list] = {}  # key -> [names, total]
    for name, t in tensors.items():
        key = (t.dtype, t.device)
        bucket = open_.get(key)
        this = size(name, t)
        if bucket is None:
            open_[key] = [[name], this]
        elif bucket[0] and bucket[1] + this > cap:
            done.append(bucket[0])
            open_[key] = [[name], this]
        else:
            bucket[0].append(name)
            bucket[1] += this
    done.extend(names for names, _ in open_.values())
    return done


def _nonfinite(tensors: list[Tensor], names: list[str]) -> list[str]:
    """The names of the tensors holding a NaN or an inf, with one host sync: the L1 norms of all tensors (a few
    multi-tensor kernels on CUDA), summed in float32 or wider, are finite exactly when the tensors are, unless a
    sum of finite values overflows; a non-finite norm is confirmed element-wise."""
    if not tensors:
        return []
    if any(not t.is_floating_point() for t in tensors):
        return [name for name, t in zip(names, tensors, strict=True) if not bool(t.isfinite().all())]
    accumulate = functools.reduce(torch.promote_types, {t.dtype for t in tensors}, torch.float32)
    norms = torch._foreach_norm(tensors, 1, dtype=accumulate)
    finite = torch.stack([n.to(norms[0].device) for n in norms]).isfinite()
    if bool(finite.all()):
        return []
    suspects = [i for i, ok in enumerate(finite.tolist()) if not ok]
    return [names[i] for i in suspects if not bool(tensors[i].isfinite().all())]
