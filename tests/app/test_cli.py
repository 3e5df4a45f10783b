"""The main job, ``persample train``, end to end on a reduced setting, plus its errors and interruption."""

import csv
import importlib.metadata
import json

import pytest

import persample.app.train
from persample.app.cli import main

# Two epochs of DP-SGD at epsilon 3: 79% test accuracy measured (seed 0, CPU); 65% leaves room for
# floating-point differences between machines.
REDUCED = ["train", "--epochs", "2", "--batch-size", "64", "--lr", "0.1", "--no-progress"]
MIN_ACCURACY = 0.65


@pytest.fixture(autouse=True)
def _pytorch_cross_entropy(monkeypatch):
    # Not a test of the Triton kernel: the PyTorch path of cross_entropy, even where CI interprets Triton.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_console_script_is_declared():
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="persample")
    assert entry.value == "persample.app.cli:main"


def test_dp_training_end_to_end(tmp_path, capsys):
    assert main([*REDUCED, "--out", str(tmp_path), "--target-epsilon", "3", "--delta", "1e-5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    accuracy = float(next(line for line in lines if line.startswith("test accuracy:")).split()[2])
    epsilon = float(next(line for line in lines if line.startswith("epsilon (delta=1e-05):")).split()[2])
    assert accuracy >= MIN_ACCURACY
    assert 2.9 < epsilon <= 3.0
    assert sum(line.startswith("epoch") for line in lines) == 2

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "finished"
    assert report["result"]["test_accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert len(report["epochs"]) == 2
    with open(tmp_path / "grad_norms.csv") as f:
        norms = list(csv.DictReader(f))
    assert len(norms) > 1000 and all(float(row["norm"]) >= 0 for row in norms)
    assert (tmp_path / "grad_norms.png").stat().st_size > 1000


def test_non_private_baseline(tmp_path, capsys):
    # One epoch without DP: 86% measured.
    assert main([*REDUCED, "--out", str(tmp_path), "--no-dp", "--lr", "0.2", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "epsilon: inf (no DP" in out
    accuracy = float(next(line for line in out.splitlines() if line.startswith("test accuracy:")).split()[2])
    assert accuracy >= 0.8
    assert json.loads((tmp_path / "report.json").read_text())["result"]["epsilon"] == "inf"


@pytest.mark.parametrize("option, value, match", [
    ("--max-grad-norm", "0", "max_grad_norm"),
    ("--noise-multiplier", "-1", "noise_multiplier"),
    ("--delta", "1.5", "delta"),
    ("--delta", "0", "delta"),
    ("--target-epsilon", "-2", "target_epsilon"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, option, value, match):
    with pytest.raises(SystemExit) as exited:
        main([*REDUCED, "--out", str(tmp_path), option, value])
    assert exited.value.code == 2
    assert match in capsys.readouterr().err


def test_interrupted_run_keeps_finished_epochs(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    original = persample.app.train.per_sample_grads

    def interrupt_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # 5 steps per epoch at batch size 256
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(persample.app.train, "per_sample_grads", interrupt_in_second_epoch)
    assert main([*REDUCED, "--out", str(tmp_path), "--batch-size", "256", "--max-physical-batch-size", "512"]) == 130
    out = capsys.readouterr().out
    assert "epoch   1/2" in out and "interrupted during epoch 2" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "interrupted" and len(report["epochs"]) == 1
    # The interrupted epoch's 1 finished step spent privacy too: 6 steps in all.
    assert report["result"]["steps"] == 6
    assert report["result"]["epsilon"] > report["epochs"][0]["epsilon"]
    assert "over 6 steps" in out
    with open(tmp_path / "epochs.csv") as f:
        assert len(list(csv.DictReader(f))) == 1
    assert (tmp_path / "grad_norms.png").exists()


def test_fast_engine_training(tmp_path, capsys):
    # The same reduced run with the ghost-clipping engine instead of vmap: 2 epochs at epsilon 3.
    assert main([*REDUCED, "--out", str(tmp_path), "--engine", "fast"]) == 0
    lines = capsys.readouterr().out.splitlines()
    accuracy = float(next(line for line in lines if line.startswith("test accuracy:")).split()[2])
    assert accuracy >= MIN_ACCURACY
    assert json.loads((tmp_path / "report.json").read_text())["config"]["engine"] == "fast"
