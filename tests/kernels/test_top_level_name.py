"""The repository's ``kernels/`` folder never stands in for the ``kernels`` distribution.

Whenever the repository root is on ``sys.path`` (Python started at the root, ``python -m pytest``, a notebook
kernel there) the folder is importable as the top-level ``kernels``; transformers imports that name from the
distribution it depends on. Each check runs a fresh interpreter with the root as its working directory, as a
user who clones the project would.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run_at_root(code: str, *flags: str) -> str:
    done = subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_distribution_is_installed_for_these_tests():
    # The test extra installs it, so the checks below exercise the clash rather than skip it.
    assert importlib.metadata.version("kernels")


def test_transformers_builds_a_model_at_the_repository_root():
    out = _run_at_root(
        "import transformers, persample\n"
        "config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "                                  num_attention_heads=2, num_key_value_heads=2)\n"
        "model = transformers.LlamaForCausalLM(config)\n"
        "print(type(model).__name__, persample.cross_entropy.__module__)\n"
    )
    assert out.split()[0] == "LlamaForCausalLM"


def test_import_kernels_at_the_root_is_the_distribution():
    out = _run_at_root("import kernels, persample.kernels.cross_entropy as ops\nprint(kernels.__file__)\nprint(ops.__file__)")
    distribution, ours = (Path(line) for line in out.splitlines())
    assert not distribution.is_relative_to(ROOT / "kernels"), distribution
    assert ours == ROOT / "kernels" / "cross_entropy.py"


def test_this_process_sees_the_distribution():
    # pytest put the root on sys.path for the tests package; the name still means the distribution here.
    import kernels

    assert not Path(kernels.__file__).resolve().is_relative_to(ROOT / "kernels")
    assert hasattr(kernels, "__version__")


def test_without_the_distribution_the_folder_is_an_empty_package():
    # Only the root and the standard library on the path: nothing to hand over to, so the folder stays an empty
    # package with no version (which transformers takes for absent) and imports none of its kernels.
    out = _run_at_root(
        "import sys\n"
        "sys.path[:] = ['', *(p for p in sys.path if 'packages' not in p)]\n"
        "import kernels\n"
        "print(kernels.__file__, hasattr(kernels, '__version__'), 'kernels.launch' in sys.modules)",
        "-S",
    )
    file, has_version, loaded = out.split()
    assert Path(file) == ROOT / "kernels" / "__init__.py"
    assert (has_version, loaded) == ("False", "False")


@pytest.mark.parametrize("folder", ["tutorials", "benchmarks"])
def test_scripts_and_notebooks_in_subfolders_see_the_distribution(folder):
    done = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], cwd=ROOT / folder,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not Path(done.stdout.strip()).is_relative_to(ROOT / "kernels")
