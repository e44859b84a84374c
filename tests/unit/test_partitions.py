"""Unit tests of scheduler partitions: routing by tenant, names per partition, shares of free slots, counts per partition."""

from __future__ import annotations

import time

import pytest

from sluicegate import amqp
from sluicegate.errors import InvalidInput
from sluicegate_dispatcher.sessions import Sessions
from sluicegate_dispatcher.settlement import _requeue_destination
from sluicegate_scheduler.app import core_config
from sluicegate_scheduler.assignment import WorkerPool, WorkerReport, received_of
from sluicegate_scheduler.core import Config, Core
from sluicegate_scheduler.settings import SchedulerSettings

pytestmark = pytest.mark.timeout(5)


def test_one_partition_routes_every_tenant_to_partition_0() -> None:
    assert {amqp.partition_of(f"tenant-{i}", 1) for i in range(100)} == {0}


def test_partition_of_is_stable_and_spreads_tenants() -> None:
    assert amqp.partition_of("acme", 4) == amqp.partition_of("acme", 4)
    counts = [0] * 4
    for i in range(4000):
        counts[amqp.partition_of(f"tenant-{i}", 4)] += 1
    assert min(counts) > 800  # roughly even: 1000 each


def test_partition_0_keeps_every_name_of_the_unpartitioned_topology() -> None:
    plain, zero = amqp.Topology("sg"), amqp.Topology("sg", 0)
    for name in ("tasks", "unrouted", "registry", "leader", "due", "lane_prefix", "requeue", "assign", "events"):
        assert getattr(plain, name) == getattr(zero, name)
    assert zero.tasks == "sg.tasks"
    assert zero.requeue == "sg.requeue"
    assert zero.intake("t") == "sg.intake.t"


def test_another_partition_has_its_own_scheduler_names_and_shares_the_rest() -> None:
    one = amqp.Topology("sg").of_partition(1)
    assert one.tasks == "sg.p1.tasks"
    assert one.unrouted == "sg.p1.tasks.unrouted"
    assert one.intake("t") == "sg.p1.intake.t"
    assert (one.registry, one.leader, one.due) == ("sg.p1.scheduler.registry", "sg.p1.scheduler.leader", "sg.p1.due")
    assert one.delay(100) == "sg.p1.delay.100ms"
    assert one.lane_prefix == "sg.p1.lane."
    assert one.requeue == "sg.p1.requeue"
    # What dispatchers, clients and the recorder share keeps the plain prefix.
    assert (one.assign, one.events, one.dead, one.control, one.cancels) == (
        "sg.assign",
        "sg.events",
        "sg.dead",
        "sg.control",
        "sg.cancels",
    )
    assert one.inbox("d1") == "sg.dispatcher.d1"


def test_lanes_of_a_partition_are_named_under_its_own_prefix() -> None:
    core = Core(Config(prefix="sg", partition=1, partitions=2))
    assert core.book.prefix == "sg.p1"
    assert Core(Config(prefix="sg")).book.prefix == "sg"


def test_a_partition_must_be_below_the_count() -> None:
    with pytest.raises(InvalidInput, match="partition 2"):
        core_config(SchedulerSettings(partition=2), "sg", partitions=2)
    assert core_config(SchedulerSettings(partition=1), "sg", partitions=2).partition == 1


def report(free: int, prefetch: int = 0, received: int = 0, slots: int = 8) -> WorkerReport:
    return WorkerReport(
        worker_id="w1",
        session_id="s1",
        tenant="t",
        actions=["a"],
        labels={},
        slots=slots,
        free_slots=free,
        ready=True,
        received=received,
        prefetch=prefetch,
    )


def view(pool: WorkerPool, r: WorkerReport, seq: int = 1) -> tuple[int, int]:
    pool.update("d1", seq, False, [r], 0.0)
    (worker,) = list(pool)
    return worker.free, worker.prefetch


def test_one_partition_sees_all_free_slots() -> None:
    assert view(WorkerPool(), report(free=7, prefetch=3)) == (7, 3)


def report_of(free: int, prefetch: int = 0, session: str = "s1") -> WorkerReport:
    return WorkerReport(
        worker_id="w1", session_id=session, tenant="t", actions=["a"], labels={}, slots=32,
        free_slots=free, ready=True, received=0, prefetch=prefetch,
    )  # fmt: skip


