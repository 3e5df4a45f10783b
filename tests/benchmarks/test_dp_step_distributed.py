"""benchmarks/dp_step_distributed.py keeps working: its ``--quick`` run on 2 gloo ranks (CPU) prints the table."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "dp_step_distributed.py"


def test_quick_run_on_two_ranks_prints_the_table():
    environment = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
               "--quick", "--no-save", "--models", "1"]
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    out = done.stdout
    assert "## dp_step_distributed" in out and "2 ranks (gloo)" in out
    assert "saved:" not in done.stderr
    for variant in ("normal step (DDP)", "fast engine (GhostClipping)", "vmap pipeline", "Opacus (DPDDP, make_private)"):
        row = re.search(rf"^\| {re.escape(variant)} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.MULTILINE)
        assert row, f"no timed row for {variant!r} in:\n{out}"
        assert all(float(v) > 0 for v in row.groups())
    assert re.search(r"^\| normal step \(DDP\) \| [\d.]+ \| 1\.00 \|", out, re.MULTILINE)
    assert re.search(r"Exposed communication of the fast engine's step: -?[\d.]+ ms", out)
