"""The scaling model (scripts/scaling_model.py): SCALING.md shows its output, and its sizing holds up."""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def model_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scaling_model", ROOT / "scripts" / "scaling_model.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["scaling_model"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def costs(model_module: ModuleType) -> dict[str, Any]:
    return model_module.load_costs()


def test_scaling_md_shows_exactly_what_the_model_computes(model_module: ModuleType) -> None:
    text = (ROOT / "SCALING.md").read_text(encoding="utf-8")
    match = re.search(re.escape(model_module.START) + ".*?" + re.escape(model_module.END), text, flags=re.S)
    assert match, "SCALING.md lost its table markers"
    assert match.group(0) == model_module.render(), "run `python scripts/scaling_model.py --write`"


def test_every_step_is_sized_within_the_planned_utilisation(model_module: ModuleType, costs: dict[str, Any]) -> None:
    model = model_module.Model(costs)
    for step in model_module.STEPS:
        deployment = model.size(step)
        assert deployment is not None, step.name
        use = model.utilisation(step, deployment)
        assert all(u <= model.target + 1e-9 for u in use.values()), (step.name, use)
        # One process fewer of any scaled role would exceed the target: the sizing is the smallest.
        if deployment.dispatchers > 2:
            fewer = replace(deployment, dispatchers=deployment.dispatchers - 1)
            assert model.utilisation(step, fewer)["dispatcher"] > model.target, step.name
        if deployment.partitions > 1:
            fewer = replace(deployment, partitions=deployment.partitions - 1)
            assert model.utilisation(step, fewer)["scheduler"] > model.target, step.name


def test_one_machine_saturates_where_the_per_task_costs_say(model_module: ModuleType, costs: dict[str, Any]) -> None:
    model = model_module.Model(costs)
    step = model_module.STEPS[0]
    deployment = model.size(step)
    assert deployment is not None
    role, at = model.first_to_saturate(step, deployment)
    assert role == "machine"
    per_task_s = sum(_per_task(costs)) / 1e6
    # The worker view and idle streams add a little on top of the per-task CPU, never more than 10 %.
    assert 0.9 * step.cores / per_task_s <= at <= step.cores / per_task_s


def _per_task(costs: dict[str, Any]) -> list[float]:
    return [float(v) for k, v in costs["cpu_us_per_task"].items() if k != "source"]


def test_full_snapshots_cannot_carry_thousands_of_workers(model_module: ModuleType, costs: dict[str, Any]) -> None:
    model = model_module.Model(costs)
    step = model_module.STEPS[2]
    assert step.levers.delta_snapshots
    full = replace(step, levers=replace(step.levers, delta_snapshots=False))
    assert model.size(full) is None, "every scheduler applies every worker: partitions cannot help"
    assert model.size(step) is not None


def test_the_tables_follow_the_costs_file(model_module: ModuleType, costs: dict[str, Any]) -> None:
    dearer = copy.deepcopy(costs)
    dearer["cpu_us_per_task"]["dispatcher"] *= 2
    step = model_module.STEPS[-1]
    base = model_module.Model(costs).size(step)
    more = model_module.Model(dearer).size(step)
    assert base is not None
    assert more is not None
    assert more.dispatchers > base.dispatchers
    assert model_module.render(dearer) != model_module.render(costs)


def test_broker_nodes_are_odd_and_at_least_three_in_a_cluster(model_module: ModuleType, costs: dict[str, Any]) -> None:
    model = model_module.Model(costs)
    for step in model_module.STEPS:
        deployment = model.size(step)
        assert deployment is not None
        if step.levers.cluster:
            assert deployment.broker_nodes >= 3
            assert deployment.broker_nodes % 2 == 1
        else:
            assert deployment.broker_nodes == 1
