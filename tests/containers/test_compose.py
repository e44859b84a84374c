"""The compose stack, up: docker-compose.yml with the local-images override, brought up by docker-compose.

A task from the producer completes, its trace reaches the OTLP receiver (Jaeger's stand-in) with
spans from every role, and Prometheus has scraped every role's /metrics. Grafana and Jaeger's UI
are not part of this (neither is packaged by Debian); their configuration is checked offline in
tests/deploy.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .compose import ROOT, render
from .conftest import Image
from .docker import Docker, wait_for

pytestmark = pytest.mark.timeout(900)

ROLES = {
    "sluicegate-producer": "submit",
    "sluicegate-scheduler": "scheduler",
    "sluicegate-dispatcher": "dispatcher",
    "sluicegate-worker": "worker",
}
# Prometheus jobs (deploy/prometheus/prometheus.yml), how many targets each has, and a metric only that role serves.
JOBS = {
    "sluicegate-scheduler": (4, "sluicegate_tasks_received_total"),  # two partitions, active and standby each
    "sluicegate-dispatcher": (2, "sluicegate_connected_workers"),
    "sluicegate-worker": (3, "sluicegate_worker_tasks_total"),
    "rabbitmq": (3, "rabbitmq_queues"),
}
PRODUCED = re.compile(r"^(\d+) submitted: completed (\d+);", re.M)


class Stack:
    def __init__(self, docker: Docker, files: list[Path], project: str) -> None:
        self.docker, self.files, self.project = docker, files, project

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = ["docker-compose", "-p", self.project, "--project-directory", str(ROOT)]
        for path in self.files:
            command += ["-f", str(path)]
        result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker-compose {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}"
            )
        return result

    def containers(self) -> dict[str, str]:
        """container name -> service, for every container of the stack."""
        ids = self.compose("ps", "-q").stdout.split()
        found = {}
        for container_id in ids:
            info = self.docker.inspect(container_id)
            found[info["Name"].lstrip("/")] = info["Config"]["Labels"]["com.docker.compose.service"]
        return found

    def ip(self, service: str) -> str:
        name = next(n for n, s in self.containers().items() if s == service)
        networks = self.docker.inspect(name)["NetworkSettings"]["Networks"]
        return str(next(iter(networks.values()))["IPAddress"])


def _get_json(host: str, port: int, path: str) -> Any:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200, f"GET {host}:{port}{path}: {response.status}"
        return json.loads(response.read())
    finally:
        conn.close()


@pytest.fixture(scope="session")
def stack(docker: Docker, project_image: Image) -> Iterator[Stack]:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed (Debian: apt-get install docker-compose)")
    tmp = Path(tempfile.mkdtemp(prefix="sluicegate-compose-"))
    # The stack builds its own image (docker-compose build), tagged for this run only; the build
    # reuses the layers project_image just built, the Dockerfile and context being the same.
    image = f"sluicegate-compose:{docker.run_id}"
    files, services = render(tmp, image)
    stack = Stack(docker, files, docker.run_id.replace("-", ""))
    docker.tags.append(image)  # removed at the end of the session, like every tag this run added
    try:
        started = time.monotonic()
        stack.compose("build", timeout=900)
        stack.compose("up", "-d", *services, timeout=600)
        print(f"\ncompose: built and started {len(services)} services in {time.monotonic() - started:.0f} s")
        yield stack
    finally:
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_stack_comes_up_healthy(stack: Stack) -> None:
    containers = stack.containers()
    services = sorted(set(containers.values()))
    assert "grafana" not in services
    assert sum(s == "worker" for s in containers.values()) == 3, f"three worker replicas: {containers}"
    probed = [n for n in containers if stack.docker.inspect(n)["State"].get("Health")]
    healthy = stack.docker.wait_healthy(probed, timeout=240)
    print(f"\ncompose: healthy after (s) { {n: round(t) for n, t in healthy.items()} }")
    assert {containers[n] for n in probed} >= {
        "rabbitmq-1",
        "rabbitmq-2",
        "rabbitmq-3",
        "postgres",
        "recorder",
        "scheduler-1",
        "scheduler-2",
        "scheduler-3",
        "scheduler-4",
        "dispatcher-1",
        "dispatcher-2",
        "worker",
    }


def test_a_task_from_the_producer_completes_and_its_trace_has_every_role(stack: Stack) -> None:
    producer = next(n for n, s in stack.containers().items() if s == "producer")

    def produced() -> Any:
        return PRODUCED.search(stack.docker.logs(producer, tail=200))

    batch = wait_for(produced, 180, "the producer's first batch to complete", interval=1.0)
    assert batch.group(1) == batch.group(2), f"not every task of a batch completed: {batch.group(0)}"

    receiver = stack.ip("jaeger")

    def full_trace() -> Any:
        traces = _get_json(receiver, 16686, "/traces")
        return next((t for t in traces.values() if set(ROLES) <= set(t["services"])), None)

    found = wait_for(full_trace, 60, "a trace with spans from the producer, scheduler, dispatcher and worker", 1.0)
    names = set(found["spans"])
    for prefix in ("submit echo", "assign echo", "dispatch echo", "run echo", "complete echo", "result"):
        assert prefix in names, f"no {prefix!r} span in {sorted(names)}"
    print(f"\ncompose: one trace, services {found['services']}, {len(found['spans'])} spans")


def test_prometheus_scraped_every_role(stack: Stack) -> None:
    prometheus = stack.ip("prometheus")

    def all_up() -> Any:
        targets = _get_json(prometheus, 9090, "/api/v1/targets")["data"]["activeTargets"]
        up = {job: [t for t in targets if t["labels"]["job"] == job and t["health"] == "up"] for job in JOBS}
        return up if all(len(up[job]) == count for job, (count, _) in JOBS.items()) else None

    up = wait_for(all_up, 120, f"every target of {sorted(JOBS)} scraped and up", interval=2.0)
    for job, (count, metric) in JOBS.items():
        query = urllib.parse.quote(f'count(count by (instance) ({metric}{{job="{job}"}}))')
        result = _get_json(prometheus, 9090, f"/api/v1/query?query={query}")["data"]["result"]
        assert result, f"Prometheus has no {metric} from {job}"
        assert int(float(result[0]["value"][1])) == count, f"{metric} from {result} of {count} {job} targets"
    print(f"\ncompose: Prometheus scraped { {job: len(t) for job, t in up.items()} }")


def test_the_recorder_keeps_the_producers_tasks_in_postgres(stack: Stack) -> None:
    recorder = next(n for n, s in stack.containers().items() if s == "recorder")

    def completed() -> Any:
        result = stack.docker(
            "exec", recorder, "sluicegate", "tasks", "--status", "completed", "--limit", "5", "--json", check=False
        )
        if result.returncode != 0:
            return None
        records = json.loads(result.stdout or "[]")
        return records or None

    records = wait_for(completed, 120, "completed task records in the store", interval=2.0)
    assert all(r["status"] == "completed" for r in records)
    print(f"\ncompose: the store holds completed records, e.g. {records[0]['task_id']} ({records[0]['action']})")
