"""The package's layout keeps the promises of the README's layout table.

* Every module is reachable as itself: ``import persample.<path> as m`` gives a module, never a function or
  class re-exported over it (a public function must not share its name with a module beside it).
* No module imports a private (underscore) name from another module; a package's private modules are imported
  only by that package. Shared checks and switches live in modules that own them under public names.
* ``kernels/`` imports torch and triton only, never ``persample``.
"""

import ast
import importlib
import pkgutil
import types
from pathlib import Path

import pytest

import persample
import persample.kernels

ROOT = Path(__file__).resolve().parents[1]


def _modules(package) -> list[str]:
    return [info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]


# The kernels live in the top-level folder kernels/, mapped into the package (an editable install's
# persample.__path__ does not hold them), so they are walked on their own.
MODULES = _modules(persample) + ["persample.kernels"] + _modules(persample.kernels)


def test_the_walk_finds_the_packages():
    assert {"persample.loss", "persample.per_sample", "persample.engine", "persample.dp", "persample.integrations",
            "persample.app", "persample.kernels.cross_entropy"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports_as_a_module(name):
    module = importlib.import_module(name)
    assert isinstance(module, types.ModuleType)
    parent, _, child = name.rpartition(".")
    attribute = getattr(importlib.import_module(parent), child)
    assert isinstance(attribute, types.ModuleType), f"{parent}.{child} is {attribute!r}, which hides the module {name}"


def _source_files():
    for folder in ("persample", "kernels", "benchmarks"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["persample", *parts]
    return ".".join(parts[:-1])


def _private_imports(path: Path) -> list[str]:
    """``from A import _b`` where ``_b`` is not a private module of the importer's own package, and imports
    from a private module ``A._m`` of another package."""
    package = _package_of(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            source = node.module
            private_part = next((p for p in source.split(".") if p.startswith("_")), None)
            if source.startswith("persample") and private_part and source.rpartition(".")[0] != package:
                found.append(f"line {node.lineno}: from {source} import ...")
            for alias in node.names:
                if alias.name.startswith("_") and source != package:
                    found.append(f"line {node.lineno}: from {source} import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"line {node.lineno}: from {'.' * node.level}{node.module or ''} import {alias.name}")
    return found


@pytest.mark.parametrize("path", list(_source_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_is_imported_from_another_module(path):
    assert not _private_imports(path)


def _module_aliases(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("persample"):
            names |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            names |= {alias.asname or alias.name for alias in node.names}
    return names


@pytest.mark.parametrize("path", list(_source_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_attribute_of_an_imported_module_is_used(path):
    tree = ast.parse(path.read_text(), str(path))
    aliases = _module_aliases(tree)
    found = [f"line {node.lineno}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
             and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert not found


def test_private_import_check_can_fail(tmp_path):
    bad = ROOT / "persample" / "engine" / "_probe_for_the_layout_test.py"
    bad.write_text("from persample.loss._cross_entropy_ops import use_triton\nfrom persample.loss.checks import _x\n")
    try:
        assert len(_private_imports(bad)) == 2
    finally:
        bad.unlink()


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_import_torch_and_triton_only(path):
    allowed = {"torch", "triton", "contextlib", "dataclasses", "functools", "math", "os", "sys", "typing", "importlib",
               "pathlib", "collections", "itertools", "threading", "weakref"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots = {node.module.split(".")[0]}
        else:
            continue
        assert roots <= allowed, f"{path.name} line {node.lineno} imports {roots - allowed}"


def test_import_persample_leaves_the_heavy_packages_to_their_first_use():
    """``import persample`` loads neither SciPy's statistics (the audit's bounds), Opacus (the accountant), nor
    torch's DTensor and FSDP packages (sharded parameters): together most of what it took beyond torch itself."""
    import subprocess
    import sys

    heavy = ["scipy.stats", "opacus", "torch.distributed.tensor", "torch.distributed.fsdp"]
    code = f"import sys, persample; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
