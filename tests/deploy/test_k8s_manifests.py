"""deploy/k8s: the base and both overlays, rendered and checked against Kubernetes schemas offline.

Rendering uses a real kustomize (standalone or `kubectl kustomize`) when one is installed, and the
fallback renderer in kustomize_lite.py otherwise; where both exist, they must agree exactly.
Built-in kinds are validated with kubernetes-validate in strict mode (unknown fields are errors).
RabbitmqCluster is a custom resource with no bundled schema, so it gets a structural check here.
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest

# The oldest Kubernetes these manifests target: native gRPC probes are GA from 1.27, and the
# restricted Pod Security labels and autoscaling/v2 are long stable by then.
K8S_VERSION = "1.30"

TARGETS = ("base", "overlays/dev", "overlays/production")
NAMESPACES = {"overlays/dev": "sluicegate-dev", "overlays/production": "sluicegate"}
EXPECTED_IMAGES = {"overlays/dev": "sluicegate:dev", "overlays/production": "registry.example.com/sluicegate:0.1.0"}
BROKER_NODES = {"overlays/dev": 1, "overlays/production": 3}
SECRET_NAME = "sluicegate-rabbitmq"
STORE_SECRET_NAME = "sluicegate-store"
SCHEDULER_PARTITIONS = {"sluicegate-scheduler": 0, "sluicegate-scheduler-p1": 1}  # Deployment -> partition
SLUICEGATE_DEPLOYMENTS = {*SCHEDULER_PARTITIONS, "sluicegate-dispatcher", "sluicegate-worker", "sluicegate-recorder"}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")
BROKER_ROLES = {*SCHEDULER_PARTITIONS, "sluicegate-dispatcher", "sluicegate-recorder", "sluicegate-migrate"}
STORE_ROLES = {"sluicegate-recorder", "sluicegate-migrate"}

Render = Callable[[Path], list[dict[str, Any]]]


@pytest.fixture(scope="module", params=TARGETS)
def target(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module", params=tuple(NAMESPACES))
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


def _objects(render: Render, lib: ModuleType, name: str) -> list[dict[str, Any]]:
    return render(lib.K8S_DIR / name)


def _by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def _workloads(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every object that runs pods, by name."""
    return {name: obj for kind in WORKLOAD_KINDS for name, obj in _by_kind(objects, kind).items()}


def _one_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    return containers[0]


# --------------------------------------------------------------------------------------------
# Rendering


def test_kustomizations_list_existing_files_and_leave_none_unused(lib: ModuleType, target: str) -> None:
    directory = lib.K8S_DIR / target
    (kustomization,) = lib.load_yaml_documents(directory / "kustomization.yaml")
    referenced = set(kustomization.get("resources", [])) | {p["path"] for p in kustomization.get("patches", [])}
    for entry in referenced:
        assert (directory / entry).exists(), f"{target}: {entry} does not exist"
    unused = {p.name for p in directory.glob("*.yaml")} - referenced - {"kustomization.yaml"}
    assert not unused, f"{target}: files no kustomization uses: {sorted(unused)}"


@pytest.mark.timeout(120)
def test_fallback_renderer_matches_real_kustomize(lib: ModuleType, kustomize_lite: ModuleType, target: str) -> None:
    if lib.real_kustomize_command() is None:
        pytest.skip("neither kustomize nor kubectl is installed; only the fallback renderer is available")
    real = {lib.object_key(obj): obj for obj in lib.render_with_real_kustomize(lib.K8S_DIR / target)}
    lite = {lib.object_key(obj): obj for obj in kustomize_lite.render(lib.K8S_DIR / target)}
    assert set(lite) == set(real)
    for key, obj in real.items():
        assert lite[key] == obj, f"{key}: the fallback renderer differs from kustomize"


