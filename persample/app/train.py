"""The main job: DP-SGD on scikit-learn's digits with a small CNN, end to end.

Each logical step draws a Poisson batch (:class:`persample.PoissonSampler`), splits it into physical
batches of at most ``max_physical_batch_size``, and for each computes per-sample gradients
(:func:`persample.per_sample_grads`), their norms and clipped sum (:func:`persample.clip_per_sample`),
accumulated by :class:`persample.DPOptimizer`, which adds the noise once and steps. The non-private
baseline (``dp=False``) takes shuffled fixed-size batches and steps with the mean of the same per-sample
gradients (the ordinary batch gradient), so both runs report per-example gradient norms.

An example whose gradient is not finite contributes zero (``nonfinite="zero"``): each epoch's line and the
report count them, and their norms are left out of the norm statistics and the histogram.
``nonfinite="raise"`` stops the run at the first one.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), the DP run is data parallel: the model is
wrapped in ``DistributedDataParallel`` (which broadcasts rank 0's parameters), each rank takes its part of the
same global Poisson batch (:class:`persample.DistributedPoissonSampler`) and
:class:`persample.DistributedDPOptimizer` sums the clipped sums over the ranks and adds the noise once. The
accountant sees the same steps at the same sample rate as in one process, so the epsilon is the same; rank 0
prints and writes the report, with every rank's gradient norms.
"""

