"""The checks of DP-SGD's hyperparameters, shared by clipping, the optimizer, the sampler and the accountant:
each raises a ``ValueError`` naming the argument, its value and what was expected."""

import math

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
