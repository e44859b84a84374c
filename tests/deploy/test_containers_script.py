"""scripts/containers.py without an engine: which Debian mirror it builds from, and when a base image is rebuilt."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "sluicegate_containers_script_offline", ROOT / "scripts/containers.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_mirror_from_deb822_sources(script: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "other.sources").write_text("Types: deb\nURIs: https://example.org/node\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
    )
    assert script.debian_mirror(tmp_path) == "http://mirror.example/debian"


def test_mirror_from_one_line_sources(script: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [signed-by=/usr/share/keyrings/x.gpg] http://ftp.example/debian bookworm main\n"
    )
    assert script.debian_mirror(tmp_path) == "http://ftp.example/debian"


def test_mirror_defaults_to_deb_debian_org(script: ModuleType, tmp_path: Path) -> None:
    assert script.debian_mirror(tmp_path) == "http://deb.debian.org/debian"


def test_a_recipe_change_or_a_new_base_means_a_rebuild(
    script: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "thing").mkdir()
    dockerfile = tmp_path / "thing" / "Dockerfile"
    dockerfile.write_text("FROM base\n")
    monkeypatch.setattr(script, "RECIPES", tmp_path)
    image = script.BaseImage("sluicegate-local/thing:1", "thing")
    first = script.recipe_hash(image, "base-1")
    assert script.recipe_hash(image, "base-1") == first
    assert script.recipe_hash(image, "base-2") != first
    dockerfile.write_text("FROM base\nRUN true\n")
    assert script.recipe_hash(image, "base-1") != first


def test_every_base_image_has_its_recipe(script: ModuleType) -> None:
    for image in script.BASE_IMAGES:
        assert (script.RECIPES / image.recipe / "Dockerfile").is_file(), image