import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from persample.app.digits import DigitsCNN, digits_split
from persample.app.report import RunReport
from persample.checks import NonFiniteGradientWarning, check_nonfinite
from persample.dp import (
    DistributedDPOptimizer,
    DistributedPoissonSampler,
    DPOptimizer,
    PoissonSampler,
    noise_multiplier_for,
)
from persample.engine import GhostClipping
from persample.loss import cross_entropy
from persample.per_sample import clip_per_sample, per_sample_grads, per_sample_norms


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train_digits`; the defaults reach about 90% test accuracy at epsilon 3."""

    epochs: int = 20
    batch_size: int = 256
    sample_rate: float | None = None
    max_physical_batch_size: int = 128
    noise_multiplier: float | None = None
    target_epsilon: float | None = 3.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"
    lr: float = 0.2
    momentum: float = 0.9
    dp: bool = True
    engine: str = "vmap"
    secure_mode: bool = False
    nonfinite: str = "zero"
    out: str = "runs/digits"
    seed: int = 0
    device: str = "auto"
    progress: bool | None = None


def train_digits(config: TrainConfig) -> dict:
    """Trains, prints one line per epoch and the final result, writes the report (see
    :mod:`persample.app.report`) and returns the result ``{"test_accuracy", "epsilon", ...}``.

    Raises:
        ValueError: settings out of range, a device this machine does not have, an ``out`` that cannot be a
            folder (all checked before anything is written), or with ``nonfinite="raise"`` an example whose
            gradient is not finite.
        KeyboardInterrupt: re-raised after the report is marked "interrupted"; finished epochs are kept.
    """
    _check(config)
    begun = time.perf_counter()
    device = _device(config.device)
    _check_out(config.out)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        if not config.dp:
            raise ValueError("the non-private baseline (--no-dp) runs in one process: launch it without torchrun")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    leader = not distributed or dist.get_rank() == 0
    torch.manual_seed(config.seed)
    x_train, y_train, x_test, y_test = (t.to(device) for t in digits_split())
    n = len(y_train)
    sample_rate = config.sample_rate if config.sample_rate is not None else config.batch_size / n
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate} (batch_size {config.batch_size} of "
                         f"{n} training examples)")
    batch_size = max(1, round(sample_rate * n))
    # Poisson sampling takes 1/sample_rate batches per epoch in expectation; the baseline covers the data once.
    steps_per_epoch = round(1 / sample_rate) if config.dp else math.ceil(n / batch_size)
    model = DigitsCNN().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    # In secure mode the batches, like the noise, come from the OS CSPRNG: a seed would make them predictable.
    secure = config.dp and config.secure_mode
    sampling = None if secure else torch.Generator().manual_seed(config.seed)

    noise_multiplier = None
    dp_optimizer = engine = None
    if config.dp:
        noise_multiplier = config.noise_multiplier
        if noise_multiplier is None:
            noise_multiplier = noise_multiplier_for(config.target_epsilon, config.delta, sample_rate,
                                                    steps=config.epochs * steps_per_epoch,
                                                    accountant=config.accountant)
        if noise_multiplier == 0:
            warnings.warn("noise_multiplier is 0: no noise is added, so the run is not differentially private "
                          "(epsilon is infinite); clipping alone gives no privacy guarantee", UserWarning,
                          stacklevel=2)
        noise = None if config.secure_mode else torch.Generator(device).manual_seed(config.seed + 1)
        engine = GhostClipping(model, max_grad_norm=config.max_grad_norm, nonfinite=config.nonfinite) \
            if config.engine == "fast" else None
        # DDP broadcasts rank 0's parameters; the engines would run its .module anyway, and the optimizer reduces.
        kind = DistributedDPOptimizer if distributed else DPOptimizer
        named = DistributedDataParallel(model).module.named_parameters() if distributed else model.named_parameters()
        dp_optimizer = kind(optimizer, named, noise_multiplier=noise_multiplier,
                            max_grad_norm=config.max_grad_norm, expected_batch_size=sample_rate * n,
                            sample_rate=sample_rate, accountant=config.accountant, generator=noise,
                            secure_mode=config.secure_mode)

    settings = {**asdict(config), "device": str(device), "sample_rate": sample_rate,
                "noise_multiplier": noise_multiplier, "train_examples": n, "test_examples": len(y_test)}
    if distributed:
        settings["world_size"] = dist.get_world_size()
    report = RunReport(config.out, settings, config.max_grad_norm if config.dp else None) if leader else None
    privacy = (f"noise_multiplier={noise_multiplier:.3f}, max_grad_norm={config.max_grad_norm}, "
               f"sample_rate={sample_rate:.4f}, delta={config.delta}" if config.dp else "no DP (--no-dp)")
    say = _say if leader else _quiet
    say(f"digits: {n} train / {len(y_test)} test examples on {device}; {config.epochs} epochs x "
         f"{steps_per_epoch} steps; {privacy}" + (f"; {dist.get_world_size()} processes" if distributed else ""))

    bar = tqdm(total=config.epochs * steps_per_epoch, unit="step", file=sys.stderr,
               disable=not leader or (None if config.progress is None else not config.progress))
    epoch = 0
    skipped = 0
    set_up = time.perf_counter() - begun
    epoch_seconds: list[float] = []
    try:
        for epoch in range(1, config.epochs + 1):
            started = time.perf_counter()
            model.train()
            if distributed:
                batches = DistributedPoissonSampler(n, sample_rate, steps=steps_per_epoch, generator=sampling,
                                                    secure_mode=secure)
            elif config.dp:
                batches = PoissonSampler(n, sample_rate, steps=steps_per_epoch, generator=sampling, secure_mode=secure)
            else:
                batches = torch.randperm(n, generator=sampling).split(batch_size)
            norms, sizes = [], []
            for idx in batches:
                idx = idx.to(device)
                sizes.append(len(idx))
                if config.dp:
                    norms.append(_dp_step(model, dp_optimizer, x_train[idx], y_train[idx],
                                          config.max_physical_batch_size, engine, config.nonfinite))
                else:
                    norms.append(_baseline_step(model, optimizer, x_train[idx], y_train[idx]))
                bar.update()
            norms = torch.cat(norms)
            if distributed:  # the report shows every rank's examples
                parts: list = [None] * dist.get_world_size()
                dist.all_gather_object(parts, (norms.cpu(), sizes))
                norms = torch.cat([part for part, _ in parts])
                sizes = [sum(counts) for counts in zip(*(counts for _, counts in parts), strict=True)]
            finite = norms.isfinite()
            nonfinite = int((~finite).sum())
            skipped += nonfinite
            norms = norms[finite]
            accuracy = _accuracy(model, x_test, y_test)
            epsilon = dp_optimizer.epsilon(config.delta) if config.dp else math.inf
            row = {"epoch": epoch, "steps": epoch * steps_per_epoch,
                   "train_loss": round(_loss(model, x_train, y_train), 5),
                   "test_accuracy": round(accuracy, 5), "epsilon": round(epsilon, 4),
                   "mean_batch_size": round(sum(sizes) / len(sizes), 2),
                   "median_grad_norm": round(float(norms.median()), 5) if len(norms) else math.nan,
                   "fraction_clipped": round(float((norms > config.max_grad_norm).double().mean()), 4)
                   if config.dp and len(norms) else math.nan,
                   "nonfinite_examples": nonfinite,
                   "seconds": round(time.perf_counter() - started, 3)}
            epoch_seconds.append(row["seconds"])
            if leader:
                report.add_epoch(row, norms)
                dropped = f"  non-finite examples skipped {nonfinite}" if nonfinite else ""
                # The first epoch's time includes the one-off work (kernel compilation, CUDA start-up).
                bar.write(f"epoch {epoch:3d}/{config.epochs}  train loss {row['train_loss']:.4f}  "
                          f"test accuracy {accuracy:.4f}  epsilon {epsilon:.3f}  {row['seconds']:.1f} s{dropped}",
                          file=sys.stdout)
            sys.stdout.flush()
    except KeyboardInterrupt:
        bar.close()
        # Every step taken spent privacy, the steps of the unfinished epoch too.
        spent = dp_optimizer.epsilon(config.delta) if config.dp else math.inf
        if leader:
            report.finish("interrupted", {"epochs_finished": epoch - 1, "epsilon": spent,
                                          "steps": dp_optimizer.accountant.steps if config.dp else None})
        say(f"interrupted during epoch {epoch}; the finished epochs are in {config.out}")
        if config.dp:
            say(f"epsilon spent (delta={config.delta:g}): {spent:.3f} over {dp_optimizer.accountant.steps} steps")
        raise
    bar.close()

    accuracy = _accuracy(model, x_test, y_test)
    epsilon = dp_optimizer.epsilon(config.delta) if config.dp else math.inf
    # The first epoch apart: it holds the one-off work (Triton's kernel compilation, CUDA's start-up).
    others, rest = len(epoch_seconds) - 1, sum(epoch_seconds[1:])
    result = {"test_accuracy": accuracy, "epsilon": epsilon, "delta": config.delta if config.dp else None,
              "accountant": config.accountant if config.dp else None, "noise_multiplier": noise_multiplier,
              "epochs_finished": config.epochs, "nonfinite_examples": skipped,
              "seconds": {"set_up": round(set_up, 3), "first_epoch": epoch_seconds[0],
                          "other_epochs": round(rest, 3)}}
    if leader:
        report.finish("finished", result)
    correct = round(accuracy * len(y_test))
    say(f"test accuracy: {accuracy:.4f} ({correct}/{len(y_test)})")
    if skipped:
        say(f"non-finite examples skipped: {skipped} (each contributed zero to its step)")
    if config.dp:
        say(f"epsilon (delta={config.delta:g}): {epsilon:.3f} [{config.accountant} accountant]")
    else:
        say("epsilon: inf (no DP: --no-dp)")
    say(f"time: {set_up:.1f} s set-up (data, model, device), {epoch_seconds[0]:.1f} s first epoch (one-off "
        f"compilation included)" + (f", {rest:.1f} s the other {others} epoch{'s' if others > 1 else ''} "
                                    f"({rest / others:.2f} s each)" if others else ""))
    say(f"report: {config.out}/report.json, gradient-norm histogram: {config.out}/grad_norms.png")
    return result


def _dp_step(model: nn.Module, dp_optimizer: DPOptimizer, x: Tensor, y: Tensor, max_physical_batch_size: int,
             engine: GhostClipping | None, nonfinite: str = "zero") -> Tensor:
    """One DP-SGD step on a Poisson batch, in physical batches; returns the per-example norms ``(B,)`` (NaN or
    inf for the examples that contributed zero). With ``engine`` the clipped sums come from the fast engine,
    otherwise from the vmap pipeline."""
    norms = []
    # The epoch's line counts the examples the policy dropped; a warning per step would bury it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteGradientWarning)
        for part_x, part_y in zip(x.split(max_physical_batch_size), y.split(max_physical_batch_size), strict=True):
            if engine is not None:
                out = engine.clipped_grad_sum(part_x, part_y)
                norms.append(out.norms)
                dp_optimizer.accumulate(out.grads, len(part_y))
                continue
            grads = per_sample_grads(model, part_x, part_y)
            norms.append(per_sample_norms(grads))
            summed = clip_per_sample(grads, dp_optimizer.max_grad_norm, norms=norms[-1], nonfinite=nonfinite)
            dp_optimizer.accumulate(summed, len(part_y))
    dp_optimizer.step()
    return torch.cat(norms)


def _baseline_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Tensor:
    """One non-private step with the mean of the per-sample gradients (the batch gradient); returns their
    norms ``(B,)``."""
    grads = per_sample_grads(model, x, y)
    for name, p in model.named_parameters():
        p.grad = grads[name].mean(dim=0)
    optimizer.step()
    return per_sample_norms(grads)


def _check(config: TrainConfig) -> None:
    """The settings' ranges, checked before the data is loaded (the library checks them again where used)."""
    positive_ints = ("epochs", "batch_size", "max_physical_batch_size")
    for name in positive_ints:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not config.lr > 0:
        raise ValueError(f"lr must be > 0, got {config.lr!r}")
    if config.engine not in ("vmap", "fast"):
        raise ValueError(f"engine must be 'vmap' or 'fast', got {config.engine!r}")
    check_nonfinite(config.nonfinite)
    if not config.max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0, got {config.max_grad_norm!r}")
    if not 0 < config.delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {config.delta!r}")
    if config.noise_multiplier is not None and not config.noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {config.noise_multiplier!r}")
    if config.dp and config.noise_multiplier is None and config.target_epsilon is None:
        raise ValueError("give a noise_multiplier or a target_epsilon (or dp=False)")
    if config.target_epsilon is not None and not config.target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {config.target_epsilon!r}")


# The device types the job can train on; others (meta, ...) hold no data.
_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def _device(name: str) -> torch.device:
    """``"auto"`` (a GPU if there is one) or a device of this machine, else ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in _DEVICE_TYPES:
        raise ValueError(f"device must be 'auto' or one of {', '.join(_DEVICE_TYPES)} (with an index, e.g. cuda:1), "
                         f"got {name!r}")
    backend = getattr(torch, device.type)
    if device.type != "cpu" and not backend.is_available():
        raise ValueError(f"device {name!r}: this machine has no {device.type} device (torch.{device.type}."
                         "is_available() is False); use --device cpu or auto")
    if device.index is not None and device.type != "cpu" and device.index >= backend.device_count():
        raise ValueError(f"device {name!r}: this machine has {backend.device_count()} {device.type} device(s)")
    return device


def _check_out(out: str) -> None:
    """Raises ValueError unless ``out`` is a folder, or can be made one, that this process can write into."""
    path = Path(out).absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"out {out!r} is an existing file, not a folder")
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    if not existing.is_dir():
        raise ValueError(f"out {out!r} cannot be made: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"out {out!r} cannot be written: no write permission in {str(existing)!r}")


def _say(line: str) -> None:
    print(line, flush=True)


def _quiet(line: str) -> None:
    """What ranks other than 0 print: nothing (rank 0 speaks for the run)."""


@torch.no_grad()
def _loss(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    loss = float(cross_entropy(model(x), y))
    model.train()
    return loss


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    accuracy = float((model(x).argmax(dim=1) == y).double().mean())
    model.train()
    return accuracy
