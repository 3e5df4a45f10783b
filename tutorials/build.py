"""Regenerates the tutorial notebooks from their jupytext sources and executes them.

Each tutorial is written once, as a jupytext percent-format script ``tutorials/NN_name.py`` (the file to
edit and review); ``tutorials/NN_name.ipynb`` is generated from it, executed, and committed with its
outputs so that it reads on GitHub with its tables and plots.

    python tutorials/build.py                 # rebuild and execute every tutorial
    python tutorials/build.py 04              # only those whose file name starts with "04"
    python tutorials/build.py --check         # exit 1 if a committed .ipynb differs from its .py

The kernel is this interpreter (``sys.executable -m ipykernel_launcher``), whatever kernels Jupyter has
registered elsewhere, so a notebook always runs against the persample this interpreter imports. Set
``CI=1`` to execute with the tutorials' reduced settings (the test suite does); committed notebooks are
built without it.
"""

import argparse
import sys
from pathlib import Path

import jupytext
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parent


def sources() -> list[Path]:
    """Every tutorial source, ``tutorials/NN_name.py``, in order."""
    return sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))


def notebook_from_source(source: Path) -> nbformat.NotebookNode:
    """The unexecuted notebook of a jupytext source, with cell ids numbered in order so that rebuilding an
    unchanged source gives an unchanged file (nbformat would draw random ids)."""
    nb = jupytext.read(source)
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:03d}"
    return nb


def cells(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """(cell type, source) of every cell: what must agree between a source and its committed notebook."""
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def out_of_sync(source: Path) -> str | None:
    """Why ``source``'s committed notebook does not match it, or None if it does."""
    ipynb = source.with_suffix(".ipynb")
    if not ipynb.exists():
        return f"{ipynb.name} is missing"
    expected, committed = cells(notebook_from_source(source)), cells(nbformat.read(ipynb, as_version=4))
    if len(expected) != len(committed):
        return f"{ipynb.name} has {len(committed)} cells, {source.name} has {len(expected)}"
    for i, (want, got) in enumerate(zip(expected, committed, strict=True)):
        if want != got:
            return f"cell {i} of {ipynb.name} differs from {source.name}: {got[1][:60]!r} vs {want[1][:60]!r}"
    return None


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> nbformat.NotebookNode:
    """Runs every cell of ``nb`` in a fresh kernel of this interpreter, in ``tutorials/`` (environment
    inherited: ``CI``, ``TRITON_INTERPRET``); raises ``nbclient.exceptions.CellExecutionError`` on the
    first failing cell."""
    # Only the native spec (this interpreter), never a "python3" kernel registered by another install.
    kernel_specs = KernelSpecManager(kernel_dirs=[])
    km = KernelManager(kernel_name="python3", kernel_spec_manager=kernel_specs)
    client = NotebookClient(nb, km=km, timeout=timeout, record_timing=False,
                            resources={"metadata": {"path": str(TUTORIALS)}})
    return client.execute()


def build(source: Path) -> Path:
    """Regenerates and executes ``source``'s notebook; returns its path."""
    ipynb = source.with_suffix(".ipynb")
    nbformat.write(execute(notebook_from_source(source)), ipynb)
    return ipynb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefixes", nargs="*", help="build only tutorials whose file name starts with one of these")
    parser.add_argument("--check", action="store_true", help="only check that every .ipynb matches its .py")
    args = parser.parse_args(argv)
    selected = [s for s in sources() if not args.prefixes or s.name.startswith(tuple(args.prefixes))]
    if not selected:
        parser.error(f"no tutorial matches {args.prefixes}; have {[s.name for s in sources()]}")
    if args.check:
        problems = [p for s in selected if (p := out_of_sync(s))]
        print("\n".join(problems) or f"{len(selected)} notebooks in sync")
        return 1 if problems else 0
    for source in selected:
        print(f"built {build(source).relative_to(TUTORIALS.parent)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
