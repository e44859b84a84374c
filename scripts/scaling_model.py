"""The capacity model behind SCALING.md: from one machine to 100,000 workers and 100,000 tasks a second.

    .venv/bin/python scripts/scaling_model.py            # print the tables
    .venv/bin/python scripts/scaling_model.py --write    # and put them into SCALING.md (between its markers)

Driven by the measured costs in scripts/scaling_costs.toml (per-task CPU of each process, idle
stream and snapshot costs, the broker's per-message and cluster costs, quorum-queue costs). It is
an explicit queueing model of the steady state: each busy process is one asyncio event loop, so
at most one core, and its utilisation is arrival rate times CPU per unit of work (the utilisation
law); each role is scaled out until every process of it is within the planned utilisation, and a
process's mean queueing delay is that of an M/M/1 server at its utilisation. For every step the
model finds which part saturates first if the previous step's deployment is given the new load,
and what the user changes to carry it.
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
import sys
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COSTS = Path(__file__).resolve().parent / "scaling_costs.toml"
DOC = ROOT / "SCALING.md"
START, END = "<!-- scaling:tables:start -->", "<!-- scaling:tables:end -->"
MAX_PROCESSES = 10_000
ROLE_NAMES = {
    "scheduler": "a scheduler partition",
    "dispatcher": "the dispatchers",
    "client": "the clients",
    "broker": "the broker nodes",
    "machine": "the machine's cores",
}


@dataclass(frozen=True)
class Levers:
    """What the user sets (or has built): the settings and designs each step chooses."""

    cluster: bool = False  # three or more broker nodes, quorum queues replicated
    heartbeat_s: float = 2.0  # SLUICEGATE_DISPATCHER_HEARTBEAT_INTERVAL
    keepalive_s: float = 1.0  # SLUICEGATE_DISPATCHER_KEEPALIVE_TIME
    delta_snapshots: bool = False  # dispatchers publish what changed, not every worker (to be built)
    partitioned_workers: bool = False  # each partition owns its workers' slots and sees only their state (to be built)


@dataclass(frozen=True)
class Step:
    name: str
    tasks_per_s: float
    workers: int
    levers: Levers
    cores: int | None = None  # machine size when it differs from the costs file's (the first step)


STEPS = [
    Step("one machine, 2 cores", 500, 20, Levers(), cores=2),
    Step("a broker cluster", 3_000, 300, Levers(cluster=True)),
    Step("partitioned schedulers", 10_000, 2_000, Levers(cluster=True, delta_snapshots=True)),
    Step("partitioned workers", 30_000, 10_000, Levers(cluster=True, delta_snapshots=True, partitioned_workers=True)),
    Step(
        "100,000 workers",
        100_000,
        100_000,
        Levers(cluster=True, heartbeat_s=10.0, keepalive_s=10.0, delta_snapshots=True, partitioned_workers=True),
    ),
]


@dataclass
class Deployment:
    """How many of each process a step runs (schedulers: P active partitions, each with a standby)."""

    partitions: int
    dispatchers: int
    clients: int
    broker_nodes: int


@dataclass
class Load:
    """The model's view of one step under one deployment: utilisation of each role and what drives it."""

    scheduler: float  # of one core, per active partition
    dispatcher: float  # of one core, per dispatcher
    client: float  # of one core, per client process
    broker: float  # of a node's cores, per node
    terms: dict[str, dict[str, float]] = field(default_factory=dict)  # cores by cause, per role


def load_costs(path: Path = COSTS) -> dict[str, Any]:
    with path.open("rb") as fh:
        return tomllib.load(fh)


