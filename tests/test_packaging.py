"""pyproject.toml's floors are the versions CI's second job installs (.ci/floor.txt), so every floor is tested."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as CI runs

ROOT = Path(__file__).resolve().parents[1]


def _floors() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    floors = {}
    for requirement in requirements:
        if match := re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", requirement.strip()):
            floors[match[1].lower()] = match[2]
    return floors


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "floor.txt").read_text().splitlines():
        if match := re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9.]*)", line.strip()):
            pins[match[1].lower()] = match[2]
    return pins


def _release(version: str) -> tuple[int, ...]:
    parts = tuple(int(p) for p in version.split("."))
    return parts + (0,) * (3 - len(parts))


def test_the_floors_of_the_packages_persample_is_built_on_are_pinned_in_ci():
    floors, pins = _floors(), _pins()
    for name in ("torch", "transformers", "opacus"):
        assert name in floors and name in pins, f"{name}: floor {floors.get(name)}, CI pin {pins.get(name)}"
        assert _release(floors[name]) == _release(pins[name]), (
            f"pyproject.toml admits {name}>={floors[name]} but CI tests {name}=={pins[name]}")
