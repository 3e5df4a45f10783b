"""Every benchmark script starts: its imports resolve and its options parse (``--help``), so that a moved module
does not leave a script broken until someone runs it on a GPU. (The scripts' ``--quick`` runs are too slow for
CI's budget; the lead runs them before each measurement.)"""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name not in {"results.py", "steps.py"})


def test_the_scripts_are_found():
    assert {"dp_step.py", "make_private.py", "cross_entropy.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_starts(script):
    done = subprocess.run([sys.executable, script, "--help"], cwd=BENCHMARKS, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_a_partial_run_saves_under_its_own_section(tmp_path, monkeypatch):
    """``--section`` keeps a partial run (some models only) from replacing the benchmark's full table."""
    import argparse

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import results

    parser = argparse.ArgumentParser()
    results.add_save_flag(parser)
    out, history = tmp_path / "RESULTS.md", tmp_path / "HISTORY.md"
    results.publish("bench", "## bench — full\n\nall models", parser.parse_args([]), out, history)
    results.publish("bench", "## bench — partial\n\nsome models", parser.parse_args(["--section", "bench_conv"]), out,
                    history)
    text = out.read_text()
    assert "## bench — full\n\nall models" in text and "## bench_conv — partial\n\nsome models" in text
    assert text.count("<!-- latest: bench -->") == 1 and text.count("<!-- latest: bench_conv -->") == 1
