"""The benchmark lives beside the package, not in it: users who install sluicegate do not get it."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_package_has_no_benchmark() -> None:
    assert importlib.util.find_spec("sluicegate.bench") is None
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert not any("bench" in p for p in packages["packages"])
