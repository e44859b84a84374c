"""The provisioned Grafana dashboard and data source, against the metric names of the contract."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

# The metrics every Sluicegate deployment exports (Prometheus naming), by type.
GAUGES = {
    "sluicegate_connected_workers",
    "sluicegate_worker_slots",
    "sluicegate_leases_in_flight",
    "sluicegate_recorder_held_messages",
    "sluicegate_recorder_store_up",
    "sluicegate_lane_depth",
    "sluicegate_lane_oldest_seconds",
    "sluicegate_waiting_tasks",
}
COUNTERS = {
    "sluicegate_send_lock_timeouts_total",
    "sluicegate_requeues_total",
    "sluicegate_dead_tasks_total",
    "sluicegate_tasks_assigned_total",
    "sluicegate_tasks_completed_total",
    "sluicegate_lifecycle_events_total",
    "sluicegate_recorder_events_total",
}
HISTOGRAMS = {
    "sluicegate_send_lock_wait_seconds",
    "sluicegate_stream_write_seconds",
    "sluicegate_receipt_ack_seconds",
    "sluicegate_task_latency_seconds",
    "sluicegate_batch_size",
}
HISTOGRAM_SERIES = {f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}


@pytest.fixture(scope="module")
def grafana_dir(lib: ModuleType) -> Path:
    return lib.REPO_ROOT / "deploy" / "grafana"


@pytest.fixture(scope="module")
def dashboard(grafana_dir: Path) -> dict[str, Any]:
    return json.loads((grafana_dir / "dashboards" / "sluicegate.json").read_text(encoding="utf-8"))


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return [p for p in panels if p.get("type") != "row"]


def _expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in _panels(dashboard) for target in panel.get("targets", [])]


def test_every_contract_metric_is_on_the_dashboard(dashboard: dict[str, Any]) -> None:
    used = {name for expr in _expressions(dashboard) for name in re.findall(r"\bsluicegate_\w+", expr)}
    unknown = used - GAUGES - COUNTERS - HISTOGRAM_SERIES
    assert not unknown, f"the dashboard queries metrics nobody exports: {sorted(unknown)}"
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) if name in HISTOGRAM_SERIES else name for name in used}
    missing = (GAUGES | COUNTERS | HISTOGRAMS) - shown
    assert not missing, f"metrics without a panel: {sorted(missing)}"


def test_counters_and_histograms_are_queried_as_rates(dashboard: dict[str, Any]) -> None:
    # A raw counter or bucket plotted as is only ever grows; it must go through rate().
    for expr in _expressions(dashboard):
        for name in re.findall(r"\bsluicegate_\w+", expr):
            if name in COUNTERS or name in HISTOGRAM_SERIES:
                assert re.search(rf"rate\(\s*{name}\b", expr), f"{name} not under rate(): {expr}"
            if name.endswith("_bucket"):
                assert expr.startswith("histogram_quantile("), expr
                assert "le" in re.findall(r"by \(([^)]*)\)", expr)[0].replace(" ", "").split(","), expr


def test_panels_use_the_provisioned_data_source(dashboard: dict[str, Any], grafana_dir: Path, lib: ModuleType) -> None:
    datasources = lib.load_yaml_documents(grafana_dir / "provisioning" / "datasources" / "prometheus.yml")[0]
    (prometheus,) = [d for d in datasources["datasources"] if d["type"] == "prometheus"]
    assert prometheus["url"] == "http://prometheus:9090", "the compose service name and port"
    for panel in _panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": prometheus["uid"]}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == prometheus["uid"], panel["title"]


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_provider_points_at_the_mounted_folder(
    compose: dict[str, Any], grafana_dir: Path, lib: ModuleType
) -> None:
    providers = lib.load_yaml_documents(grafana_dir / "provisioning" / "dashboards" / "sluicegate.yml")[0]
    paths = {p["options"]["path"] for p in providers["providers"]}
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    for path in paths:
        assert mounts.get(path) == "./deploy/grafana/dashboards", f"{path} is not where the dashboards are mounted"
    assert mounts.get("/etc/grafana/provisioning") == "./deploy/grafana/provisioning"
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (grafana_dir / "dashboards" / Path(home).name).is_file()