class Model:
    def __init__(self, costs: dict[str, Any]) -> None:
        self.c = costs
        self.target = float(costs["machines"]["target_utilisation"])

    def cores(self, step: Step) -> int:
        return step.cores or int(self.c["machines"]["cores"])

    # Demand, in cores, by role and cause.

    def view_updates(self, step: Step, partitions: int) -> float:
        """Worker-state entries one scheduler applies per second."""
        snap = self.c["snapshots"]
        n, lam = step.workers, step.tasks_per_s
        if step.levers.delta_snapshots:  # a task changes its worker twice; plus each worker's periodic refresh
            updates = 2 * lam + n / float(snap["heartbeat_s"])
        else:  # every worker, every state interval, while anything changes
            updates = n * float(snap["full_hz"])
        return updates / partitions if step.levers.partitioned_workers else updates

    def scheduler_terms(self, step: Step, partitions: int) -> dict[str, float]:
        us = self.c["cpu_us_per_task"]["scheduler"]
        view_us = self.c["snapshots"]["scheduler_us_per_worker"]
        return {
            "tasks": step.tasks_per_s / partitions * us / 1e6,
            "worker view": self.view_updates(step, partitions) * view_us / 1e6,
        }

    def idle_core_per_stream(self, levers: Levers) -> float:
        s = self.c["streams"]
        rate = 1 / levers.heartbeat_s + 1 / levers.keepalive_s
        measured = 1 / float(s["measured_heartbeat_s"]) + 1 / float(s["measured_keepalive_s"])
        return float(s["idle_core_per_1000"]) / 1000 * rate / measured

    def dispatcher_terms(self, step: Step, dispatchers: int) -> dict[str, float]:
        snap = self.c["snapshots"]
        n, lam = step.workers, step.tasks_per_s
        if step.levers.delta_snapshots:
            entries = 2 * lam + n / float(snap["heartbeat_s"])
        else:
            entries = n * float(snap["full_hz"])
        return {
            "tasks": lam / dispatchers * self.c["cpu_us_per_task"]["dispatcher"] / 1e6,
            "idle streams": n / dispatchers * self.idle_core_per_stream(step.levers),
            "snapshots": entries / dispatchers * float(snap["dispatcher_us_per_worker"]) / 1e6,
        }

    def queues(self, d: Deployment) -> int:
        """Quorum queues: tasks and requeue per partition, one inbox per dispatcher, results per client, dead."""
        return 2 * d.partitions + d.dispatchers + d.clients + 1

    def broker_terms(self, step: Step, d: Deployment) -> dict[str, float]:
        b = self.c["broker"]
        factor = float(b["cluster_cpu_factor"]) if step.levers.cluster else 1.0
        replicas = min(int(b["replicas"]), d.broker_nodes)
        # A snapshot is published once and delivered to every scheduler that binds state.* (every
        # partition and its standby), or only to its own partition's two when workers are partitioned.
        subscribers = 2 if step.levers.partitioned_workers else 2 * d.partitions
        snapshots_per_s = d.dispatchers * float(self.c["snapshots"]["full_hz"])
        return {
            "tasks": step.tasks_per_s * self.c["cpu_us_per_task"]["broker"] * factor / 1e6,
            "snapshots": snapshots_per_s * float(b["us_per_message"]) * (1 + subscribers) / 2 / 1e6,
            "idle queues": self.queues(d) * replicas * float(b["idle_core_per_1000_queues"]) / 1000,
        }

    def load(self, step: Step, d: Deployment) -> Load:
        sched = self.scheduler_terms(step, d.partitions)
        disp = self.dispatcher_terms(step, d.dispatchers)
        client = step.tasks_per_s * self.c["cpu_us_per_task"]["client"] / 1e6
        broker = self.broker_terms(step, d)
        node_cores = self.cores(step)
        return Load(
            scheduler=sum(sched.values()),
            dispatcher=sum(disp.values()),
            client=client / d.clients,
            broker=sum(broker.values()) / d.broker_nodes / node_cores,
            terms={"scheduler": sched, "dispatcher": disp, "broker": broker},
        )

    # Sizing.

    def size(self, step: Step) -> Deployment | None:
        """The smallest deployment whose every process is within the target; None if none is."""
        target = self.target
        partitions = next(
            (p for p in range(1, MAX_PROCESSES) if sum(self.scheduler_terms(step, p).values()) <= target), None
        )
        if partitions is None:
            return None
        total_dispatcher = sum(self.dispatcher_terms(step, 1).values())
        dispatchers = max(2 if step.levers.cluster else 1, math.ceil(total_dispatcher / target))
        clients = max(1, math.ceil(step.tasks_per_s * self.c["cpu_us_per_task"]["client"] / 1e6 / target))
        d = Deployment(partitions, dispatchers, clients, 1)
        if step.levers.cluster:
            nodes = 3
            while self.load(step, replace(d, broker_nodes=nodes)).broker > target:
                nodes += 2  # odd, so that a majority is always well defined
            d.broker_nodes = nodes
        return d

    def utilisation(self, step: Step, d: Deployment) -> dict[str, float]:
        load = self.load(step, d)
        return {
            "scheduler": load.scheduler,
            "dispatcher": load.dispatcher,
            "client": load.client,
            "broker": load.broker,
        }

    def saturation(self, step: Step, d: Deployment) -> dict[str, float]:
        """Each part's share of what it has (1.0 = saturated): a core per process, a node's cores, the one machine."""
        use = self.utilisation(step, d)
        if not step.levers.cluster:  # everything shares one machine: its cores are the limit too
            load = self.load(step, d)
            ours = sum(load.terms["scheduler"].values()) + sum(load.terms["dispatcher"].values())
            client = step.tasks_per_s * self.c["cpu_us_per_task"]["client"] / 1e6
            workers = step.tasks_per_s * self.c["cpu_us_per_task"]["worker"] / 1e6
            broker = sum(load.terms["broker"].values())
            use["machine"] = (ours + client + workers + broker) / self.cores(step)
        return use

    def first_to_saturate(self, step: Step, d: Deployment) -> tuple[str, float]:
        """Grow this step's load (tasks/s and workers together) on its deployment: what saturates first, and where."""
        low, high = 1.0, 1000.0
        for _ in range(60):  # bisection on the growth factor at which the first part reaches 100 %
            mid = (low + high) / 2
            grown = replace(step, tasks_per_s=step.tasks_per_s * mid, workers=round(step.workers * mid))
            if max(self.saturation(grown, d).values()) >= 1.0:
                high = mid
            else:
                low = mid
        grown = replace(step, tasks_per_s=step.tasks_per_s * high, workers=round(step.workers * high))
        role = max(self.saturation(grown, d).items(), key=lambda kv: kv[1])[0]
        return role, step.tasks_per_s * high

    def processes(self, step: Step, d: Deployment) -> int:
        return 2 * d.partitions + d.dispatchers + d.clients + d.broker_nodes

    def machines(self, step: Step, d: Deployment) -> int:
        """Machines for our processes (one core per busy process, standbys idle) plus one per broker node."""
        if not step.levers.cluster:
            return 1
        busy = d.partitions + d.dispatchers + d.clients
        return math.ceil(busy / self.cores(step)) + d.broker_nodes

    def wait_ms(self, utilisation: float, service_us: float) -> float:
        """Mean queueing delay of an M/M/1 server at this utilisation, per unit of work."""
        return service_us * utilisation / (1 - utilisation) / 1000 if utilisation < 1 else math.inf


