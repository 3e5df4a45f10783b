"""One way for the tests to start a script on several CPU processes: ``torchrun --standalone`` (gloo in the
scripts), Triton's interpreter off, one thread per process, and a timeout, so that a hang fails the test instead
of stalling CI. The processes import the installed ``persample``; the repository root is not put on their path."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script: Path, *args: str, nproc: int, timeout: float) -> subprocess.CompletedProcess:
    """Runs ``script args`` on ``nproc`` processes from the repository root; fails the test, with the tail of
    both outputs, unless every process exits with 0."""
    environment = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(script), *args]
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return done
