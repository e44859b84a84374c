"""docker-compose.yml: valid against the Compose Specification, and wired the way the design needs."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest

SCHEMA = Path(__file__).resolve().parent / "schemas" / "compose-spec.json"
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"


def _role(service: dict[str, Any]) -> str | None:
    """The sluicegate subcommand a service runs, or None for a third-party service."""
    if service.get("image") != "sluicegate:local":
        return None
    command = service.get("command", [])
    if service.get("entrypoint"):
        script = " ".join(command)
        match = re.search(r"\bsluicegate (\w+)", script)
        return match.group(1) if match else None
    return command[0] if command else None


def _services_with_role(compose: dict[str, Any], role: str) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if _role(svc) == role}


def _replicas(service: dict[str, Any]) -> int:
    return int(service.get("deploy", {}).get("replicas", 1))


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "use the mapping form of environment"
    return {key: str(value) for key, value in env.items()}


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def test_vendored_schema_is_the_recorded_one() -> None:
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_dependencies_exist_and_have_no_cycle(compose: dict[str, Any]) -> None:
    services = compose["services"]
    graph = {name: set(_depends_on(svc)) for name, svc in services.items()}
    for name, deps in graph.items():
        assert deps <= set(services), f"{name} depends on unknown services {deps - set(services)}"
    # Kahn's algorithm: every service must get a start position, or the graph has a cycle.
    remaining = dict(graph)
    while remaining:
        ready = [name for name, deps in remaining.items() if not deps & set(remaining)]
        assert ready, f"dependency cycle among {sorted(remaining)}"
        for name in ready:
            del remaining[name]


def _broker_nodes(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if str(svc.get("image", "")).startswith("rabbitmq:")}


def _interpolated(text: str) -> str:
    """A compose value with `${VAR:-default}` replaced by its default, as an empty environment gives."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def test_everything_that_talks_amqp_waits_for_every_broker_node(compose: dict[str, Any], lib: ModuleType) -> None:
    # Queues declared before a node has joined would have no replica on it.
    users = [name for name, svc in compose["services"].items() if lib.BROKER_URL_ENV & set(_env(svc))]
    assert users, "no service gets the broker URL"
    nodes = _broker_nodes(compose)
    for name in users:
        deps = _depends_on(compose["services"][name])
        for node in nodes:
            assert deps.get(node) == "service_healthy", f"{name} uses RabbitMQ but does not wait for {node}"


def test_every_amqp_role_gets_every_broker_node(compose: dict[str, Any], lib: ModuleType) -> None:
    from urllib.parse import urlsplit

    expected = {(svc["hostname"], 5672) for svc in _broker_nodes(compose).values()}
    for name, svc in compose["services"].items():
        env = _env(svc)
        for var in lib.BROKER_URL_ENV & set(env):
            urls = [urlsplit(_interpolated(u.strip())) for u in env[var].split(",")]
            assert {(u.hostname, u.port) for u in urls} == expected, f"{name}: {var} must list every node"
            assert len(urls) == len(expected), f"{name}: {var} lists a node twice"
            assert all(u.scheme == "amqp" and u.username and u.password for u in urls), name


def test_broker_url_goes_only_to_amqp_roles(compose: dict[str, Any], lib: ModuleType) -> None:
    # Workers speak gRPC to dispatchers; they have no business holding broker credentials.
    for name, svc in compose["services"].items():
        has_url = bool(lib.BROKER_URL_ENV & set(_env(svc)))
        assert has_url == (_role(svc) in {"scheduler", "dispatcher", "submit", "demo", "recorder", "migrate"}), name


def test_store_url_goes_only_to_the_roles_that_keep_records(compose: dict[str, Any], lib: ModuleType) -> None:
    for name, svc in compose["services"].items():
        assert bool(lib.STORE_URL_ENV & set(_env(svc))) == (_role(svc) in {"recorder", "migrate"}), name


