"""The audit of a DP-SGD training run: canaries through the library's own training path, then the bounds.

:func:`audit_dp_sgd` trains ``model`` on ``inputs, targets`` plus canaries, with the code a user runs:
:class:`persample.PoissonSampler` draws each logical batch, the per-sample engine (``"vmap"``:
:func:`persample.per_sample_grads` and :func:`persample.clip_per_sample`; ``"fast"``:
:class:`persample.GhostClipping`) gives the clipped sum of each physical batch, and
:class:`persample.DPOptimizer` adds the noise, scales and steps. Two kinds of canaries:

* **white-box** (:mod:`persample.audit._canaries`): ``m`` Dirac canaries on a parameter block, each inserted
  with probability 1/2, scored after every step from the block's noisy gradient;
* **black-box**: copies of training examples with a wrong label, each inserted with probability 1/2, scored
  after training by minus their loss under the final model (what anyone who can query the model sees).

Both sets of scores go through the three bounds of :mod:`persample.audit._bounds`. The claim audited is the
accountant's epsilon for the claimed ``noise_multiplier``, ``sample_rate`` and ``steps``; the optimizer and the
engine are swappable (``dp_optimizer=``, ``engine=``), so a different implementation of the same claim
(another noise source, clipping, a distributed optimizer) is audited against it unchanged.

Distributed: when ``dp_optimizer`` returns a :class:`persample.DistributedDPOptimizer`, every rank calls
:func:`audit_dp_sgd` with the same arguments (and a model initialized the same, which the optimizer checks);
each rank trains on its part of every batch (:class:`persample.DistributedPoissonSampler`, one seed on every
rank, so that the union is the one-process batch), the optimizer sums the parts and adds the noise, and every
rank scores the same noisy gradient and returns the same result. The audited claim is unchanged: the run is
the one-process run with the work split, so any difference the split makes to the privacy shows as a bound.
"""

import math
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from persample.audit._bounds import (
    Bound,
    check_confidence,
    check_delta,
    clopper_pearson_bound,
    clopper_pearson_upper,
    gaussian_bound,
    one_run_bound,
)
from persample.audit._canaries import CanaryModel, CanaryScores, pack
from persample.checks import check_max_grad_norm, check_mechanism, check_sample_rate
from persample.dp import DistributedDPOptimizer, DistributedPoissonSampler, DPOptimizer, PoissonSampler, epsilon_for
from persample.engine import GhostClipping
from persample.loss import cross_entropy
from persample.per_sample import clip_per_sample, per_sample_grads

EngineFn = Callable[[nn.Module, Tensor, Tensor, float], dict[str, Tensor]]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

# Fewer canaries than this leave halves too small for any of the bounds to mean anything.
MIN_CANARIES = 16


@dataclass(frozen=True)
class AuditResult:
    """What :func:`audit_dp_sgd` measured.

    ``claimed_epsilon``: the accountant's epsilon at ``delta`` for the claimed run. ``white_box`` and
    ``black_box``: ``{"clopper_pearson", "gaussian", "one_run"}`` -> :class:`Bound` (``black_box`` None without
    black-box canaries). The scores ``(m,)`` and insertion flags ``(m,)`` of each kind are kept for plots.
    """

    claimed_epsilon: float
    delta: float
    confidence: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    num_canaries: int
    accountant: str
    white_box: dict[str, Bound]
    black_box: dict[str, Bound] | None
    white_box_scores: np.ndarray
    white_box_inserted: np.ndarray
    black_box_scores: np.ndarray | None
    black_box_inserted: np.ndarray | None

    def exceeded(self) -> list[str]:
        """The white-box bounds above the claim (a claim that is wrong, at the bounds' confidence)."""
        return [name for name, bound in self.white_box.items() if bound.epsilon > self.claimed_epsilon]


def bounds(scores, inserted, *, delta: float, confidence: float) -> dict[str, Bound]:
    """The three lower bounds of :mod:`persample.audit._bounds` on one set of canary scores."""
    return {"clopper_pearson": clopper_pearson_bound(scores, inserted, delta=delta, confidence=confidence),
            "gaussian": gaussian_bound(scores, inserted, delta=delta, confidence=confidence),
            "one_run": one_run_bound(scores, inserted, delta=delta, confidence=confidence)}


