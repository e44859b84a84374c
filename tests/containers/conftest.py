"""Fixtures of the container tests: an engine, the base images, the project's image, a network and a broker.

These tests run real containers (`make image-test`, `make compose-test`), so a plain `pytest`
skips them; SLUICEGATE_CONTAINER_TESTS=1 turns them on. The engine and the base images come from
scripts/containers.py (Debian's docker.io and images built from Debian's packages, so no registry
is needed); everything else a run creates is removed when it ends.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from .docker import Docker, wait_for

ROOT = Path(__file__).resolve().parents[2]
ENABLED = os.environ.get("SLUICEGATE_CONTAINER_TESTS", "") == "1"
STANDIN = "python:3.11-slim"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="real containers: run `make image-test` or set SLUICEGATE_CONTAINER_TESTS=1")
    for item in items:
        if "tests/containers" in str(item.fspath):
            item.add_marker(skip)


def _containers_script() -> ModuleType:
    name = "sluicegate_containers_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "containers.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def base_images() -> ModuleType:
    """The engine answers and the base images are there (built now if they are not)."""
    script = _containers_script()
    try:
        script.ensure_images()
    except script.Failure as err:
        pytest.fail(f"no Docker engine or base images: {err}")
    return script


@pytest.fixture(scope="session")
def docker(base_images: ModuleType) -> Iterator[Docker]:
    cli = Docker()
    try:
        yield cli
    finally:
        cli.close()
        left = cli.leftovers()
        assert not any(left.values()), f"the run left {left}"


@dataclass(frozen=True, slots=True)
class Image:
    tag: str
    build_seconds: float


@pytest.fixture(scope="session")
def project_image(docker: Docker, base_images: ModuleType) -> Image:
    """The project's image, built from its own Dockerfile as it is, on the stand-in base where needed.

    A machine with a registry has the real python:3.11-slim (or pulls it); elsewhere the stand-in
    built from Debian is tagged under that name for the build, and untagged afterwards.
    """
    if not docker.image_exists(STANDIN):
        docker.tag(base_images.PYTHON.tag, STANDIN)
    tag = f"sluicegate-test:{docker.run_id}"
    seconds = docker.build(tag, str(ROOT))
    print(f"\nbuilt {tag} from the Dockerfile in {seconds:.0f} s")
    return Image(tag, seconds)


@dataclass(frozen=True, slots=True)
class Broker:
    name: str  # the container, also its host name on the network
    network: str
    ip: str  # where the host (and containers on the host network) reach it

    @property
    def url(self) -> str:
        """For containers on the same network."""
        return f"amqp://guest:guest@{self.name}:5672/"

    @property
    def host_url(self) -> str:
        return f"amqp://guest:guest@{self.ip}:5672/"


def start_broker(docker: Docker, image: str, network: str, suffix: str = "rabbitmq") -> Broker:
    name = docker.start(suffix, image, network=network, options=["--hostname", suffix])
    wait_for(
        lambda: (
            docker("exec", name, "rabbitmq-diagnostics", "-q", "check_port_connectivity", check=False).returncode == 0
        ),
        timeout=90,
        what=f"RabbitMQ in {name} accepting connections",
        interval=1.0,
    )
    return Broker(name, network, docker.ip(name, network))


@pytest.fixture(scope="session")
def network(docker: Docker) -> str:
    return docker.network("net")


@pytest.fixture(scope="session")
def broker(docker: Docker, base_images: ModuleType, network: str) -> Broker:
    started = time.monotonic()
    broker = start_broker(docker, base_images.RABBITMQ.tag, network)
    print(f"\nRabbitMQ container {broker.name} up in {time.monotonic() - started:.0f} s")
    return broker
