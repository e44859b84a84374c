"""The roles the image test runs as containers, and what each is told about the others.

Add a role here and `make image-test` runs it; a role the image does not have yet (its
`sluicegate ROLE --help` fails) is skipped, with a note in the test output.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True, slots=True)
class Site:
    """Where the roles of one run find each other."""

    broker_url: str
    prefix: str
    dispatchers: list[str]  # the addresses workers connect to, one per dispatcher
    listen: list[str]  # what each dispatcher binds
    metrics_ports: dict[str, int] = field(default_factory=dict)  # container suffix -> port (host network)
    store_url: str = ""


Env = Callable[[Site, int], dict[str, str]]


def _broker(site: Site, index: int) -> dict[str, str]:
    return {"RABBITMQ_URL": site.broker_url, "SLUICEGATE_PREFIX": site.prefix}


def _dispatcher(site: Site, index: int) -> dict[str, str]:
    return {
        **_broker(site, index),
        "SLUICEGATE_DISPATCHER_ID": f"{site.prefix}-d{index}",
        "SLUICEGATE_DISPATCHER_LISTEN": site.listen[index],
        "SLUICEGATE_DISPATCHER_DRAIN_GRACE": "2s",
        # The test's own network, plaintext: said explicitly, as a dispatcher beyond loopback requires.
        "SLUICEGATE_DISPATCHER_INSECURE": "true",
    }


def _worker(site: Site, index: int) -> dict[str, str]:
    # Workers speak gRPC to the dispatchers only; each lists them in another order.
    order = site.dispatchers[index % len(site.dispatchers) :] + site.dispatchers[: index % len(site.dispatchers)]
    return {"SLUICEGATE_WORKER_DISPATCHERS": ",".join(order), "SLUICEGATE_WORKER_SLOTS": "8"}


def _recorder(site: Site, index: int) -> dict[str, str]:
    return {**_broker(site, index), "SLUICEGATE_STORE_URL": site.store_url}


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    replicas: int
    env: Env
    needs_store: bool = False  # a PostgreSQL container is started for it
    setup: tuple[str, ...] = ()  # a one-off command run (with the role's env) before it starts

    def suffix(self, index: int) -> str:
        return f"{self.name}-{index}"


ROLES = (
    Role("scheduler", 2, _broker),  # an active one and a standby
    Role("dispatcher", 2, _dispatcher),
    Role("worker", 2, _worker),
    Role("recorder", 1, _recorder, needs_store=True, setup=("migrate",)),
)
CORE = {"scheduler", "dispatcher", "worker"}


def scrape(host: str, port: int) -> dict[str, float]:
    """`name{label="value"}` -> value for every sample of a /metrics page (http.client: no proxy applies)."""
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200, f"GET http://{host}:{port}/metrics answered {response.status}"
        text = response.read().decode()
    finally:
        conn.close()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples
