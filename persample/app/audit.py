"""``persample audit``: the white-box audit (:func:`persample.audit.audit_dp_sgd`) of DP-SGD on digits.

For each target epsilon (the one asked for, and those of the plot), the noise multiplier that spends it over
the run is found by the accountant, the run is audited with white-box and black-box canaries, and the bounds
are printed. ``audit.png`` plots the claimed epsilon against the audited lower bounds over those noise
multipliers; ``audit.json`` keeps every number.
"""

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from persample.app.digits import DigitsCNN, digits_split
from persample.audit import AuditResult, audit_dp_sgd
from persample.dp import noise_multiplier_for

_BOUNDS = {"clopper_pearson": "Clopper-Pearson (no assumption)", "gaussian": "Gaussian trade-off",
           "one_run": "one run (Steinke et al.)"}


@dataclass(frozen=True)
class AuditConfig:
    """Settings of :func:`run_audit`."""

    target_epsilon: float = 2.0
    plot_epsilons: tuple[float, ...] = field(default=(1.0, 2.0, 4.0, 8.0))
    canaries: int = 20_000
    black_box_canaries: int = 256
    batch_size: int = 2048
    epochs: int = 10
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    confidence: float = 0.95
    accountant: str = "rdp"
    engine: str = "fast"
    lr: float = 0.2
    out: str = "runs/audit"
    seed: int = 0
    progress: bool | None = None


def run_audit(config: AuditConfig) -> list[dict]:
    """Audits one run per target epsilon (the target's first, then those of the plot), prints each, writes
    ``audit.json`` and ``audit.png`` to ``config.out``, and returns the rows (one dict per run).

    Raises:
        ValueError: settings out of range (before any training).
    """
    for name in ("canaries", "batch_size", "epochs"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            raise ValueError(f"{name} must be an int >= 1, got {getattr(config, name)!r}")
    epsilons = [config.target_epsilon, *(e for e in config.plot_epsilons if e != config.target_epsilon)]
    for epsilon in epsilons:
        if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"target epsilons must be finite numbers > 0, got {epsilon!r}")
    x, y, _, _ = digits_split()
    # The training set is the data, the inserted black-box copies and the inserted canaries (half of each).
    expected_n = len(y) + (config.canaries + config.black_box_canaries) / 2
    sample_rate = min(1.0, config.batch_size / expected_n)
    steps = max(1, round(config.epochs / sample_rate))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _say(f"audit of DP-SGD on digits: {config.canaries} white-box and {config.black_box_canaries} black-box "
         f"canaries, sample_rate {sample_rate:.4f}, {steps} steps, delta {config.delta:g}, confidence "
         f"{config.confidence:g}, {config.engine} engine, {config.accountant} accountant")
    rows = []
    for epsilon in epsilons:
        sigma = noise_multiplier_for(epsilon, config.delta, sample_rate, steps=steps, accountant=config.accountant)
        torch.manual_seed(config.seed)
        model = DigitsCNN()
        result = audit_dp_sgd(
            model, x, y, num_canaries=config.canaries, noise_multiplier=sigma, max_grad_norm=config.max_grad_norm,
            sample_rate=sample_rate, steps=steps, delta=config.delta, confidence=config.confidence,
            accountant=config.accountant, engine=config.engine, black_box_canaries=config.black_box_canaries,
            optimizer=lambda params: torch.optim.SGD(params, lr=config.lr, momentum=0.9), seed=config.seed,
            progress=config.progress)
        rows.append(_row(result))
        _print(result)
    (out / "audit.json").write_text(json.dumps({"settings": asdict(config), "runs": rows}, indent=2))
    plot(rows, out / "audit.png", config.confidence)
    _say(f"wrote {out / 'audit.json'} and {out / 'audit.png'}")
    return rows


def _row(result: AuditResult) -> dict:
    row = {"noise_multiplier": result.noise_multiplier, "claimed_epsilon": result.claimed_epsilon,
           "sample_rate": result.sample_rate, "steps": result.steps, "delta": result.delta,
           "confidence": result.confidence}
    for kind, found in (("white_box", result.white_box), ("black_box", result.black_box or {})):
        for name, bound in found.items():
            row[f"{kind}_{name}"] = bound.epsilon
            row[f"{kind}_{name}_detail"] = bound.detail
    return row


def _print(result: AuditResult) -> None:
    _say(f"noise multiplier {result.noise_multiplier:.3f}: claimed epsilon {result.claimed_epsilon:.3f} "
         f"({result.accountant}, delta {result.delta:g})")
    for name, label in _BOUNDS.items():
        white = result.white_box[name].epsilon
        black = result.black_box[name].epsilon if result.black_box else math.nan
        _say(f"  {label:32s} white-box >= {white:6.3f} ({white / result.claimed_epsilon:4.0%} of the claim)   "
             f"black-box >= {black:6.3f}   at confidence {result.confidence:g}")
    exceeded = result.exceeded()
    _say("  FAILED: the audit exceeds the claim (" + ", ".join(exceeded) + ")" if exceeded
         else "  ok: every audited lower bound is below the claim")


def plot(rows: list[dict], path: Path, confidence: float) -> None:
    """Claimed and audited epsilon against the noise multiplier, one line per bound, to ``path`` (PNG)."""
    # A Figure without pyplot: no backend is chosen or changed (the caller may be a notebook).
    from matplotlib.figure import Figure

    rows = sorted(rows, key=lambda row: row["noise_multiplier"])
    sigmas = [row["noise_multiplier"] for row in rows]
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.subplots()
    ax.plot(sigmas, [row["claimed_epsilon"] for row in rows], "k-o", label="claimed (accountant)")
    for (name, label), style in zip(_BOUNDS.items(), ("-s", "-^", "-v"), strict=True):
        ax.plot(sigmas, [row[f"white_box_{name}"] for row in rows], style, label=f"white-box, {label}")
    if "black_box_gaussian" in rows[0]:
        ax.plot(sigmas, [row["black_box_gaussian"] for row in rows], ":x", color="gray",
                label="black-box (loss), Gaussian trade-off")
    ax.set_xlabel("noise multiplier σ")
    ax.set_ylabel(f"ε at δ = {rows[0]['delta']:g}")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Claimed ε and audited lower bounds (confidence {confidence:g})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _say(line: str) -> None:
    print(line, flush=True)
    sys.stdout.flush()
