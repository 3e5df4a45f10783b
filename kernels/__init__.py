"""Triton kernels of persample, installed as ``persample.kernels`` (see README: never a top-level
``kernels`` module). Each op file holds one op: its math, its ``@triton.jit`` kernels and their launchers;
``launch.py`` launches compiled kernels with little host overhead and holds the launchers' shared
helpers (block and grid sizes, the accumulation dtype). This package imports torch and triton
only.

Whenever the repository root is on ``sys.path`` (Python started at the root, ``python -m pytest``, a
notebook kernel there), this folder is also importable as the top-level ``kernels``, a name that belongs to
the ``kernels`` distribution that transformers imports. Imported under that name, it hands the name over to
the installed distribution, so ``import kernels`` means the same thing at the root as anywhere else. With no
such distribution installed it stays an empty package with no version, which transformers takes for absent.
"""

if __name__ == "kernels":
    import sys
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec
    from pathlib import Path

    def _installed_spec(name: str, here: Path):
        """The spec another finder gives ``name``, searching ``sys.path`` without the folder holding ``here``."""
        root = here.parent
        path = [p for p in sys.path if not (isinstance(p, str) and Path(p or ".").resolve() == root)]
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = PathFinder.find_spec(name, path) if finder is PathFinder else find_spec(name, path)
            if spec is None:
                continue
            places = [spec.origin] if spec.has_location else []
            places += list(spec.submodule_search_locations or [])
            if not any(Path(p).resolve().is_relative_to(here) for p in places):
                return spec
        return None

    _spec = _installed_spec(__name__, Path(__file__).resolve().parent)
    if _spec is not None:
        # The import system returns whatever sys.modules holds under the name once this module has run.
        _module = module_from_spec(_spec)
        sys.modules[__name__] = _module
        _spec.loader.exec_module(_module)
