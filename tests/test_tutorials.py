"""Every tutorial executes from its jupytext source in a fresh kernel, and its committed notebook matches it.

The kernel inherits this process's environment: ``CI=1`` selects each tutorial's reduced setting, and
``TRITON_INTERPRET`` is whatever the suite runs under (each tutorial decides what it needs on the CPU).
"""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("tutorials_build", Path(__file__).parents[1] / "tutorials" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

SOURCES = build.sources()
IDS = [s.stem for s in SOURCES]


def test_tutorials_exist():
    assert SOURCES, f"no tutorials/NN_name.py found in {build.TUTORIALS}"


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_notebook_matches_source(source):
    problem = build.out_of_sync(source)
    assert problem is None, f"{problem}; regenerate with `python tutorials/build.py {source.stem[:2]}`"


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_tutorial_executes(source, monkeypatch):
    monkeypatch.setenv("CI", "1")
    nb = build.execute(build.notebook_from_source(source), timeout=120)
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert not errors, errors