def test_fallback_renderer_refuses_what_it_does_not_implement(kustomize_lite: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n", encoding="utf-8")
    with pytest.raises(kustomize_lite.UnsupportedKustomization):
        kustomize_lite.render(tmp_path)


# --------------------------------------------------------------------------------------------
# Schemas


def _check_rabbitmq_cluster(obj: dict[str, Any]) -> list[str]:
    """A structural check of the fields used here, following the operator's rabbitmq.com/v1beta1 API."""
    problems = []
    spec = obj.get("spec", {})
    known = {
        "replicas", "image", "imagePullSecrets", "service", "persistence", "resources", "affinity",
        "tolerations", "rabbitmq", "tls", "override", "secretBackend", "skipPostDeploySteps",
        "terminationGracePeriodSeconds", "delayStartSeconds", "autoEnableAllFeatureFlags",
    }  # fmt: skip
    if set(spec) - known:
        problems.append(f"unknown spec fields {sorted(set(spec) - known)}")
    if spec.get("replicas") not in (1, 3, 5):
        problems.append("replicas must be 1, 3 or 5 (the sizes the operator supports)")
    if not re.fullmatch(r"rabbitmq:[\w.-]+", str(spec.get("image", ""))):
        problems.append("image must be a tagged rabbitmq image")
    if not re.fullmatch(r"\d+(Mi|Gi|Ti)", str(spec.get("persistence", {}).get("storage", ""))):
        problems.append("persistence.storage must be a quantity")
    for part in ("requests", "limits"):
        if set(spec.get("resources", {}).get(part, {})) != {"cpu", "memory"}:
            problems.append(f"resources.{part} needs cpu and memory")
    if set(spec.get("rabbitmq", {})) - {"additionalConfig", "advancedConfig", "envConfig", "additionalPlugins"}:
        problems.append("unknown spec.rabbitmq fields")
    if set(spec.get("secretBackend", {})) - {"externalSecret", "vault"}:
        problems.append("unknown spec.secretBackend fields")
    return problems


@pytest.mark.timeout(120)
def test_every_object_matches_its_schema(render_kustomization: Render, lib: ModuleType, target: str) -> None:
    problems = []
    for obj in _objects(render_kustomization, lib, target):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "RabbitmqCluster":
            assert obj["apiVersion"] == "rabbitmq.com/v1beta1"
            problems += [f"{where}: {p}" for p in _check_rabbitmq_cluster(obj)]
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            problems.append(f"{where}: {'/'.join(map(str, err.absolute_path))}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{where}: no schema for {obj['apiVersion']} in Kubernetes {K8S_VERSION}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------
# What the overlays must produce


def test_namespace(render_kustomization: Render, lib: ModuleType, overlay: str) -> None:
    objects = _objects(render_kustomization, lib, overlay)
    namespace = NAMESPACES[overlay]
    assert set(_by_kind(objects, "Namespace")) == {namespace}
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace, lib.object_key(obj)


def test_images(render_kustomization: Render, lib: ModuleType, overlay: str) -> None:
    for name, deployment in _workloads(_objects(render_kustomization, lib, overlay)).items():
        image = _one_container(deployment)["image"]
        if name in SLUICEGATE_DEPLOYMENTS | {"sluicegate-migrate"}:
            assert image == EXPECTED_IMAGES[overlay], name
        assert re.search(r":[\w.-]+$", image), f"{name}: pin {image}"
        assert not image.endswith(":latest"), f"{name}: pin {image}"


def test_pods_are_locked_down(render_kustomization: Render, lib: ModuleType, overlay: str) -> None:
    for name, deployment in _workloads(_objects(render_kustomization, lib, overlay)).items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod.get("automountServiceAccountToken") is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] >= 1000, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            resources = container["resources"]
            assert set(resources["requests"]) == {"cpu", "memory"}, name
            assert set(resources["limits"]) == {"cpu", "memory"}, name
            # A read-only root needs somewhere writable for temporary files.
            assert any(m["mountPath"] == "/tmp" for m in container.get("volumeMounts", [])), name


def test_broker_url_comes_only_from_the_secret(render_kustomization: Render, lib: ModuleType, overlay: str) -> None:
    objects = _objects(render_kustomization, lib, overlay)
    for cm in _by_kind(objects, "ConfigMap").values():
        assert not any("amqp" in str(v) for v in cm.get("data", {}).values()), "a broker URL in a ConfigMap"
    for name, deployment in _workloads(objects).items():
        env = lib.container_env(_one_container(deployment))
        assert not any("amqp" in str(item.get("value", "")) for item in env.values()), name
        url_vars = lib.BROKER_URL_ENV & set(env)
        if name in BROKER_ROLES:
            (var,) = url_vars
            role = lib.ROLE_BROKER_USERS[name.removeprefix("sluicegate-")].removeprefix("sluicegate-")
            assert env[var]["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": f"url-{role}"}, name
        else:
            assert not url_vars, f"{name} needs no broker credentials"


def test_store_url_comes_only_from_its_secret(render_kustomization: Render, lib: ModuleType, overlay: str) -> None:
    objects = _objects(render_kustomization, lib, overlay)
    for cm in _by_kind(objects, "ConfigMap").values():
        assert not any("postgres" in str(v) for v in cm.get("data", {}).values()), "a store URL in a ConfigMap"
    for name, workload in _workloads(objects).items():
        env = lib.container_env(_one_container(workload))
        assert not any("postgres" in str(item.get("value", "")) for item in env.values() if "PASSWORD" in item["name"])
        if name in STORE_ROLES:
            assert env["SLUICEGATE_STORE_URL"]["valueFrom"]["secretKeyRef"] == {"name": STORE_SECRET_NAME, "key": "url"}
        else:
            assert not lib.STORE_URL_ENV & set(env), f"{name} needs no task store"
    postgres = lib.container_env(_one_container(_workloads(objects)["sluicegate-postgres"]))
    assert postgres["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": STORE_SECRET_NAME, "key": "password"}


def test_dev_store_secret_matches_the_database(render_kustomization: Render, lib: ModuleType) -> None:
    objects = _objects(render_kustomization, lib, "overlays/dev")
    data = _by_kind(objects, "Secret")[STORE_SECRET_NAME]["stringData"]
    match = re.fullmatch(r"postgresql://([^:]+):([^@]+)@([\w-]+):(\d+)/(\w+)", data["url"])
    assert match, data["url"]
    user, password, host, port, database = match.groups()
    assert password == data["password"]
    env = lib.container_env(_one_container(_workloads(objects)["sluicegate-postgres"]))
    assert (user, database) == (env["POSTGRES_USER"]["value"], env["POSTGRES_DB"]["value"])
    service = _by_kind(objects, "Service")[host]
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}


