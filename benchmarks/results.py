"""What every benchmark script shares: the header of its report (date, machine, commit, command), the
``--no-save`` flag, and where the report goes.

A saved run's report replaces its benchmark's section in ``RESULTS.md`` (the latest table of each benchmark,
between ``<!-- latest: NAME -->`` and ``<!-- end: NAME -->``) and is appended to ``HISTORY.md`` (every run, in
order). ``--quick`` runs check a script and are never saved.
"""

import argparse
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

FOLDER = Path(__file__).resolve().parent
RESULTS = FOLDER / "RESULTS.md"
HISTORY = FOLDER / "HISTORY.md"


def add_save_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-save", action="store_true",
                        help="print the report only; write neither RESULTS.md nor HISTORY.md")
    parser.add_argument("--section", metavar="NAME",
                        help="save under this section of RESULTS.md instead of the benchmark's own (a partial run, "
                             "e.g. some models only, that should not replace the full table)")


def size(nbytes: int, digits: int = 2) -> str:
    """``nbytes`` in GiB with ``digits`` decimals from 1 GiB up, else in MiB (a CPU step's own storage, a small
    model's peak)."""
    return f"{nbytes / 2**30:.{digits}f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def commit() -> str:
    """The short hash of HEAD, ``+`` if tracked files differ from it; ``PERSAMPLE_COMMIT`` when set (a copy of the
    tree whose .git is absent or stale, as on a lent GPU machine)."""
    if os.environ.get("PERSAMPLE_COMMIT"):
        return os.environ["PERSAMPLE_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=FOLDER, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("PERSAMPLE_COMMIT", "unknown")


def machine(device: torch.device | str | None = None) -> str:
    """The GPU's name for a CUDA device, else the CPU's architecture and core count."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()}, {os.cpu_count()} cores"


def command() -> str:
    """The command line that ran this script, from the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(FOLDER.parent) if script.is_relative_to(FOLDER.parent) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def header(name: str, device: torch.device | str | None = None, *details: str) -> str:
    """``## NAME — date — machine — commit HASH``, then the command, torch's version and ``details``."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    context = "; ".join([f"`{command()}`", f"torch {torch.__version__}", *details])
    return f"## {name} — {date} — {machine(device)} — commit {commit()}\n\n{context}."


def publish(name: str, report: str, args: argparse.Namespace, results: Path = RESULTS,
            history: Path = HISTORY) -> None:
    """Prints ``report`` and, unless ``--no-save`` or ``--quick``, makes it ``name``'s section of RESULTS.md
    (replacing the one there, or added at the end) and appends it to HISTORY.md."""
    report = report.strip() + "\n"
    section_name = getattr(args, "section", None)
    if section_name:
        report = report.replace(f"## {name} ", f"## {section_name} ", 1)
        name = section_name
    print(report)
    if args.no_save or getattr(args, "quick", False):
        return
    start, end = f"<!-- latest: {name} -->\n", f"<!-- end: {name} -->\n"
    text = results.read_text() if results.exists() else ""
    section = f"{start}{report}{end}"
    if start in text and end in text.split(start, 1)[1]:
        before, rest = text.split(start, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results.write_text(text)
    with history.open("a") as f:
        f.write("\n" + report)
    print(f"saved: the {name} section of {results.name}, appended to {history.name}", file=sys.stderr)