def changes(before: Step | None, d_before: Deployment | None, step: Step, d: Deployment) -> list[str]:
    if before is None or d_before is None:
        return ["one scheduler (and a standby), one dispatcher, one broker node, all on the one machine"]
    out = []
    old = before.levers if before else Levers()
    lv = step.levers
    if lv.cluster and not old.cluster:
        out.append(f"a {d.broker_nodes}-node broker cluster, every process given every node's address")
    elif d.broker_nodes != d_before.broker_nodes:
        out.append(f"broker nodes {d_before.broker_nodes} -> {d.broker_nodes}")
    if d.partitions != d_before.partitions:
        out.append(f"scheduler partitions {d_before.partitions} -> {d.partitions}")
    if d.dispatchers != d_before.dispatchers:
        out.append(f"dispatchers {d_before.dispatchers} -> {d.dispatchers}")
    if lv.delta_snapshots and not old.delta_snapshots:
        out.append("incremental worker-state snapshots (to build)")
    if lv.partitioned_workers and not old.partitioned_workers:
        out.append("workers split between partitions, snapshots routed to their partition (to build)")
    if (lv.heartbeat_s, lv.keepalive_s) != (old.heartbeat_s, old.keepalive_s):
        out.append(
            f"worker heartbeat {old.heartbeat_s:g} s -> {lv.heartbeat_s:g} s,"
            f" keepalive {old.keepalive_s:g} s -> {lv.keepalive_s:g} s"
        )
    return out


