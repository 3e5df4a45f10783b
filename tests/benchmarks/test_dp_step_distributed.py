"""benchmarks/dp_step_distributed.py keeps working: its ``--quick`` run on 2 gloo ranks (CPU) prints the table."""

import re

from tests.torchrun import ROOT, torchrun

SCRIPT = ROOT / "benchmarks" / "dp_step_distributed.py"


def test_quick_run_on_two_ranks_prints_the_table():
    done = torchrun(SCRIPT, "--quick", "--no-save", "--models", "1", nproc=2, timeout=180)
    out = done.stdout
    assert "## dp_step_distributed" in out and "2 ranks (gloo)" in out
    assert "saved:" not in done.stderr
    for variant in ("normal step (DDP)", "fast engine (GhostClipping)", "vmap pipeline", "Opacus (DPDDP, make_private)"):
        row = re.search(rf"^\| {re.escape(variant)} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.MULTILINE)
        assert row, f"no timed row for {variant!r} in:\n{out}"
        assert all(float(v) > 0 for v in row.groups())
    assert re.search(r"^\| normal step \(DDP\) \| [\d.]+ \| 1\.00 \|", out, re.MULTILINE)
    assert re.search(r"Exposed communication of the fast engine's step: -?[\d.]+ ms", out)
