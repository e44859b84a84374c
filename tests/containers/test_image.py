"""The project's image, built from its Dockerfile and run: every role as a container, tasks through the image's own CLI.

On a private network with a RabbitMQ container, and again on the host network (each role on its
own metrics port); every long-running container must turn healthy by the image's own health check,
every task must complete exactly once, and the run removes everything it created.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from types import ModuleType

import pytest

from .conftest import Broker, Image
from .docker import Docker, free_port, wait_for
from .roles import CORE, ROLES, Role, Site, scrape

pytestmark = pytest.mark.timeout(900)

TASKS = 200
SUMMARY = re.compile(r"^(\d+) submitted: (.*?); latency", re.M)


@pytest.fixture(scope="session")
def roles(docker: Docker, project_image: Image) -> list[Role]:
    """The roles of ROLES the image has; the others are reported and skipped."""
    present = []
    for role in ROLES:
        if docker.run_once(project_image.tag, role.name, "--help", check=False).returncode == 0:
            present.append(role)
        else:
            print(f"\nthe image has no `{role.name}` role yet: not run")
    assert {r.name for r in present} >= CORE, "the image must run a scheduler, a dispatcher and a worker"
    return present


def _store_url(docker: Docker, base_images: ModuleType, network: str) -> str:
    name = docker.start("postgres", base_images.POSTGRES.tag, network=network, env={"POSTGRES_PASSWORD": "sluicegate"})
    wait_for(
        lambda: docker("exec", name, "pg_isready", "-q", "-h", "127.0.0.1", check=False).returncode == 0,
        timeout=60,
        what="PostgreSQL accepting connections",
    )
    return f"postgresql://postgres:sluicegate@{name}:5432/postgres"


def _submit(docker: Docker, image: str, site: Site, network: str, count: int) -> str:
    env = {"RABBITMQ_URL": site.broker_url, "SLUICEGATE_PREFIX": site.prefix}
    result = docker.run_once(
        image, "submit", "echo", '{"hello": "container"}', "--count", str(count), "--timeout", "90",
        network=network, env=env, timeout=150, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"submit exited {result.returncode}:\n{result.stdout}\n{result.stderr[-2000:]}"
    return result.stdout


def _total(samples: dict[str, float], name: str) -> float:
    return samples.get(name, 0.0)


def _check_summary(stdout: str, count: int) -> None:
    summary = SUMMARY.search(stdout)
    assert summary is not None, f"no summary in the submit output: {stdout!r}"
    assert summary.group(1) == str(count)
    assert summary.group(2) == f"completed {count}", f"not every task completed: {summary.group(0)}"


def _check_exactly_once(metrics: dict[str, dict[str, float]], count: int) -> None:
    ran = sum(_total(m, 'sluicegate_worker_tasks_total{status="completed"}') for m in metrics.values())
    forwarded = sum(_total(m, 'sluicegate_tasks_completed_total{status="completed"}') for m in metrics.values())
    received = sum(_total(m, "sluicegate_tasks_received_total") for m in metrics.values())
    assert ran == count, f"workers ran {ran} tasks for {count} submitted: each must run exactly once"
    assert forwarded == count, f"dispatchers settled {forwarded} completions for {count} tasks"
    assert received == count, f"schedulers received {received} task messages for {count}"


def _delete_topology(docker: Docker, broker: Broker, site: Site, dispatcher_ids: list[str]) -> None:
    """Delete every queue and exchange of the run's prefix, and check that none is left."""
    import asyncio

    from sluicegate import amqp

    async def delete() -> None:
        connection = await amqp.connect(broker.host_url, deadline=20)
        async with connection:
            await amqp.delete_topology(connection, amqp.Topology(site.prefix), dispatcher_ids)

    asyncio.run(delete())
    queues = docker("exec", broker.name, "rabbitmqctl", "-q", "list_queues", "name").stdout.split()
    exchanges = docker("exec", broker.name, "rabbitmqctl", "-q", "list_exchanges", "name").stdout.split()
    left = [name for name in queues + exchanges if name.startswith(site.prefix + ".")]
    assert not left, f"left on the broker: {left}"


def _one_off_submit_probed_every_second(docker: Docker, image: str, site: Site, network: str) -> int:
    """A `submit` that runs for a few seconds, its health probed every second: it must never fail.

    `submit` serves no /healthz; the image's health check must pass a one-shot command instead of
    failing it. Returns how many tasks it submitted.
    """
    count = 4
    name = docker.start(
        "oneoff-submit",
        image,
        "submit", "sleep", '{"seconds": 3}', "--count", str(count), "--timeout", "60",
        network=network,
        env={"RABBITMQ_URL": site.broker_url, "SLUICEGATE_PREFIX": site.prefix},
        options=["--init", "--health-interval=1s", "--health-start-period=0s", "--health-retries=1"],
    )  # fmt: skip
    seen = set()

    def finished() -> bool:
        status = docker.health(name)
        seen.add(status)
        return status.startswith("exited")

    wait_for(finished, 60, f"{name} to finish", interval=0.2)
    state = docker.inspect(name)["State"]
    probes = state.get("Health", {}).get("Log", [])
    if probes and probes[-1]["ExitCode"] == 137 and not probes[-1]["Output"]:
        probes.pop()  # a probe still running when the command ended is killed with the container
    assert state["ExitCode"] == 0, docker.logs(name)
    assert "healthy" in seen, f"{name} was {seen} while it ran"
    assert "unhealthy" not in seen, f"{name} was marked unhealthy: {probes}"
    assert probes, "the health check never ran"
    assert all(p["ExitCode"] == 0 and "one-shot" in p["Output"] for p in probes), probes
    _check_summary(docker.logs(name), count)
    docker.remove(name)
    return count


class Deployment:
    """The roles of one site as containers; `stop` removes them (the deployments fixture, at the latest)."""

    def __init__(self, docker: Docker, image: str, roles: list[Role], site: Site, network: str, tag: str) -> None:
        self.docker = docker
        self.image = image
        self.roles = roles
        self.site = site
        self.network = network
        self.tag = tag
        self.containers: dict[str, str] = {}  # suffix -> container name

    def start(self) -> None:
        for role in self.roles:
            for command in role.setup:
                done = self.docker.run_once(self.image, command, network=self.network, env=role.env(self.site, 0))
                print(f"\n{role.name}: `{command}` done: {done.stdout.strip()[-200:]}")
            for index in range(role.replicas):
                suffix = f"{self.tag}-{role.suffix(index)}"
                env = role.env(self.site, index)
                if suffix in self.site.metrics_ports:
                    env["SLUICEGATE_METRICS_PORT"] = str(self.site.metrics_ports[suffix])
                self.containers[suffix] = self.docker.start(
                    suffix, self.image, role.name, network=self.network, env=env, options=["--init"]
                )

    def metrics(self, host_of: dict[str, str]) -> dict[str, dict[str, float]]:
        return {
            suffix: scrape(host_of[suffix], self.site.metrics_ports.get(suffix, 9100)) for suffix in self.containers
        }

    def stop(self) -> None:
        self.docker.remove(*self.containers.values())


@pytest.fixture
def deployments() -> Iterator[list[Deployment]]:
    made: list[Deployment] = []
    yield made
    for deployment in made:
        deployment.stop()


def test_runtime_image_has_no_pip_or_setuptools(docker: Docker, project_image: Image) -> None:
    probe = "import importlib.util as u; print(sorted(m for m in ('pip', 'setuptools', 'wheel') if u.find_spec(m)))"
    for python in ("/opt/sluicegate/bin/python", "python3"):
        found = docker.run_once(project_image.tag, "-c", probe, options=["--entrypoint", python]).stdout.strip()
        assert found == "[]", f"{python} in the runtime image still has {found}"
    shell = docker.run_once(
        project_image.tag, "-c", "command -v pip pip3 || true", options=["--entrypoint", "sh"]
    ).stdout.strip()
    assert shell == "", f"pip on PATH: {shell}"


