"""``persample audit`` on a reduced setting: it prints the claim and the bounds, writes the plot and the JSON,
and refuses bad settings with exit status 2."""

import json

import pytest

from persample.app.cli import main

REDUCED = ["audit", "--canaries", "256", "--black-box-canaries", "32", "--batch-size", "256", "--epochs", "1",
           "--target-epsilon", "4", "--plot-epsilons", "--no-progress"]


@pytest.fixture(autouse=True)
def _pytorch_cross_entropy(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.filterwarnings("ignore:with .* canaries at confidence")
def test_audit_prints_bounds_and_writes_the_plot(tmp_path, capsys):
    assert main([*REDUCED, "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    claim = next(line for line in lines if "claimed epsilon" in line)
    assert 3.9 < float(claim.split("claimed epsilon")[1].split()[0]) <= 4.0
    assert sum("white-box >=" in line and "at confidence 0.95" in line for line in lines) == 3
    assert any(line.startswith("  ok: every audited lower bound is below the claim") for line in lines)
    (run,) = json.loads((tmp_path / "audit.json").read_text())["runs"]
    assert run["white_box_gaussian"] < run["claimed_epsilon"]
    assert (tmp_path / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("flag", "value", "message"), [("--confidence", "1.5", "confidence must be in"),
                                                         ("--delta", "0", "delta must be in"),
                                                         ("--canaries", "8", "num_canaries must be an int >= 16")])
def test_bad_settings_exit_2(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_:
        main([*REDUCED, "--out", str(tmp_path), flag, value])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
