"""Chaos fixtures: the size of a run (fast by default, full with SLUICEGATE_CHAOS=full), brokers, and the results table.

SLUICEGATE_CHAOS=full runs every scenario at full size (>= 3,000 tasks at a few hundred a second);
SLUICEGATE_CHAOS=off skips the suite; anything else runs the fast subset. With
SLUICEGATE_CHAOS_RESULTS=path, every summary is also written there as JSON (scripts/chaos.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import broker as private
from .harness import Scenario, Size
from .ledger import Summary

MODE = os.environ.get("SLUICEGATE_CHAOS", "fast").lower()
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"

SUMMARIES: list[Summary] = []


def sizes(fast: Size, full: Size) -> Any:
    """Parametrize a scenario by size: only the one the mode selects is collected."""
    chosen = {"full": [full], "all": [fast, full]}.get(MODE, [fast])
    return pytest.mark.parametrize("size", [pytest.param(s, id=s.name) for s in chosen])


def full_only(full: Size) -> Any:
    """Parametrize a scenario that only the full suite runs (too long for CI): skipped in fast mode."""
    if MODE in ("full", "all"):
        return pytest.mark.parametrize("size", [pytest.param(full, id=full.name)])
    return pytest.mark.parametrize(
        "size", [pytest.param(full, id=full.name, marks=pytest.mark.skip(reason="full suite only (make chaos)"))]
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: fault-injection scenario (tests/chaos; SLUICEGATE_CHAOS=full|fast|off)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/chaos" in str(item.fspath):
            item.add_marker(pytest.mark.chaos)
            if MODE == "off":
                item.add_marker(pytest.mark.skip(reason="SLUICEGATE_CHAOS=off"))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not SUMMARIES:
        return
    terminalreporter.section("chaos: Jepsen-style figures")
    for summary in SUMMARIES:
        terminalreporter.write_line(summary.line())


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("SLUICEGATE_CHAOS_RESULTS")
    if path and SUMMARIES:
        Path(path).write_text(
            json.dumps([{"scenario": s.scenario, "size": s.size, **s.figures} for s in SUMMARIES], indent=2)
        )


@pytest.fixture(scope="session")
def shared_url() -> str:
    return os.environ.get("RABBITMQ_URL", DEFAULT_URL)


@pytest.fixture(scope="session")
def rabbitmq_server_available() -> None:
    if not private.available():
        pytest.skip("rabbitmq-server is not installed here: the private-broker scenario needs it")


@pytest.fixture
async def private_broker(rabbitmq_server_available: None) -> AsyncIterator[private.PrivateBroker]:
    node = private.PrivateBroker()
    try:
        await node.start()
        yield node
    finally:
        await node.close()


@pytest.fixture
async def private_cluster(rabbitmq_server_available: None) -> AsyncIterator[private.PrivateCluster]:
    cluster = private.PrivateCluster(3)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.close()


ScenarioFactory = Callable[..., Scenario]


@pytest.fixture
def scenario(request: pytest.FixtureRequest, shared_url: str) -> Iterator[ScenarioFactory]:
    """Build a Scenario named after the test; it records its summary in the session's table."""
    name = request.node.originalname.removeprefix("test_")

    def build(size: Size, url: str | None = None, label: str = "") -> Scenario:
        return Scenario(label or name, size, url or shared_url, SUMMARIES)

    return build