def tables(model: Model, steps: list[Step] = STEPS) -> str:
    rows, detail = [], []
    previous: tuple[Step, Deployment] | None = None
    for i, step in enumerate(steps, 1):
        d = model.size(step)
        if d is None:
            raise SystemExit(f"step {step.name!r}: no number of processes carries it with these levers")
        role, at = model.first_to_saturate(step, d)
        first = f"{ROLE_NAMES[role]}, at {at:,.0f} tasks/s"
        change = "; ".join(changes(previous[0] if previous else None, previous[1] if previous else None, step, d))
        use = model.utilisation(step, d)
        rows.append(
            f"| {i}. {step.name} | {step.tasks_per_s:,.0f} | {step.workers:,} | {change or '-'} | {first} "
            f"| {d.partitions} + {d.partitions} | {d.dispatchers} | {d.clients} | {d.broker_nodes} "
            f"| {model.processes(step, d):,} | {model.machines(step, d):,} |"
        )
        load = model.load(step, d)
        s_us = model.c["cpu_us_per_task"]
        wait = model.wait_ms(use["scheduler"], s_us["scheduler"]) + model.wait_ms(use["dispatcher"], s_us["dispatcher"])
        mem_mb = model.queues(d) * min(3, d.broker_nodes) * model.c["broker"]["queue_kb"] / d.broker_nodes / 1024
        streams_mib = step.workers / d.dispatchers * model.c["streams"]["kib_per_stream"] / 1024
        detail.append(
            f"| {i} | {use['scheduler']:.0%} ({_terms(load.terms['scheduler'])}) "
            f"| {use['dispatcher']:.0%} ({_terms(load.terms['dispatcher'])}) "
            f"| {use['broker']:.0%} of {model.cores(step)} cores ({_terms(load.terms['broker'])}) "
            f"| {step.workers / d.dispatchers:,.0f} ({streams_mib:,.0f} MiB) "
            f"| {model.queues(d)} ({mem_mb:,.1f} MB/node) "
            f"| {wait:.2f} |"
        )
        previous = (step, d)
    head = (
        "| step | tasks/s | workers | what the user changes to carry it "
        "| then saturates first (load and fleet grown together) | schedulers (active + standby) "
        "| dispatchers | clients | broker nodes | processes (not workers) | machines |\n"
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|\n"
    )
    head2 = (
        "| step | scheduler partition (cores by cause) | dispatcher | broker node | streams per dispatcher "
        "| quorum queues (memory) | queueing ms (M/M/1) |\n|---|---|---|---|---:|---:|---:|\n"
    )
    return (
        head + "\n".join(rows) + "\n\nUtilisation of each process at that step:\n\n" + head2 + "\n".join(detail) + "\n"
    )


LEVER_NAMES = {
    "cluster": "a broker cluster",
    "delta_snapshots": "incremental snapshots",
    "partitioned_workers": "partitioned workers",
    "heartbeat_s": "longer heartbeats and keepalives",
}


def why(model: Model, steps: list[Step] = STEPS) -> str:
    """For every lever a step turns on, what that step would need without it."""
    rows = []
    for i, (before, step) in enumerate(itertools.pairwise(steps), 2):
        d = model.size(step)
        assert d is not None
        for lever, name in LEVER_NAMES.items():
            old, new = getattr(before.levers, lever), getattr(step.levers, lever)
            if old == new:
                continue
            undone = replace(step.levers, **{lever: old})
            if lever == "heartbeat_s":
                undone = replace(undone, keepalive_s=before.levers.keepalive_s)
            without = replace(step, levers=undone)
            other = model.size(without)
            if lever == "cluster":
                one = replace(without, levers=undone)
                use = model.utilisation(one, replace(d, broker_nodes=1))["broker"]
                result = (
                    f"one node would carry it ({use:.0%} of its {model.cores(step)} cores), but while it is down"
                    " nothing flows, and a disk lost with it loses its tasks: the cluster is for availability"
                )
            elif other is None:
                floor = (
                    model.scheduler_terms(without, MAX_PROCESSES)["worker view"]
                    if not undone.partitioned_workers
                    else 0
                )
                floor = max(
                    floor, model.scheduler_terms(without, 1)["worker view"] if not undone.partitioned_workers else 0
                )
                result = (
                    f"no number of partitions carries it: every scheduler applies every worker's state, "
                    f"{floor:.2f} cores of work for a one-core process"
                )
            else:
                result = (
                    f"{model.processes(without, other):,} processes on {model.machines(without, other):,} machines"
                    f" instead of {model.processes(step, d):,} on {model.machines(step, d):,}"
                    f" (dispatchers {other.dispatchers} instead of {d.dispatchers})"
                )
            rows.append(f"| {i}. {step.name} | {name} | {result} |")
    return "| step | without | it would take |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def sensitivity(costs: dict[str, Any], step: Step = STEPS[-1]) -> str:
    """The last step under other per-task costs: what batching and the optimisations still to come are worth."""
    per_task = ("scheduler", "dispatcher", "worker", "client", "broker")
    factor = float(costs["batching"]["unbatched_factor"])
    cases = [
        ("as measured (full batches)", 1.0),
        (f"one task per AMQP message (x{factor:g}, as the open-loop benchmark measured)", factor),
        ("per-task CPU halved (the benchmark's next steps)", 0.5),
    ]
    rows = []
    for name, scale in cases:
        varied = {**costs, "cpu_us_per_task": {**costs["cpu_us_per_task"]}}
        for key in per_task:
            varied["cpu_us_per_task"][key] = costs["cpu_us_per_task"][key] * scale
        model = Model(varied)
        d = model.size(step)
        if d is None:
            rows.append(f"| {name} | - | - | - | - | no deployment carries it |")
            continue
        rows.append(
            f"| {name} | {d.partitions} + {d.partitions} | {d.dispatchers} | {d.clients} | {d.broker_nodes} "
            f"| {model.processes(step, d):,} processes, {model.machines(step, d):,} machines |"
        )
    head = (
        "| per-task CPU | schedulers | dispatchers | clients | broker nodes | in all |\n|---|---:|---:|---:|---:|---|\n"
    )
    return head + "\n".join(rows) + "\n"