def test_the_migration_job_runs_migrate_and_retries(
    render_kustomization: Render, lib: ModuleType, overlay: str
) -> None:
    objects = _objects(render_kustomization, lib, overlay)
    (job,) = _by_kind(objects, "Job").values()
    container = _one_container(job)
    assert container["args"] == ["migrate"]
    assert container["envFrom"] == [{"configMapRef": {"name": "sluicegate-config"}}]
    assert set(lib.container_env(container)) <= lib.SLUICEGATE_ENV | lib.OTEL_ENV
    assert job["spec"]["backoffLimit"] >= 3, "PostgreSQL may still be starting"
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    assert job["spec"]["ttlSecondsAfterFinished"] > 0, "a finished Job goes, so the next apply runs migrations again"


def test_the_store_keeps_its_data(render_kustomization: Render, lib: ModuleType, overlay: str) -> None:
    (store,) = _by_kind(_objects(render_kustomization, lib, overlay), "StatefulSet").values()
    (claim,) = store["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in _one_container(store)["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/var/lib/postgresql/data"
    env = lib.container_env(_one_container(store))
    assert env["PGDATA"]["value"].startswith("/var/lib/postgresql/data/"), "below the mount point (lost+found)"
    assert re.fullmatch(r"\d+Gi", claim["spec"]["resources"]["requests"]["storage"])


def test_dev_secret_serves_both_the_broker_and_the_clients(render_kustomization: Render, lib: ModuleType) -> None:
    secrets = _by_kind(_objects(render_kustomization, lib, "overlays/dev"), "Secret")
    data = dict(secrets[SECRET_NAME].get("stringData", {}))
    data.update({k: base64.b64decode(v).decode() for k, v in secrets[SECRET_NAME].get("data", {}).items()})
    # The keys of the operator's default-user format, plus the URL Sluicegate reads.
    assert {"url", "username", "password", "default_user.conf", "host", "port"} <= set(data)
    match = re.fullmatch(r"amqp://([^:]+):([^@]+)@([\w.-]+):(\d+)/", data["url"])
    assert match, data["url"]
    user, password, host, port = match.groups()
    assert (user, password, port) == (data["username"], data["password"], data["port"])
    assert data["host"].startswith(f"{host}.sluicegate-dev.svc")
    conf = dict(line.replace(" ", "").split("=", 1) for line in data["default_user.conf"].splitlines() if line.strip())
    assert conf == {"default_user": user, "default_pass": password}


def test_dev_broker_users_are_the_definitions_users(render_kustomization: Render, lib: ModuleType) -> None:
    """Each role's URL names its own user, whose password is the one the imported definitions hash."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(
        "broker_definitions", lib.REPO_ROOT / "scripts" / "broker_definitions.py"
    )
    assert spec is not None
    assert spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    secrets = _by_kind(_objects(render_kustomization, lib, "overlays/dev"), "Secret")
    data = secrets[SECRET_NAME]["stringData"]
    definitions = json.loads(secrets["sluicegate-rabbitmq-definitions"]["stringData"]["definitions.json"])
    hashes = {u["name"]: u["password_hash"] for u in definitions["users"]}
    for role in ("scheduler", "dispatcher", "recorder", "client"):
        match = re.fullmatch(r"amqp://([^:]+):([^@]+)@([\w.-]+):(\d+)/", data[f"url-{role}"])
        assert match, role
        user, password = match.group(1), match.group(2)
        assert user == f"sluicegate-{role}"
        assert tool.password_matches(password, hashes[user]), f"{role}: the URL's password is not the imported one"
    # Definitions imported at boot replace the default user: the operator's must be among them.
    assert tool.password_matches(data["password"], hashes[data["username"]])
    assert "administrator" in {u["name"]: u for u in definitions["users"]}[data["username"]]["tags"]
    # The same grants as compose's broker.
    compose = json.loads(lib.DEFINITIONS.read_text(encoding="utf-8"))
    assert definitions["permissions"][1:] == compose["permissions"][1:]
    assert definitions["topic_permissions"] == compose["topic_permissions"]


def test_production_commits_no_credentials(render_kustomization: Render, lib: ModuleType) -> None:
    # Neither the broker's nor the store's Secret: both are created out of band.
    assert not _by_kind(_objects(render_kustomization, lib, "overlays/production"), "Secret")


def test_rabbitmq_cluster(render_kustomization: Render, lib: ModuleType, overlay: str) -> None:
    (cluster,) = _by_kind(_objects(render_kustomization, lib, overlay), "RabbitmqCluster").values()
    spec = cluster["spec"]
    assert spec["replicas"] == BROKER_NODES[overlay]
    assert spec["secretBackend"]["externalSecret"]["name"] == SECRET_NAME
    # The same consumer timeout as the compose broker: leases of long tasks must survive on both.
    k8s_conf = dict(
        (k.strip(), v.strip())
        for k, _, v in (line.partition("=") for line in spec["rabbitmq"]["additionalConfig"].splitlines())
        if k.strip()
    )
    compose_conf = (lib.REPO_ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf").read_text(encoding="utf-8")
    assert f"consumer_timeout = {k8s_conf['consumer_timeout']}" in compose_conf
    # The broker's users come from the definitions Secret, imported at boot.
    pod = spec["override"]["statefulSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["definitions"]
    assert k8s_conf["load_definitions"] == f"{mount}/definitions.json"
    volume = {v["name"]: v for v in pod["volumes"]}["definitions"]
    assert volume["secret"]["secretName"] == "sluicegate-rabbitmq-definitions"


def test_every_broker_node_is_an_address_of_the_services(render_kustomization: Render, lib: ModuleType) -> None:
    """Production: the documented Secret's `url` names each broker pod, one per RabbitmqCluster replica.

    (The production overlay ships no Secret, so what is checked is the command deploy/k8s/README.md
    gives for creating it; the dev overlay's one node is reached through the Service.)
    """
    (cluster,) = _by_kind(_objects(render_kustomization, lib, "overlays/production"), "RabbitmqCluster").values()
    name, namespace = cluster["metadata"]["name"], NAMESPACES["overlays/production"]
    readme = (lib.K8S_DIR / "README.md").read_text(encoding="utf-8")
    urls = re.findall(r'URL="(?:\$\{URL\},)?(amqp://[^"]+)"', readme)
    pod = re.compile(rf"amqp://sluicegate:\$\{{PASSWORD\}}@{name}-server-(\d+)\.{name}-nodes\.{namespace}\.svc:5672/")
    indexes = [int(m.group(1)) for m in map(pod.fullmatch, urls) if m]
    assert len(indexes) == len(urls), f"every documented address is a broker pod's: {urls}"
    assert sorted(indexes) == list(range(cluster["spec"]["replicas"])), "one address per broker replica"
    assert '--from-literal=url="${URL}"' in readme


def test_dispatcher_probes_and_shutdown(render_kustomization: Render, lib: ModuleType, overlay: str) -> None:
    deployment = _by_kind(_objects(render_kustomization, lib, overlay), "Deployment")["sluicegate-dispatcher"]
    pod = deployment["spec"]["template"]["spec"]
    container = _one_container(deployment)
    env = lib.container_env(container)
    assert env["SLUICEGATE_DISPATCHER_LISTEN"]["value"] == "0.0.0.0:50051"
    assert env["SLUICEGATE_DISPATCHER_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}

    # The metrics port answers probes: the kubelet's gRPC probe cannot speak TLS to the gRPC port.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "metrics", probe
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"

    # preStop, then the drain, must end before the kubelet's SIGKILL.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pre_stop_s = float(pre_stop[1])
    drain_s = lib.parse_duration(env["SLUICEGATE_DISPATCHER_DRAIN_GRACE"]["value"])
    grace_s = pod["terminationGracePeriodSeconds"]
    assert pre_stop_s + drain_s < grace_s, f"{pre_stop_s}s preStop + {drain_s}s drain >= {grace_s}s grace"
    # A draining dispatcher reports NOT_SERVING; liveness must not restart it before the drain ends.
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain_s


def test_scaling_and_disruption_budgets(render_kustomization: Render, lib: ModuleType, overlay: str) -> None:
    objects = _objects(render_kustomization, lib, overlay)
    deployments = _by_kind(objects, "Deployment")
    for name in SCHEDULER_PARTITIONS:
        assert deployments[name]["spec"]["replicas"] == 2, f"{name}: active and standby"

    dispatcher = deployments["sluicegate-dispatcher"]
    assert "replicas" not in dispatcher["spec"], "the HPA owns the dispatcher count"
    (hpa,) = _by_kind(objects, "HorizontalPodAutoscaler").values()
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "sluicegate-dispatcher",
    }
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    if overlay == "overlays/production":
        assert hpa["spec"]["minReplicas"] >= 2
    # Utilization targets are relative to requests: without one the HPA cannot work.
    assert "cpu" in _one_container(dispatcher)["resources"]["requests"]

    budgets = list(_by_kind(objects, "PodDisruptionBudget").values())
    for name in SLUICEGATE_DEPLOYMENTS:
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, f"{name}: expected one PodDisruptionBudget, found {len(covering)}"
        if "minAvailable" in covering[0]["spec"] and "replicas" in deployments[name]["spec"]:
            assert covering[0]["spec"]["minAvailable"] < deployments[name]["spec"]["replicas"], name


def test_each_scheduler_partition_runs_active_and_standby_under_one_partition_count(
    render_kustomization: Render, lib: ModuleType, overlay: str
) -> None:
    objects = _objects(render_kustomization, lib, overlay)
    config = _by_kind(objects, "ConfigMap")["sluicegate-config"]["data"]
    deployments = _by_kind(objects, "Deployment")
    schedulers = {n: d for n, d in deployments.items() if _one_container(d)["args"] == ["scheduler"]}
    assert set(schedulers) == set(SCHEDULER_PARTITIONS)
    assert int(config["SLUICEGATE_PARTITIONS"]) == len(SCHEDULER_PARTITIONS), "one Deployment per partition"
    budgets = {
        pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]: pdb
        for pdb in _by_kind(objects, "PodDisruptionBudget").values()
    }
    for name, deployment in schedulers.items():
        env = lib.container_env(_one_container(deployment))
        assert env["SLUICEGATE_SCHEDULER_PARTITION"]["value"] == str(SCHEDULER_PARTITIONS[name]), name
        assert deployment["spec"]["replicas"] == 2, f"{name}: active and standby"
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, name
        assert budgets[name]["spec"]["minAvailable"] == 1, f"{name}: a drain never takes both"
        # Every pod of the partition reads the shared config, so they agree on the count.
        assert {"configMapRef": {"name": "sluicegate-config"}} in _one_container(deployment)["envFrom"], name


def test_services_select_pods_and_ports(render_kustomization: Render, lib: ModuleType, overlay: str) -> None:
    objects = _objects(render_kustomization, lib, overlay)
    deployments = [w for w in _workloads(objects).values() if w["kind"] != "Job"]
    for name, service in _by_kind(objects, "Service").items():
        selector = service["spec"]["selector"]
        chosen = [d for d in deployments if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(chosen) == 1, f"Service {name} selects {len(chosen)} deployments"
        port_names = {p["name"] for p in _one_container(chosen[0])["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"Service {name}: no container port {port['targetPort']}"


def test_addresses_between_components(render_kustomization: Render, lib: ModuleType, overlay: str) -> None:
    objects = _objects(render_kustomization, lib, overlay)
    services = _by_kind(objects, "Service")
    ports = {name: {p["port"] for p in svc["spec"]["ports"]} for name, svc in services.items()}
    config = _by_kind(objects, "ConfigMap")["sluicegate-config"]["data"]

    otlp = re.fullmatch(r"http://([\w-]+):(\d+)", config["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert otlp, config["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert int(otlp.group(2)) == 4317
    assert 4317 in ports[otlp.group(1)], "the endpoint is not a port of that Service"

    worker = _by_kind(objects, "Deployment")["sluicegate-worker"]
    for address in lib.container_env(_one_container(worker))["SLUICEGATE_WORKER_DISPATCHERS"]["value"].split(","):
        host, port = address.rsplit(":", 1)
        assert host == "sluicegate-dispatcher", address
        assert int(port) in ports[host], address


def test_only_known_settings_are_set(render_kustomization: Render, lib: ModuleType, overlay: str) -> None:
    objects = _objects(render_kustomization, lib, overlay)
    allowed = lib.SLUICEGATE_ENV | lib.OTEL_ENV | {"POD_NAME"}
    config = _by_kind(objects, "ConfigMap")["sluicegate-config"]["data"]
    assert set(config) <= allowed, sorted(set(config) - allowed)
    for name in SLUICEGATE_DEPLOYMENTS:
        container = _one_container(_by_kind(objects, "Deployment")[name])
        assert set(lib.container_env(container)) <= allowed, name
        assert container["args"][0] in lib.ROLES, name
        assert container["envFrom"] == [{"configMapRef": {"name": "sluicegate-config"}}], name


def test_setting_names_exist_in_the_code(
    render_kustomization: Render, lib: ModuleType, compose: dict[str, Any]
) -> None:
    """Where a settings class is already importable, every name set for it must be one of its fields."""
    dispatcher = pytest.importorskip("sluicegate_dispatcher.settings")
    scheduler = pytest.importorskip("sluicegate_scheduler.settings")
    worker = pytest.importorskip("sluicegate.worker")
    recorder = pytest.importorskip("sluicegate_recorder.settings")
    store = pytest.importorskip("sluicegate.store.settings")
    classes = {
        "SLUICEGATE_DISPATCHER_": dispatcher.DispatcherSettings,
        "SLUICEGATE_SCHEDULER_": scheduler.SchedulerSettings,
        "SLUICEGATE_WORKER_": worker.WorkerSettings,
        "SLUICEGATE_RECORDER_": recorder.RecorderSettings,
        "SLUICEGATE_STORE_": store.StoreSettings,
    }
    names: set[str] = set()
    for svc in compose["services"].values():
        names |= set(svc.get("environment", {}))
    for overlay in NAMESPACES:
        objects = _objects(render_kustomization, lib, overlay)
        names |= set(_by_kind(objects, "ConfigMap")["sluicegate-config"]["data"])
        for name, workload in _workloads(objects).items():
            if name != "sluicegate-postgres":  # the image's own variables
                names |= set(lib.container_env(_one_container(workload)))
    for name in sorted(names):
        for prefix, cls in classes.items():
            if name.startswith(prefix):
                field = name.removeprefix(prefix).lower()
                assert field in cls.model_fields, f"{name}: {cls.__name__} has no field {field!r}"


def test_readme_commands_name_real_overlays(lib: ModuleType) -> None:
    readme = (lib.K8S_DIR / "README.md").read_text(encoding="utf-8")
    for line in readme.splitlines():
        if "kubectl apply -k" in line:
            path = shlex.split(line.strip().lstrip("$ "))[-1]
            assert (lib.REPO_ROOT / path / "kustomization.yaml").is_file(), line


def test_production_dispatchers_speak_tls_and_want_tokens_and_dev_says_it_does_not(
    render_kustomization: Render, lib: ModuleType
) -> None:
    objects = _objects(render_kustomization, lib, "overlays/production")
    workloads = _workloads(objects)
    dispatcher = _one_container(workloads["sluicegate-dispatcher"])
    env = {k: v.get("value") for k, v in lib.container_env(dispatcher).items()}
    mounts = {m["name"]: m["mountPath"] for m in dispatcher["volumeMounts"]}
    volumes = {v["name"]: v for v in workloads["sluicegate-dispatcher"]["spec"]["template"]["spec"]["volumes"]}
    assert env["SLUICEGATE_DISPATCHER_TLS_CERT"] == f"{mounts['tls']}/tls.crt"
    assert env["SLUICEGATE_DISPATCHER_TLS_KEY"] == f"{mounts['tls']}/tls.key"
    assert env["SLUICEGATE_DISPATCHER_AUTH_KEYS"] == f"{mounts['auth-keys']}/keys.json"
    assert volumes["tls"]["secret"]["secretName"] == "sluicegate-dispatcher-tls"
    assert volumes["auth-keys"]["secret"]["secretName"] == "sluicegate-auth-keys"
    assert "SLUICEGATE_DISPATCHER_INSECURE" not in _by_kind(objects, "ConfigMap")["sluicegate-config"]["data"]

    worker = _one_container(workloads["sluicegate-worker"])
    env = {k: v.get("value") for k, v in lib.container_env(worker).items()}
    mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
    volumes = {v["name"]: v for v in workloads["sluicegate-worker"]["spec"]["template"]["spec"]["volumes"]}
    assert env["SLUICEGATE_WORKER_TOKEN_FILE"] == f"{mounts['token']}/token"
    assert env["SLUICEGATE_WORKER_TLS_CA"] == f"{mounts['dispatcher-ca']}/ca.crt"
    assert volumes["token"]["secret"]["secretName"] == "sluicegate-worker-token"
    # Workers get the dispatchers' CA, never their private key.
    assert volumes["dispatcher-ca"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]

    dev = _by_kind(_objects(render_kustomization, lib, "overlays/dev"), "ConfigMap")["sluicegate-config"]["data"]
    assert dev["SLUICEGATE_DISPATCHER_INSECURE"] == "true"
