"""Fixtures of the deployment tests: shared helpers, kustomize rendering, the compose file.

These tests read the deployment files (Dockerfile, .dockerignore, docker-compose.yml, deploy/)
and run offline: no Docker engine and no cluster is needed. Only test_image_entrypoints.py reaches
a package index, to install the wheel's dependencies into a fresh virtual environment as the image
build does.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: builds the wheel and installs it with its dependencies (about a minute, needs a package index)",
    )


def _load_helper(name: str) -> ModuleType:
    # Loaded by file path so that it works under every pytest import mode, with no package here.
    module_name = f"sluicegate_deploy_tests_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, HERE / f"{name}.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@pytest.fixture(scope="session")
def lib() -> ModuleType:
    return _load_helper("deploy_lib")


@pytest.fixture(scope="session")
def kustomize_lite() -> ModuleType:
    return _load_helper("kustomize_lite")


@pytest.fixture(scope="session")
def render_kustomization(lib: ModuleType, kustomize_lite: ModuleType) -> Callable[[Path], list[dict[str, Any]]]:
    """Render with real kustomize when installed, else with the fallback renderer.

    test_k8s_manifests.py checks that both give the same objects wherever both exist.
    """
    cache: dict[Path, list[dict[str, Any]]] = {}

    def render(directory: Path) -> list[dict[str, Any]]:
        if directory not in cache:
            if lib.real_kustomize_command() is not None:
                cache[directory] = lib.render_with_real_kustomize(directory)
            else:
                cache[directory] = kustomize_lite.render(directory)
        return cache[directory]

    return render


@pytest.fixture(scope="session")
def compose(lib: ModuleType) -> dict[str, Any]:
    with lib.COMPOSE_FILE.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)
