"""The main job, ``persample train``, end to end on a reduced setting, plus its errors and interruption."""

import csv
import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

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


def test_runs_from_a_source_tree_that_is_not_installed(monkeypatch, capsys):
    # As on a machine given the repository on PYTHONPATH: no distribution metadata to read the version from.
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert "not installed" in capsys.readouterr().out


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


def _assert_refused(capsys, argv, match):
    """One line naming the problem on stderr, exit status 2, as argparse's own errors."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("persample train: error: ") and match in err, err


@pytest.mark.parametrize("device, match", [
    ("tpu", "device must be 'auto' or one of cpu, cuda"),
    ("meta", "device must be 'auto' or one of cpu, cuda"),
    pytest.param("cuda", "this machine has no cuda device", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA")),
    pytest.param("cuda:64", "this machine has", marks=pytest.mark.skipif(
        torch.cuda.device_count() >= 64, reason="a machine with 64 GPUs")),
])
def test_a_device_this_machine_lacks_is_a_one_line_error(tmp_path, capsys, device, match):
    out = tmp_path / "run"
    _assert_refused(capsys, [*REDUCED, "--out", str(out), "--device", device], match)
    assert not out.exists()


def test_out_that_cannot_be_a_folder_is_a_one_line_error_and_nothing_is_written(tmp_path, capsys):
    existing = tmp_path / "report.txt"
    existing.write_text("keep me")
    _assert_refused(capsys, [*REDUCED, "--out", str(existing)], "is an existing file, not a folder")
    _assert_refused(capsys, [*REDUCED, "--out", str(existing / "run")], "is a file, not a folder")
    assert existing.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [existing]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_out_in_a_folder_without_write_permission_is_a_one_line_error(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _assert_refused(capsys, [*REDUCED, "--out", str(locked / "run")], "no write permission")
        assert not any(locked.iterdir())
    finally:
        locked.chmod(0o700)


def test_out_the_filesystem_refuses_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    # As root, permissions do not stop a mkdir; a filesystem can (read-only, /proc): the report's own mkdir fails.
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(pathlib.Path, "mkdir", refuse)
    _assert_refused(capsys, [*REDUCED, "--out", str(tmp_path / "run")], "cannot be made a folder: Read-only")


def _cheap_steps(monkeypatch) -> list:
    """Replaces each DP step's gradient work by the optimizer's step alone (noise, accounting): for tests of
    what surrounds the training. Returns the list the Poisson batches' indices are recorded in."""
    batches = []

    class Recorded(persample.dp.PoissonSampler):
        def __iter__(self):
            for batch in super().__iter__():
                batches.append(batch.tolist())
                yield batch

    def step(model, dp_optimizer, x, y, *args):
        dp_optimizer.step()
        return torch.zeros(len(y))

    monkeypatch.setattr(persample.app.train, "PoissonSampler", Recorded)
    monkeypatch.setattr(persample.app.train, "_dp_step", step)
    return batches


def test_noise_multiplier_zero_warns_that_the_run_is_not_private(tmp_path, capsys, monkeypatch):
    _cheap_steps(monkeypatch)
    assert main([*REDUCED, "--epochs", "1", "--out", str(tmp_path), "--noise-multiplier", "0"]) == 0
    captured = capsys.readouterr()
    assert ("persample train: warning: noise_multiplier is 0: no noise is added, so the run is not differentially "
            "private") in captured.err
    assert "epsilon inf" in captured.out
    with pytest.warns(UserWarning, match="not differentially private"):
        persample.app.train.train_digits(persample.app.train.TrainConfig(
            epochs=1, noise_multiplier=0.0, target_epsilon=None, progress=False, out=str(tmp_path)))


@pytest.mark.parametrize("secure", [False, True])
def test_secure_mode_samples_different_batches_under_the_same_seed(tmp_path, capsys, monkeypatch, secure):
    runs = []
    for _ in range(2):
        runs.append(_cheap_steps(monkeypatch))
        options = ["--secure-mode"] if secure else []
        assert main([*REDUCED, "--epochs", "1", "--seed", "3", "--out", str(tmp_path), *options]) == 0
    assert len(runs[0]) == len(runs[1]) == 21
    # 21 batches of 1347 examples at q = 0.048: equal by chance with probability far below 1e-100.
    assert (runs[0] != runs[1]) == secure


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"persample {importlib.metadata.version('persample')}\n"


def test_python_dash_m_persample_runs_the_command():
    for argv, expected in ((["--version"], "persample "), (["train", "--help"], "usage: persample train")):
        done = subprocess.run([sys.executable, "-m", "persample", *argv], capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0 and done.stdout.startswith(expected), done.stderr


def test_every_option_has_help_and_its_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out.split("options:")[1]
    # One block per option: its line and the indented lines that continue its help.
    blocks = re.split(r"\n  (?=-)", text)[1:]
    assert len(blocks) >= 20
    for block in blocks:
        option, _, help_text = block.partition("  ")
        if "\n" in option:  # a long option's help starts on the next line
            option, _, help_text = block.partition("\n")
        assert help_text.strip(), f"{option} has no help"
        assert " ".join(help_text.split()).count("(default:") <= 1, block
    for option in ("--epochs", "--delta", "--accountant", "--seed"):
        assert any(b.startswith(option) and "(default: " in b for b in blocks), option


def test_two_processes_report_the_epsilon_of_one(tmp_path, capsys):
    # `persample train --nproc 2` relaunches itself under torchrun (gloo, CPU); the accountant must record the
    # global sample rate once per step, so both runs spend the same epsilon (1 epoch, 21 steps at epsilon 3).
    options = ["train", "--epochs", "1", "--batch-size", "64", "--lr", "0.1", "--no-progress", "--target-epsilon", "3"]
    environment = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "persample", *options, "--nproc", "2", "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=240, env=environment, check=False)
    assert done.returncode == 0, done.stderr[-8000:]
    assert "; 2 processes" in done.stdout
    assert main([*options, "--out", str(tmp_path / "one")]) == 0
    one_out = capsys.readouterr().out

    def epsilon_line(out):
        return next(line for line in out.splitlines() if line.startswith("epsilon (delta=1e-05):"))

    assert epsilon_line(done.stdout) == epsilon_line(one_out)
    two, one = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("two", "one"))
    assert two["config"]["world_size"] == 2 and two["status"] == "finished"
    assert two["result"]["epsilon"] == pytest.approx(one["result"]["epsilon"], rel=1e-12)
    assert two["result"]["noise_multiplier"] == one["result"]["noise_multiplier"]
    assert [e["steps"] for e in two["epochs"]] == [e["steps"] for e in one["epochs"]] == [21]