def largest_clopper_pearson_bound(num_canaries: int, delta: float, confidence: float) -> float:
    """The assumption-free bound of a perfect test on ``num_canaries`` canaries (a quarter of them inserted and a
    quarter left out in the half that bounds): no audit with that many can show more."""
    side = max(num_canaries // 4, 1)
    upper = float(clopper_pearson_upper(0, side, (1 - confidence) / 2))
    return max(math.log(max(1 - delta - upper, 1e-300) / upper), 0.0)


def audit_dp_sgd(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    num_canaries: int,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    steps: int,
    delta: float = 1e-5,
    confidence: float = 0.95,
    accountant: str = "rdp",
    engine: str | EngineFn = "vmap",
    optimizer: OptimizerFactory | None = None,
    dp_optimizer: Callable[..., DPOptimizer] = DPOptimizer,
    black_box_canaries: int = 0,
    max_physical_batch_size: int = 1024,
    seed: int = 0,
    progress: bool | None = None,
) -> AuditResult:
    """Trains ``model`` with DP-SGD on the data plus canaries and bounds the epsilon the run really has.

    Args:
        model: a classifier, ``(B, ...)`` -> logits ``(B, V)``; it is trained in place (on the data and the
            black-box canaries; the white-box canaries do not touch it).
        inputs: ``(N, ...)`` float training inputs.
        targets: ``(N,)`` int64 class indices.
        num_canaries: ``m`` >= 16 white-box canaries (thousands for a tight bound).
        noise_multiplier: the claimed ``sigma`` > 0.
        max_grad_norm: the clipping bound ``C`` > 0.
        sample_rate: the claimed Poisson rate ``q`` in (0, 1] over the whole training set (the data and the
            inserted canaries), so that the expected batch size is ``q`` times its size.
        steps: the number of DP-SGD steps >= 1.
        delta: the ``delta`` of the claim, in (0, 1).
        confidence: the probability in (0, 1) that each reported bound holds; ``1 - confidence`` is the chance
            that a correct implementation is reported above its claim.
        accountant: ``"rdp"`` or ``"prv"``, the accountant whose epsilon is the claim.
        engine: ``"vmap"``, ``"fast"``, or ``engine(model, inputs, targets, max_grad_norm) -> {name: clipped
            sum}`` for one physical batch.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer`` for the model's parameters (default SGD, lr
            0.1, momentum 0.9); the canary block is added as a group with learning rate 0.
        dp_optimizer: called like :class:`persample.DPOptimizer` (``optimizer, named_parameters, *,
            noise_multiplier, max_grad_norm, expected_batch_size, sample_rate, accountant, generator``); must
            return an object with ``accumulate``, ``step`` and ``zero_grad`` that writes the noisy gradient
            to each parameter's ``.grad``. A :class:`persample.DistributedDPOptimizer` makes the audit
            distributed (module docstring): call it on every rank.
        black_box_canaries: mislabeled copies of training examples, each inserted with probability 1/2 (0:
            no black-box audit; else >= 16).
        max_physical_batch_size: the physical batch size of the engine.
        seed: seeds the canaries' coins, the sampling and the noise.
        progress: show a progress bar (None: only on a terminal).

    Returns:
        :class:`AuditResult`.

    Raises:
        ValueError: a value out of range (``delta``, ``confidence``: (0, 1)), too few canaries for a bound
            above 0 at ``confidence``, a model that is not a classifier of ``(B, ...)`` -> ``(B, V)`` or uses
            BatchNorm.
        TypeError: a model that is not an ``nn.Module``, an ``optimizer`` or ``dp_optimizer`` factory that does
            not return what is needed.

    Warns:
        UserWarning: a canary is sampled less than once on average (``sample_rate * steps < 1``), or too few
            canaries for the assumption-free bound to reach the claim.

    Examples:
        >>> from persample.app.digits import DigitsCNN, digits_split
        >>> x, y, _, _ = digits_split()
        >>> result = audit_dp_sgd(DigitsCNN(), x[:64], y[:64], num_canaries=256, noise_multiplier=2.0,
        ...                       max_grad_norm=1.0, sample_rate=0.5, steps=4, progress=False)
        >>> result.exceeded()
        []

    References:
        Nasr et al., "Tight auditing of differentially private machine learning", USENIX Security 2023;
        Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run", NeurIPS 2023.
    """
    num_classes = _check(model, inputs, targets, num_canaries, noise_multiplier, max_grad_norm, sample_rate, steps,
                         delta, confidence, accountant, engine, black_box_canaries, max_physical_batch_size)
    claimed = epsilon_for(noise_multiplier, delta, sample_rate, steps, accountant=accountant)
    _warn_if_weak(num_canaries, sample_rate, steps, claimed, delta, confidence)
    coins = torch.Generator().manual_seed(seed)
    # The training set is assembled on the CPU (the coins' generator lives there), then moved to the data's device.
    device, x, y = inputs.device, inputs.detach().cpu(), targets.cpu()
    n_data = len(y)

    wb_inserted = torch.rand(num_canaries, generator=coins) < 0.5
    wb_ids = wb_inserted.nonzero().flatten()
    bb_source = torch.randperm(n_data, generator=coins)[:black_box_canaries]
    bb_labels = (y[bb_source] + torch.randint(1, num_classes, (len(bb_source),), generator=coins)) % num_classes
    bb_inserted = torch.rand(len(bb_source), generator=coins) < 0.5

    bb_in = bb_source[bb_inserted]
    data = torch.cat([pack(x, torch.full((n_data,), num_canaries)),
                      pack(x[bb_in], torch.full((len(bb_in),), num_canaries)),
                      pack(x.new_zeros((len(wb_ids), *x.shape[1:])), wb_ids)]).to(device)
    labels = torch.cat([y, bb_labels[bb_inserted], torch.zeros(len(wb_ids), dtype=y.dtype)]).to(device)
    n = len(labels)

    wrapped = CanaryModel(model, num_canaries, tuple(inputs.shape[1:]), num_classes, max_grad_norm=max_grad_norm)
    wrapped.to(device)
    inner = (optimizer or _default_optimizer)(model.parameters())
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"optimizer(params) must return a torch.optim.Optimizer, got {type(inner).__name__}")
    # Learning rate 0: the block stays at 0, so every canary's gradient is the same Dirac at every step.
    inner.add_param_group({"params": list(wrapped.canary_block.parameters()), "lr": 0.0, "weight_decay": 0.0})
    noise = torch.Generator(device).manual_seed(seed + 1)
    dp = dp_optimizer(inner, wrapped.named_parameters(), noise_multiplier=noise_multiplier,
                      max_grad_norm=max_grad_norm, expected_batch_size=sample_rate * n, sample_rate=sample_rate,
                      accountant=accountant, generator=noise)
    missing = [name for name in ("accumulate", "step", "zero_grad") if not callable(getattr(dp, name, None))]
    if missing:
        raise TypeError(f"dp_optimizer(...) returned a {type(dp).__name__} without {missing}: the audit needs "
                        "DPOptimizer's accumulate/step/zero_grad")
    clipped_sum = _engine(engine, wrapped, max_grad_norm)
    scores = CanaryScores(num_canaries, noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                          max_grad_norm=max_grad_norm, expected_batch_size=sample_rate * n)

    sampling = torch.Generator().manual_seed(seed + 2)
    rank = dp.rank if isinstance(dp, DistributedDPOptimizer) else 0
    batches = (DistributedPoissonSampler(n, sample_rate, steps=steps, generator=sampling, rank=dp.rank,
                                         world_size=dp.world_size)
               if isinstance(dp, DistributedDPOptimizer) else PoissonSampler(n, sample_rate, steps=steps,
                                                                             generator=sampling))
    block = wrapped.canary_block.weight
    wrapped.train()
    for idx in tqdm(batches, total=steps, unit="step", desc="audit", file=sys.stderr,
                    disable=True if rank else None if progress is None else not progress):
        idx = idx.to(device)
        for part in idx.split(max_physical_batch_size):
            dp.accumulate(clipped_sum(wrapped, data[part], labels[part], max_grad_norm), len(part))
        dp.step()
        if block.grad is None:
            raise TypeError(f"{type(dp).__name__}.step() left the canary block's .grad empty: the audit reads "
                            "the noisy gradient there")
        scores.update(block.grad[:num_canaries, 0])
        dp.zero_grad()

    white_box = bounds(scores.scores.numpy(), wb_inserted.numpy(), delta=delta, confidence=confidence)
    bb_scores = bb_flags = black_box = None
    if black_box_canaries:
        model.eval()
        with torch.no_grad():
            logits = model(inputs[bb_source.to(device)])
            bb_scores = -cross_entropy(logits, bb_labels.to(device), reduction="none").double().cpu().numpy()
        model.train()
        bb_flags = bb_inserted.numpy()
        black_box = bounds(bb_scores, bb_flags, delta=delta, confidence=confidence)
    return AuditResult(claimed, delta, confidence, float(noise_multiplier), float(sample_rate), steps, num_canaries,
                       accountant, white_box, black_box, scores.scores.numpy(), wb_inserted.numpy(), bb_scores,
                       bb_flags)