def test_every_role_on_a_private_network(
    docker: Docker,
    project_image: Image,
    base_images: ModuleType,
    roles: list[Role],
    broker: Broker,
    network: str,
    deployments: list[Deployment],
) -> None:
    prefix = f"{docker.run_id}-net"
    dispatcher = next(r for r in roles if r.name == "dispatcher")
    names = [docker.name(f"net-{dispatcher.suffix(i)}") for i in range(dispatcher.replicas)]
    store = _store_url(docker, base_images, network) if any(r.needs_store for r in roles) else ""
    site = Site(
        broker_url=broker.url,
        prefix=prefix,
        dispatchers=[f"{n}:50051" for n in names],
        listen=["0.0.0.0:50051"] * dispatcher.replicas,
        store_url=store,
    )
    deployment = Deployment(docker, project_image.tag, roles, site, network, "net")
    deployments.append(deployment)
    started = time.monotonic()
    deployment.start()
    healthy = docker.wait_healthy(list(deployment.containers.values()), timeout=150)
    print(f"\nhealthy after (s): { {n: round(s, 1) for n, s in healthy.items()} }")

    out = _submit(docker, project_image.tag, site, network, TASKS)
    print(out.strip())
    _check_summary(out, TASKS)
    slow = _one_off_submit_probed_every_second(docker, project_image.tag, site, network)
    hosts = {suffix: docker.ip(name, network) for suffix, name in deployment.containers.items()}
    _check_exactly_once(deployment.metrics(hosts), TASKS + slow)
    print(f"private network: {TASKS + slow} of {TASKS + slow} tasks completed once, {time.monotonic() - started:.0f} s")

    deployment.stop()
    _delete_topology(docker, broker, site, [f"{prefix}-d{i}" for i in range(dispatcher.replicas)])


def test_roles_sharing_the_host_network_each_on_its_own_metrics_port(
    docker: Docker, project_image: Image, roles: list[Role], broker: Broker, deployments: list[Deployment]
) -> None:
    """On the host network every process shares one port space: each role gets its own metrics port
    (and the dispatchers their own gRPC ports), and each container's health check probes its own."""
    prefix = f"{docker.run_id}-host"
    host_roles = [r for r in roles if not r.needs_store]
    dispatcher = next(r for r in host_roles if r.name == "dispatcher")
    grpc_ports = [free_port() for _ in range(dispatcher.replicas)]
    metrics = {f"host-{r.suffix(i)}": free_port() for r in host_roles for i in range(r.replicas)}
    site = Site(
        broker_url=broker.host_url,
        prefix=prefix,
        dispatchers=[f"127.0.0.1:{p}" for p in grpc_ports],
        listen=[f"127.0.0.1:{p}" for p in grpc_ports],
        metrics_ports=metrics,
    )
    deployment = Deployment(docker, project_image.tag, host_roles, site, "host", "host")
    deployments.append(deployment)
    deployment.start()
    docker.wait_healthy(list(deployment.containers.values()), timeout=150)
    for suffix, name in deployment.containers.items():
        health = docker.inspect(name)["State"]["Health"]["Log"][-1]
        assert health["ExitCode"] == 0, f"{suffix}: {health}"
        env = dict(e.split("=", 1) for e in docker.inspect(name)["Config"]["Env"])
        assert env["SLUICEGATE_METRICS_PORT"] == str(metrics[suffix]), "each container probes its own port"

    out = _submit(docker, project_image.tag, site, "host", TASKS)
    _check_summary(out, TASKS)
    _check_exactly_once(deployment.metrics(dict.fromkeys(deployment.containers, "127.0.0.1")), TASKS)
    print(f"\nhost network: {TASKS} of {TASKS} tasks completed once; metrics ports {sorted(metrics.values())}")

    deployment.stop()
    _delete_topology(docker, broker, site, [f"{prefix}-d{i}" for i in range(dispatcher.replicas)])
