"""The main job's run report, written as training goes so that an interrupted run keeps every finished epoch.

Files in the output folder:

* ``epochs.csv`` — one row per finished epoch (appended and flushed at once).
* ``grad_norms.csv`` — every per-example gradient norm seen while training: ``epoch,norm``.
* ``grad_norms.png`` — histogram of those norms (first and last epoch) against ``max_grad_norm``, drawn
  when the run finishes or is interrupted.
* ``report.json`` — the configuration, the epoch rows and the final result (replaced atomically).
"""

import csv
import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, and none is opened on a headless machine
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402

_EPOCH_FIELDS = ("epoch", "steps", "train_loss", "test_accuracy", "epsilon", "mean_batch_size",
                 "median_grad_norm", "fraction_clipped", "nonfinite_examples", "seconds")


class RunReport:
    """Writes the report files into ``out`` (created if needed; earlier files of the same names are replaced).

    Args:
        out: output folder.
        config: the run's settings, stored in ``report.json``.
        max_grad_norm: drawn on the histogram (None for a run without clipping).

    Raises:
        ValueError: ``out`` cannot be made a folder (an existing file, no permission).
    """

    def __init__(self, out: str | os.PathLike, config: dict, max_grad_norm: float | None):
        self.out = Path(out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"out {str(out)!r} cannot be made a folder: {error.strerror or error}") from None
        self.max_grad_norm = max_grad_norm
        self.report = {"config": config, "status": "running", "epochs": [], "result": None}
        self._norms: dict[int, list[float]] = {}
        with open(self.out / "epochs.csv", "w", newline="") as f:
            csv.writer(f).writerow(_EPOCH_FIELDS)
        with open(self.out / "grad_norms.csv", "w", newline="") as f:
            csv.writer(f).writerow(("epoch", "norm"))
        self._write_json()

    def add_epoch(self, row: dict, grad_norms: Tensor) -> None:
        """Appends one epoch's row (keys as in ``epochs.csv``) and its per-example norms ``(n,)``."""
        norms = grad_norms.detach().double().cpu().tolist()
        self._norms[row["epoch"]] = norms
        with open(self.out / "epochs.csv", "a", newline="") as f:
            csv.writer(f).writerow([row[field] for field in _EPOCH_FIELDS])
        with open(self.out / "grad_norms.csv", "a", newline="") as f:
            csv.writer(f).writerows((row["epoch"], f"{norm:.6g}") for norm in norms)
        self.report["epochs"].append(row)
        self._write_json()

    def finish(self, status: str, result: dict | None) -> None:
        """Records the final ``status`` ("finished" or "interrupted") and result, and draws the histogram
        (once, at the end: drawing costs more than a training epoch of the main job)."""
        self.report["status"] = status
        self.report["result"] = result
        self._write_json()
        if self._norms:
            self._draw_histogram()

    def _write_json(self) -> None:
        partial = self.out / "report.json.tmp"
        partial.write_text(json.dumps(_strict_json(self.report), indent=2, allow_nan=False) + "\n")
        partial.replace(self.out / "report.json")

    def _draw_histogram(self) -> None:
        epochs = sorted(self._norms)
        shown = [epochs[0]] if len(epochs) == 1 else [epochs[0], epochs[-1]]
        everything = [norm for epoch in shown for norm in self._norms[epoch]]
        if not everything:
            return
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        top = max(max(everything), self.max_grad_norm or 0.0) * 1.05 or 1.0
        for epoch in shown:
            ax.hist(self._norms[epoch], bins=50, range=(0.0, top), alpha=0.6, label=f"epoch {epoch}")
        if self.max_grad_norm is not None:
            clipped = sum(norm > self.max_grad_norm for norm in self._norms[epochs[-1]])
            share = clipped / max(len(self._norms[epochs[-1]]), 1)
            ax.axvline(self.max_grad_norm, color="black", linestyle="--",
                       label=f"max_grad_norm = {self.max_grad_norm:g} ({share:.0%} clipped, epoch {epochs[-1]})")
        ax.set_xlabel("per-example gradient norm (before clipping)")
        ax.set_ylabel("examples")
        ax.set_title("Per-example gradient norms")
        # Below the axes: inside, it would hide bars wherever the tallest happen to be.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
        fig.tight_layout()
        fig.savefig(self.out / "grad_norms.png", dpi=100, bbox_inches="tight")
        plt.close(fig)


def _strict_json(value):
    """JSON has no inf/NaN: the report writes them as the strings "inf", "nan"."""
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
