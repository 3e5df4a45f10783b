"""The checks shared by clipping, the engine, the optimizer, the sampler and the accountant: each raises a
``ValueError`` naming the argument, its value and what was expected.

* DP-SGD's hyperparameters (``check_*``).
* The policy for examples whose gradient or loss is not finite (:func:`check_nonfinite`,
  :func:`handle_nonfinite`): clipping bounds an example's contribution only if its norm is a number, so such an
  example contributes zero (a clip factor of 0, which keeps the sensitivity bound) and is reported, or the step
  raises.
* Models whose output for an example depends on the rest of the batch (:func:`refuse_batch_norm`).
"""

import math
import warnings
from collections.abc import Iterable, Sequence

from torch import nn

NONFINITE = ("zero", "raise")
# Positions named in a message; a batch of poisoned examples would otherwise print thousands.
_SHOWN_POSITIONS = 10


class NonFiniteGradientWarning(UserWarning):
    """Examples of a batch had a non-finite gradient or loss and contributed zero to the clipped sum.

    Examples:
        >>> import warnings
        >>> import torch
        >>> import persample
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     summed = persample.clip_per_sample({"w": torch.tensor([[1.0], [float("nan")]])}, 1.0)
        >>> [type(w.message).__name__ for w in caught], summed.nonfinite
        (['NonFiniteGradientWarning'], 1)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("error", persample.NonFiniteGradientWarning)  # to stop the run instead
        ...     persample.clip_per_sample({"w": torch.tensor([[1.0], [float("nan")]])}, 1.0)
        Traceback (most recent call last):
        ...
        persample.checks.NonFiniteGradientWarning: 1 of 2 examples have a non-finite (NaN or inf) gradient ...
    """


def check_nonfinite(nonfinite: str) -> None:
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")


def handle_nonfinite(positions: Sequence[int], batch_size: int, nonfinite: str, stacklevel: int = 2) -> None:
    """Applies the policy to the batch ``positions`` whose gradient (or loss) is not finite: nothing when there
    are none; ``nonfinite="raise"``: ``ValueError``; ``"zero"``: a :class:`NonFiniteGradientWarning` (the caller
    has given those examples a clip factor of 0 and zeroed their gradients)."""
    if not positions:
        return
    shown = ", ".join(map(str, positions[:_SHOWN_POSITIONS])) + (", ..." if len(positions) > _SHOWN_POSITIONS else "")
    what = (f"{len(positions)} of {batch_size} examples have a non-finite (NaN or inf) gradient or loss, at batch "
            f"positions [{shown}]")
    if nonfinite == "raise":
        raise ValueError(f"{what}; nonfinite='raise' stops here (nonfinite='zero' lets them contribute zero)")
    warnings.warn(f"{what}; they contribute zero to the clipped sum (clip factor 0)", NonFiniteGradientWarning,
                  stacklevel=stacklevel + 1)


def refuse_batch_norm(modules: Iterable[tuple[str, nn.Module]], *, running_stats_ok: bool = False) -> None:
    """Raises ``ValueError`` for the first BatchNorm among ``modules`` (``model.named_modules()``): its output
    for an example depends on the whole batch. With ``running_stats_ok``, a BatchNorm in eval mode that has
    running statistics (which then treats each example alone) passes."""
    for name, module in modules:
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if running_stats_ok and not module.training and module.running_mean is not None:
            continue
        channels = module.num_features
        raise ValueError(
            f"module {name or type(module).__name__!r} is {type(module).__name__}: per-sample gradients "
            "through batch statistics are not per-sample (each example's output depends on the whole "
            f"batch). Replace it with GroupNorm, e.g. nn.GroupNorm({math.gcd(channels, 32)}, {channels}), "
            "or LayerNorm.")

MECHANISMS = ("rdp", "prv")


def check_mechanism(mechanism: str) -> None:
    if mechanism not in MECHANISMS:
        raise ValueError(f"accountant must be one of {MECHANISMS}, got {mechanism!r}")


def check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def check_sample_rate(sample_rate: float) -> None:
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")


def check_noise_multiplier(noise_multiplier: float) -> None:
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")


def check_max_grad_norm(max_grad_norm: float) -> None:
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be a number > 0, got {max_grad_norm!r}")
    if not math.isfinite(max_grad_norm):
        raise ValueError(f"max_grad_norm must be finite, got {max_grad_norm!r}")