def test_postgres_service(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert any(v.endswith(":/var/lib/postgresql/data") and not v.startswith("./") for v in postgres["volumes"])
    assert "postgres-data" in compose["volumes"]
    env = _env(postgres)
    (migrate,) = _services_with_role(compose, "migrate").values()
    url = _env(migrate)["SLUICEGATE_STORE_URL"]
    match = re.fullmatch(r"postgresql://([^:]+):([^@]+)@postgres:5432/(\w+)", url)
    assert match, url
    assert match.groups() == (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"])
    assert env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD"), "the demo password can be changed"


def test_migrate_runs_once_before_the_recorder(compose: dict[str, Any]) -> None:
    ((name, migrate),) = _services_with_role(compose, "migrate").items()
    assert _depends_on(migrate)["postgres"] == "service_healthy"
    assert migrate["restart"] in ("no", "on-failure"), "a one-shot job must not be restarted once it succeeded"
    assert migrate["healthcheck"] == {"disable": True}, "migrate serves no /healthz"
    recorders = _services_with_role(compose, "recorder")
    assert len(recorders) == 1
    for recorder in recorders.values():
        assert _depends_on(recorder)[name] == "service_completed_successfully"
        assert _env(recorder)["SLUICEGATE_STORE_URL"] == _env(migrate)["SLUICEGATE_STORE_URL"]


def test_three_broker_nodes_form_one_cluster(compose: dict[str, Any], lib: ModuleType) -> None:
    nodes = _broker_nodes(compose)
    assert len(nodes) == 3, "a quorum queue keeps a majority with one of three nodes down"
    assert len({svc["image"] for svc in nodes.values()}) == 1, "every node runs the same RabbitMQ"
    cookies = {_env(svc).get("RABBITMQ_ERLANG_COOKIE") for svc in nodes.values()}
    assert None not in cookies, "every node needs the cluster's Erlang cookie"
    assert len(cookies) == 1, "the nodes must share one Erlang cookie"
    data_volumes = set()
    for name, svc in nodes.items():
        assert svc["image"].endswith("-management"), "the management UI is part of the demo"
        assert svc["healthcheck"]["test"][:2] == ["CMD", "rabbitmq-diagnostics"], name
        # The node name follows the hostname; a stable one keeps the data volume usable.
        assert svc.get("hostname") == name, name
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        conf = sorted(source for target, source in mounts.items() if target.startswith("/etc/rabbitmq/conf.d/"))
        assert conf == [
            "./deploy/rabbitmq/cluster.conf",
            "./deploy/rabbitmq/definitions.conf",
            "./deploy/rabbitmq/rabbitmq.conf",
        ], name
        assert mounts["/etc/rabbitmq/definitions.json"] == "./deploy/rabbitmq/definitions.json", name
        plugins = (lib.REPO_ROOT / mounts["/etc/rabbitmq/enabled_plugins"]).read_text(encoding="utf-8")
        assert "rabbitmq_prometheus" in plugins, "Prometheus scrapes the broker on 15692"
        data_volumes.add(mounts["/var/lib/rabbitmq"])
        assert mounts["/var/lib/rabbitmq"] in compose["volumes"], name
    assert len(data_volumes) == 3, "each node needs its own data volume"
    cluster_conf = _rabbitmq_conf(lib.REPO_ROOT / "deploy" / "rabbitmq" / "cluster.conf")
    assert cluster_conf["cluster_formation.peer_discovery_backend"] == "classic_config"
    listed = {v for k, v in cluster_conf.items() if k.startswith("cluster_formation.classic_config.nodes.")}
    assert listed == {f"rabbit@{svc['hostname']}" for svc in nodes.values()}
    assert cluster_conf["cluster_partition_handling"] == "pause_minority"


def test_every_role_connects_as_its_own_broker_user_and_trusts_only_the_services(
    compose: dict[str, Any], lib: ModuleType
) -> None:
    import json
    from urllib.parse import urlsplit

    definitions = json.loads(lib.DEFINITIONS.read_text(encoding="utf-8"))
    users = {u["name"] for u in definitions["users"]}
    permitted = {p["user"] for p in definitions["permissions"]}
    loaded = _rabbitmq_conf(lib.REPO_ROOT / "deploy" / "rabbitmq" / "definitions.conf")
    assert loaded["load_definitions"] == "/etc/rabbitmq/definitions.json"
    for name, svc in compose["services"].items():
        env = _env(svc)
        for var in lib.BROKER_URL_ENV & set(env):
            expected = lib.ROLE_BROKER_USERS[_role(svc)]
            assert {urlsplit(u.strip()).username for u in env[var].split(",")} == {expected}, name
            assert expected in users, f"{expected} is not in definitions.json"
            assert expected in permitted, f"{expected} has no permissions in definitions.json"
            assert set(env["SLUICEGATE_TRUSTED_PUBLISHERS"].split(",")) == lib.TRUSTED_PUBLISHERS, name
    client = {p["user"]: p for p in definitions["topic_permissions"]}["sluicegate-client"]
    assert client == {"user": "sluicegate-client", "vhost": "/", "exchange": "sluicegate.events", "write": "^$",
                      "read": "^result\\.[0-9a-f]{32}$"}  # fmt: skip


def test_the_definitions_file_is_what_the_tool_writes_with_the_demo_passwords(lib: ModuleType) -> None:
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(
        "broker_definitions", lib.REPO_ROOT / "scripts" / "broker_definitions.py"
    )
    assert spec is not None
    assert spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    committed = json.loads(lib.DEFINITIONS.read_text(encoding="utf-8"))
    demo = {u["name"]: (u["name"] if "administrator" in u["tags"] else f"{u['name']}-dev") for u in committed["users"]}
    fresh = tool.definitions(demo)
    assert {k: v for k, v in committed.items() if k != "users"} == {k: v for k, v in fresh.items() if k != "users"}
    for user in committed["users"]:
        assert tool.password_matches(demo[user["name"]], user["password_hash"]), user["name"]


def test_dispatchers_say_they_run_without_tls_in_the_demo(compose: dict[str, Any]) -> None:
    for name, svc in _services_with_role(compose, "dispatcher").items():
        assert _env(svc)["SLUICEGATE_DISPATCHER_INSECURE"] == "true", f"{name} listens beyond loopback"


def test_rabbitmq_conf_allows_long_leases(lib: ModuleType) -> None:
    settings = _rabbitmq_conf(lib.REPO_ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf")
    assert int(settings["consumer_timeout"]) >= 3_600_000, "consumer_timeout (ms) should allow tasks of an hour or more"


def _rabbitmq_conf(path: Path) -> dict[str, str]:
    settings = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not key = value"
            assert "#" not in value, f"{path.name}: {line!r} (comments must be on lines of their own)"
            settings[key.strip()] = value.strip()
    return settings


def test_bind_mounts_exist(compose: dict[str, Any], lib: ModuleType) -> None:
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (lib.REPO_ROOT / source).exists(), f"{name}: {source} does not exist"


def test_third_party_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if "build" in svc:
            continue
        image = svc["image"]
        assert ":" in image, f"{name}: pin {image} to a version"
        assert not image.endswith(":latest"), f"{name}: pin {image} to a version"


def test_sluicegate_services_share_one_image_built_here(compose: dict[str, Any]) -> None:
    built = {name: svc for name, svc in compose["services"].items() if "build" in svc}
    assert built
    for name, svc in built.items():
        assert svc["image"] == "sluicegate:local", name
        assert svc["build"] == {"context": ".", "dockerfile": "Dockerfile"}, name


def test_topology_of_the_demo(compose: dict[str, Any]) -> None:
    assert len(_services_with_role(compose, "scheduler")) == 4, "two partitions, each active and standby"
    assert len(_services_with_role(compose, "dispatcher")) == 2
    assert sum(_replicas(s) for s in _services_with_role(compose, "worker").values()) == 3
    producers = _services_with_role(compose, "submit")
    assert len(producers) == 1
    (producer,) = producers.values()
    assert 'sluicegate submit echo \'{"hello":"world"}\' --count' in " ".join(producer["command"])
    assert producer["healthcheck"] == {"disable": True}, "submit serves no /healthz"


def test_every_scheduler_partition_has_an_active_and_a_standby_and_everyone_agrees_on_the_count(
    compose: dict[str, Any],
) -> None:
    # Every process that speaks AMQP is told the same partition count (workers speak only gRPC).
    for name, svc in compose["services"].items():
        if _role(svc) and "SLUICEGATE_RABBITMQ_URL" in _env(svc):
            assert _env(svc).get("SLUICEGATE_PARTITIONS") == "2", name
    per_partition: dict[int, list[str]] = {}
    for name, svc in _services_with_role(compose, "scheduler").items():
        per_partition.setdefault(int(_env(svc)["SLUICEGATE_SCHEDULER_PARTITION"]), []).append(name)
    assert sorted(per_partition) == [0, 1], "one set of schedulers per partition, numbered below the count"
    assert all(len(names) == 2 for names in per_partition.values()), per_partition
    producer = " ".join(next(iter(_services_with_role(compose, "submit").values()))["command"])
    assert "--spread" in producer, "the producer's tasks reach both partitions"


def test_dispatchers_listen_everywhere_with_distinct_ids_and_drain_in_time(
    compose: dict[str, Any], lib: ModuleType
) -> None:
    ids = set()
    for name, svc in _services_with_role(compose, "dispatcher").items():
        env = _env(svc)
        assert env["SLUICEGATE_DISPATCHER_LISTEN"] == "0.0.0.0:50051", name
        ids.add(env["SLUICEGATE_DISPATCHER_ID"])
        drain = lib.parse_duration(env["SLUICEGATE_DISPATCHER_DRAIN_GRACE"])
        stop = lib.parse_duration(svc["stop_grace_period"])
        assert drain < stop, f"{name}: Docker would SIGKILL before the {drain}s drain ends"
        assert svc.get("init") is True, f"{name}: needs an init to forward SIGTERM"
    assert len(ids) == 2


def test_workers_connect_to_every_dispatcher(compose: dict[str, Any]) -> None:
    dispatchers = {
        f"{name}:{_env(svc)['SLUICEGATE_DISPATCHER_LISTEN'].rsplit(':', 1)[1]}"
        for name, svc in _services_with_role(compose, "dispatcher").items()
    }
    for name, svc in _services_with_role(compose, "worker").items():
        assert set(_env(svc)["SLUICEGATE_WORKER_DISPATCHERS"].split(",")) == dispatchers, name
        deps = _depends_on(svc)
        for dispatcher in dispatchers:
            assert dispatcher.split(":")[0] in deps, f"{name} starts before {dispatcher}"


def test_long_running_roles_are_health_checked_like_the_image(compose: dict[str, Any], lib: ModuleType) -> None:
    image_check = lib.dockerfile_stages()[-1].last("HEALTHCHECK").exec_form()
    for role in ("scheduler", "dispatcher", "worker", "recorder"):
        for name, svc in _services_with_role(compose, role).items():
            assert svc["healthcheck"]["test"] == ["CMD", *image_check], name
            assert svc.get("read_only") is True, name
            assert "ALL" in svc.get("cap_drop", []), name


def test_only_known_settings_are_set(compose: dict[str, Any], lib: ModuleType) -> None:
    for name, svc in compose["services"].items():
        if _role(svc) is None:
            continue
        env = _env(svc)
        unknown = {k for k in env if k not in lib.SLUICEGATE_ENV | lib.OTEL_ENV}
        assert not unknown, f"{name}: variables Sluicegate does not read: {sorted(unknown)}"
        assert env.get("SLUICEGATE_METRICS_PORT") == "9100", name
        assert env.get("OTEL_SERVICE_NAME", "").startswith("sluicegate-"), name


def test_traces_go_to_jaeger_over_otlp_grpc(compose: dict[str, Any]) -> None:
    jaeger = compose["services"]["jaeger"]
    assert "receivers.otlp.protocols.grpc.endpoint=0.0.0.0:4317" in jaeger["command"]
    assert "127.0.0.1:16686:16686" in jaeger["ports"]
    for name, svc in compose["services"].items():
        if _role(svc) is not None:
            assert _env(svc)["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317", name


def test_published_ports_bind_to_localhost_only(compose: dict[str, Any]) -> None:
    # The demo's default credentials must not be reachable from the network.
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


@pytest.mark.parametrize("role", ["scheduler", "dispatcher", "worker", "recorder"])
def test_prometheus_scrapes_every_sluicegate_process(compose: dict[str, Any], lib: ModuleType, role: str) -> None:
    config = lib.load_yaml_documents(lib.REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml")[0]
    static_hosts: set[str] = set()
    dns_names: set[str] = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            static_hosts.update(target.rsplit(":", 1)[0] for target in static["targets"])
        for dns in job.get("dns_sd_configs", []):
            assert dns["port"] == 9100
            dns_names.update(dns["names"])
    for name, svc in _services_with_role(compose, role).items():
        if _replicas(svc) > 1:
            assert name in dns_names, f"{name} has replicas: discover them through DNS"
        else:
            assert name in static_hosts or name in dns_names, f"Prometheus does not scrape {name}"
    services = set(compose["services"]) | {"localhost"}
    assert static_hosts | dns_names <= services, "Prometheus targets a host that is not a service"
    assert set(_broker_nodes(compose)) <= static_hosts, "Prometheus scrapes every broker node"