def _terms(terms: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in terms.items() if v >= 0.005) or "-"


def inputs(c: dict[str, Any]) -> str:
    """The costs the tables are computed from, as the costs file gives them."""
    t, st, sn, b = c["cpu_us_per_task"], c["streams"], c["snapshots"], c["broker"]
    rows = [
        (
            "CPU per task: scheduler / dispatcher / worker SDK / client / broker",
            " / ".join(f"{t[k]:g}" for k in ("scheduler", "dispatcher", "worker", "client", "broker")) + " µs",
            f"{t['source']}, closed loop, full batches",
        ),
        ("the same, one task per AMQP message", f"x {c['batching']['unbatched_factor']:g}", "BENCHMARKS.md, open loop"),
        (
            "an idle worker stream",
            f"{st['idle_core_per_1000']:.0%} of a core per 1,000 (heartbeat {st['measured_heartbeat_s']:g} s,"
            f" keepalive {st['measured_keepalive_s']:g} s), {st['kib_per_stream']:g} KiB",
            "BENCHMARKS.md",
        ),
        (
            "one worker in a worker-state snapshot",
            f"{sn['dispatcher_us_per_worker']:g} µs to build, {sn['scheduler_us_per_worker']:g} µs to apply;"
            f" {sn['full_hz']:g} full snapshots a second under load",
            "`measure_scaling_costs.py snapshots`",
        ),
        ("one broker message, published and consumed", f"{b['us_per_message']:g} µs", "FACTS.md"),
        (
            "a 3-node cluster's CPU against one node's, same messages",
            f"x {b['cluster_cpu_factor']:g}",
            "`measure_scaling_costs.py broker` (three nodes on one 2-core machine: an upper bound)",
        ),
        (
            "a quorum queue",
            f"{b['queue_kb']:g} kB per member, {b['idle_core_per_1000_queues']:.0%} of a core idle per 1,000,"
            f" {b['replicas']} members",
            "FACTS.md; RabbitMQ 3.10's default group size",
        ),
    ]
    return "| cost | value | from |\n|---|---|---|\n" + "\n".join(f"| {a} | {v} | {w} |" for a, v, w in rows) + "\n"


def render(costs: dict[str, Any] | None = None) -> str:
    model = Model(costs or load_costs())
    src = model.c["cpu_us_per_task"]
    return (
        f"{START}\n"
        f"Generated by `python scripts/scaling_model.py` from scripts/scaling_costs.toml (per-task CPU: "
        f"{src['source']}; {model.cores(STEPS[-1])}-core machines planned to {model.target:.0%}).\n\n"
        + inputs(model.c)
        + "\n"
        + tables(model)
        + "\nWhat each lever is worth: the same step without it.\n\n"
        + why(model)
        + f"\nStep {len(STEPS)} ({STEPS[-1].tasks_per_s:,.0f} tasks/s, {STEPS[-1].workers:,} workers)"
        " under other per-task costs:\n\n" + sensitivity(model.c) + END
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="replace the tables in SCALING.md")
    args = parser.parse_args()
    block = render()
    print(block)
    if args.write:
        text = DOC.read_text(encoding="utf-8")
        if START not in text:
            raise SystemExit(f"{DOC.name} has no {START} marker")
        DOC.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S))
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
