"""persample.app.train with poisoned examples: one per Poisson batch, whose pixels are NaN or inf. The run finishes
with finite parameters and the accuracy of the clean run, and reports the count; nonfinite="raise" stops it at
the first one. The poisoning is a hook in the test: the library trains on what it is given."""

import json
import math

import pytest
import torch

import persample.app.train
from persample.app.cli import main
from persample.app.train import TrainConfig, train_digits

# One epoch of 21 Poisson batches (expected size 64) at epsilon 3: 67% test accuracy measured (seed 0, CPU),
# clean or poisoned; the clean run must reach 50% (chance is 10%) for the comparison to mean something.
SETTINGS = {"epochs": 1, "batch_size": 64, "lr": 0.1, "progress": False}


@pytest.fixture(autouse=True)
def _pytorch_cross_entropy(monkeypatch):
    # Not a test of the Triton kernel: the PyTorch path of cross_entropy, even where CI interprets Triton.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _poison(monkeypatch, value: float) -> list[int]:
    """Sets the pixels of the first example of every non-empty batch to ``value``; returns the list that counts
    the poisoned batches."""
    original = persample.app.train._dp_step
    poisoned = []

    def poisoned_step(model, dp_optimizer, x, y, *args):
        if len(x):
            x = x.clone()
            x[0] = value
            poisoned.append(len(poisoned))
        return original(model, dp_optimizer, x, y, *args)

    monkeypatch.setattr(persample.app.train, "_dp_step", poisoned_step)
    return poisoned


def _run(tmp_path, monkeypatch, name: str, **options) -> tuple[dict, list]:
    """``(result, the trained model's parameters)`` of a run with ``SETTINGS`` and ``options``."""
    models = []
    monkeypatch.setattr(persample.app.train, "DigitsCNN", lambda original=persample.app.train.DigitsCNN:
                        models.append(original()) or models[-1])
    result = train_digits(TrainConfig(**SETTINGS, out=str(tmp_path / name), **options))
    return result, list(models[0].parameters())


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        result, _ = _run(tmp_path_factory.mktemp("clean"), monkeypatch, "clean")
    assert result["test_accuracy"] >= 0.5 and result["nonfinite_examples"] == 0
    return result


@pytest.mark.parametrize("engine, poison", [("vmap", math.nan), ("vmap", math.inf), ("fast", math.nan),
                                            ("fast", -math.inf)])
def test_a_poisoned_example_per_batch_is_skipped_and_reported(tmp_path, monkeypatch, capsys, clean, engine, poison):
    poisoned = _poison(monkeypatch, poison)
    result, params = _run(tmp_path, monkeypatch, "poisoned", engine=engine)
    assert len(poisoned) > 15  # 21 batches, empty ones with probability 4e-21
    assert result["nonfinite_examples"] == len(poisoned)
    assert all(torch.isfinite(p).all() for p in params)
    assert abs(result["test_accuracy"] - clean["test_accuracy"]) <= 0.01
    report = json.loads((tmp_path / "poisoned" / "report.json").read_text())
    assert report["result"]["nonfinite_examples"] == report["epochs"][0]["nonfinite_examples"] == len(poisoned)
    out = capsys.readouterr().out
    assert f"non-finite examples skipped {len(poisoned)}" in out
    assert f"non-finite examples skipped: {len(poisoned)}" in out


@pytest.mark.parametrize("engine", ["vmap", "fast"])
def test_nonfinite_raise_stops_at_the_first_poisoned_example(tmp_path, monkeypatch, engine):
    poisoned = _poison(monkeypatch, math.nan)
    with pytest.raises(ValueError, match=r"1 of \d+ examples .* positions \[0\]"):
        train_digits(TrainConfig(**SETTINGS, out=str(tmp_path), engine=engine, nonfinite="raise"))
    assert poisoned == [0]


def test_nonfinite_raise_from_the_command_line(tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, math.inf)
    with pytest.raises(SystemExit) as exited:
        main(["train", "--epochs", "1", "--no-progress", "--nonfinite", "raise", "--out", str(tmp_path)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("persample train: error: 1 of ") and "non-finite" in err