def _default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _engine(engine: str | EngineFn, wrapped: nn.Module, max_grad_norm: float) -> EngineFn:
    if callable(engine):
        return engine
    if engine == "fast":
        ghost = GhostClipping(wrapped, max_grad_norm=max_grad_norm)
        return lambda model, x, y, bound: ghost.clipped_grad_sum(x, y).grads
    return lambda model, x, y, bound: clip_per_sample(per_sample_grads(model, x, y), bound)


def _check(model, inputs, targets, num_canaries, noise_multiplier, max_grad_norm, sample_rate, steps, delta,
           confidence, accountant, engine, black_box_canaries, max_physical_batch_size) -> int:
    """Every argument at the boundary; returns the number of classes ``V``."""
    check_delta(delta)
    check_confidence(confidence)
    check_sample_rate(sample_rate)
    check_max_grad_norm(max_grad_norm)
    check_mechanism(accountant)
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a finite number > 0 (without noise there is no claim to "
                         f"audit), got {noise_multiplier!r}")
    for name, value, least in (("num_canaries", num_canaries, MIN_CANARIES), ("steps", steps, 1),
                               ("max_physical_batch_size", max_physical_batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if not (isinstance(black_box_canaries, int) and (black_box_canaries == 0 or black_box_canaries >= MIN_CANARIES)):
        raise ValueError(f"black_box_canaries must be 0 or an int >= {MIN_CANARIES}, got {black_box_canaries!r}")
    if not (callable(engine) or engine in ("vmap", "fast")):
        raise ValueError(f"engine must be 'vmap', 'fast' or a callable, got {engine!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(inputs, Tensor) and isinstance(targets, Tensor)):
        raise TypeError(f"inputs and targets must be tensors, got {type(inputs).__name__} and "
                        f"{type(targets).__name__}")
    if not inputs.is_floating_point() or inputs.ndim < 2:
        raise ValueError(f"inputs must be floating point (N, ...) with N >= 1, got {inputs.dtype} "
                         f"{tuple(inputs.shape)}")
    if targets.ndim != 1 or targets.dtype != torch.int64 or len(targets) != len(inputs):
        raise ValueError(f"targets must be int64 (N,) class indices, one per input; got {targets.dtype} "
                         f"{tuple(targets.shape)} for {len(inputs)} inputs")
    if black_box_canaries > len(targets):
        raise ValueError(f"black_box_canaries ({black_box_canaries}) copies training examples: at most "
                         f"{len(targets)}")
    batch_norms = [name for name, module in model.named_modules()
                   if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if batch_norms:
        raise ValueError(f"the audit cannot wrap a model with BatchNorm ({batch_norms}): it mixes the examples of a "
                         "batch, so no example (canary or not) has a gradient of its own")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameter: there is no DP-SGD run to audit")
    with torch.no_grad():
        out = model(inputs[:2])
    if not (isinstance(out, Tensor) and out.ndim == 2 and out.shape[0] == min(2, len(inputs)) and out.shape[1] >= 2):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the audit wraps classifiers whose output is logits (B, classes >= 2), and adds the "
                         f"canaries' logits to them; this model returns {shape} for a batch of 2")
    if int(targets.min()) < 0 or int(targets.max()) >= out.shape[1]:
        raise ValueError(f"targets must be in [0, {out.shape[1]}), got values in [{int(targets.min())}, "
                         f"{int(targets.max())}]")
    return int(out.shape[1])


def _warn_if_weak(num_canaries: int, sample_rate: float, steps: int, claimed: float, delta: float,
                  confidence: float) -> None:
    if sample_rate * steps < 1:
        warnings.warn(f"an inserted canary is in {sample_rate * steps:.2f} batches on average (sample_rate "
                      f"{sample_rate} x {steps} steps): most leave no trace and the bounds will be weak; take more "
                      "steps or a larger sample_rate", UserWarning, stacklevel=3)
    largest = largest_clopper_pearson_bound(num_canaries, delta, confidence)
    if largest < claimed:
        warnings.warn(f"with {num_canaries} canaries at confidence {confidence} the assumption-free bound cannot "
                      f"exceed {largest:.2f}, below the claimed epsilon {claimed:.2f}: use more canaries to test "
                      "the claim without the Gaussian assumption", UserWarning, stacklevel=3)