def claims(partitions: int, r: WorkerReport, seq: int, *, eager: bool = False) -> list[tuple[int, int]]:
    return [WorkerPool(partitions, k, eager=eager).claim(r, seq) for k in range(partitions)]


def test_exact_claims_add_up_to_the_report_and_the_leftovers_go_round() -> None:
    for partitions in (2, 3, 4):
        for free in range(20):
            for prefetch in range(free + 1):
                for seq in range(partitions):
                    got = claims(partitions, report_of(free, prefetch), seq)
                    assert sum(f for f, _ in got) == free
                    assert sum(r for _, r in got) == min(prefetch, free)
                    assert all(f - r <= -(-(free - min(prefetch, free)) // partitions) for f, r in got)
    # A single idle slot is one partition's per report, and each partition's in turn.
    owners = [next(k for k, (f, _) in enumerate(claims(2, report_of(1), seq)) if f) for seq in range(4)]
    assert sorted(owners[:2]) == [0, 1]
    assert owners[:2] == owners[2:]


def test_eager_claims_leave_no_idle_slot_unclaimed_and_overshoot_by_at_most_one_per_extra_partition() -> None:
    for partitions in (2, 3, 4):
        for free in range(20):
            for prefetch in range(free + 1):
                for session in ("s1", "s2", "s3"):
                    got = claims(partitions, report_of(free, prefetch, session), 7, eager=True)
                    idle = free - min(prefetch, free)
                    assert all(f - r == -(-idle // partitions) for f, r in got)
                    assert free <= sum(f for f, _ in got) <= free + partitions - 1
    assert claims(2, report_of(1), 0, eager=True) == [(1, 0), (1, 0)]  # both may take the one idle slot


def test_the_pool_applies_its_claim_to_each_report() -> None:
    assert view(WorkerPool(2, 1), report(free=8, prefetch=4)) == (4, 2)
    assert view(WorkerPool(2, 0), report(free=8, prefetch=4)) == (4, 2)
    assert view(WorkerPool(4, 3, eager=True), report(free=8, prefetch=4)) == (2, 1)


def test_a_partition_counts_only_its_own_assignments_in_transit() -> None:
    pool = WorkerPool(2)
    pool.update("d1", 1, False, [report(free=8, received=0)], 0.0)
    (worker,) = list(pool)
    for _ in range(3):
        pool.assigned(worker)
    assert worker.free == 1  # its 4 of 8, less 3 in transit
    # The dispatcher consumed them (with others of the other partition): nothing of ours in transit.
    pool.update("d1", 2, False, [report(free=2, received=3)], 0.0)
    assert worker.free == 1  # 2 // 2


def test_received_per_partition_comes_from_the_split_counts() -> None:
    assert received_of(9, [], 0) == 9
    assert received_of(9, [], 1) == 0
    assert received_of(9, [5, 4], 1) == 4
    assert received_of(9, [5, 4], 0) == 5
    assert received_of(9, [5, 4], 3) == 0


def test_dispatcher_counts_received_per_partition_once_a_partition_other_than_0_assigns() -> None:
    sessions = Sessions()
    session, _ = sessions.register(worker_id="w1", tenant="t", actions=frozenset({"a"}), labels={}, slots=2, now=0.0)
    sessions.count_received("w1", session.session_id)
    sessions.count_received("w1", session.session_id, 0)
    assert session.received == 2
    assert session.received_by_partition == []
    sessions.count_received("w1", session.session_id, 2)
    sessions.count_received("w1", session.session_id, 0)
    assert session.received == 4
    assert session.received_by_partition == [3, 0, 1]


def test_requeues_are_grouped_per_partition_and_partition_0_keeps_the_bare_reason() -> None:
    assert _requeue_destination("no_slot", 0) == "no_slot"
    assert _requeue_destination("no_slot", 3) == "no_slot@p3"
    assert "no_slot@p3".partition("@p") == ("no_slot", "@p", "3")


def test_the_synthetic_cost_is_a_short_duration() -> None:
    assert SchedulerSettings(synthetic_cost="2ms").synthetic_cost.total_seconds() == pytest.approx(0.002)
    assert SchedulerSettings().synthetic_cost.total_seconds() == 0
    with pytest.raises(ValueError, match="between 0 and 1s"):
        SchedulerSettings(synthetic_cost="2s")


def test_a_placement_with_a_synthetic_cost_takes_at_least_that_long() -> None:
    from sluicegate_scheduler.placement import _burn

    for wait in (False, True):
        started = time.perf_counter()
        _burn(0.01, wait=wait)
        assert time.perf_counter() - started >= 0.01


def test_submit_takes_either_spread_or_one_partition_key(capsys: pytest.CaptureFixture[str]) -> None:
    from sluicegate.cli import main

    assert main(["submit", "echo", "--spread", "--partition-key", "k1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sluicegate: --spread and --partition-key exclude each other"]


def test_a_partition_key_too_long_is_refused_before_anything_is_sent() -> None:
    from sluicegate.client import Client, TaskSpec

    client = Client()
    with pytest.raises(InvalidInput, match="partition_key"):
        client._build(TaskSpec("echo", partition_key="k" * 257))
    # The key picks the partition, not the tenant.
    spec = TaskSpec("echo", tenant="acme", partition_key="k1")
    assert amqp.partition_of("acme", 4, "k1") == amqp.partition_of("other", 4, "k1")
    assert client._partition(spec) == 0  # one partition configured: everything is partition 0's


@pytest.mark.parametrize(("partitions", "spent"), [(1, 1), (2, 0)])
def test_a_slot_lost_to_another_partition_spends_no_dispatch_attempt(partitions: int, spent: int) -> None:
    from sluicegate.reasons import Reason
    from sluicegate.v1 import messages_pb2
    from sluicegate_scheduler.outbox import Kind

    core = Core(Config(prefix="t", partitions=partitions, max_dispatch_attempts=1))
    core.pool.update(
        "d1", 1, False,
        [WorkerReport(worker_id="w2", session_id="s2", tenant="t1", actions=["a"], labels={}, slots=2, free_slots=2,
                      ready=True, received=0)],
        0.0,
    )  # fmt: skip
    task = messages_pb2.Task(task_id="task-1", tenant="t1", action="a", reply_to="c1", submitted_at_ms=1)
    turned_away = messages_pb2.Assignment(
        task=task, attempt=1, worker_id="w1", history=[messages_pb2.Requeue(reason=Reason.NO_SLOT.value, attempt=1)]
    )
    core.take_requeued([turned_away], None, amqp.Delivery(object(), 1))
    core.round()
    entries = [e for d in core.outbox.ready(lambda _k, _d: True) for e in core.outbox.take(d)]
    if spent:  # one partition: no free slot is a dispatch failure, and the one attempt is gone
        assert [e.kind for e in entries] == [Kind.DEAD]
    else:
        assert [(e.kind, e.body.dispatch_failures) for e in entries] == [(Kind.ASSIGN, 0)]


def test_status_shows_every_partitions_queues_and_the_shared_ones_once() -> None:
    from sluicegate.status import queue_names

    topology = amqp.Topology("sg")
    one = queue_names(topology, ["sg.intake.a", "sg.lane.a.x"], ["d1"])
    assert one[:5] == [
        ("sg.tasks", "tasks"), ("sg.requeue", "requeue"), ("sg.due", "due"), ("sg.dead", "dead"),
        ("sg.lifecycle", "lifecycle"),
    ]  # fmt: skip
    two = dict(queue_names(topology, ["sg.intake.a", "sg.p1.intake.b", "sg.p1.lane.b.x"], ["d1"], partitions=2))
    assert two["sg.p1.tasks"] == "tasks"
    assert two["sg.p1.requeue"] == "requeue"
    assert two["sg.p1.intake.b"] == "intake"
    assert two["sg.p1.lane.b.x"] == "lane"
    assert two["sg.p1.delay.100ms"] == "delay"
    assert [name for name, kind in queue_names(topology, [], ["d1"], partitions=2) if kind == "dead"] == ["sg.dead"]
    assert len([n for n in two if n.startswith("sg.delay.")]) == len(amqp.DELAY_RUNGS_MS)
