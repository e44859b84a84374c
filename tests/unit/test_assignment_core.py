"""Unit tests of the scheduler's view of workers: WorkerPool (snapshots, picking, keys in flight)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import replace

import pytest

from sluicegate_scheduler.assignment import WorkerPool, WorkerReport, WorkerView

pytestmark = pytest.mark.timeout(5)


def report(
    worker_id: str,
    *,
    session_id: str | None = None,
    tenant: str = "acme",
    actions: Iterable[str] = ("resize",),
    labels: dict[str, str] | None = None,
    slots: int = 4,
    free: int | None = None,
    ready: bool = True,
    received: int = 0,
) -> WorkerReport:
    return WorkerReport(
        worker_id=worker_id,
        session_id=session_id or f"s-{worker_id}",
        tenant=tenant,
        actions=tuple(actions),
        labels=labels or {},
        slots=slots,
        free_slots=slots if free is None else free,
        ready=ready,
        received=received,
    )


def pool_of(*reports: WorkerReport, dispatcher: str = "d1", seq: int = 1, draining: bool = False) -> WorkerPool:
    pool = WorkerPool()
    assert pool.update(dispatcher, seq, draining, list(reports), 0.0)
    return pool


def view(pool: WorkerPool, worker_id: str) -> WorkerView:
    return next(w for w in pool if w.worker_id == worker_id)


def picked_id(
    pool: WorkerPool,
    tenant: str = "acme",
    action: str = "resize",
    labels: dict[str, str] | None = None,
    avoid: frozenset[str] = frozenset(),
) -> str | None:
    w = pool.pick(tenant, action, labels or {}, avoid)
    return None if w is None else w.worker_id


# Eligibility.


def test_pick_respects_the_tenant() -> None:
    pool = pool_of(report("a", tenant="acme"), report("b", tenant="globex"))
    assert picked_id(pool, tenant="globex") == "b"
    assert picked_id(pool, tenant="acme") == "a"
    assert picked_id(pool, tenant="initech") is None


def test_pick_respects_the_action() -> None:
    pool = pool_of(report("a", actions=["resize"]), report("b", actions=["encode", "probe"]))
    assert picked_id(pool, action="encode") == "b"
    assert picked_id(pool, action="probe") == "b"
    assert picked_id(pool, action="resize") == "a"
    assert picked_id(pool, action="delete") is None


def test_pick_requires_every_label_of_the_task() -> None:
    pool = pool_of(
        report("cpu", labels={"region": "eu"}),
        report("gpu", labels={"region": "eu", "gpu": "a100"}),
    )
    assert picked_id(pool, labels={"gpu": "a100"}) == "gpu"
    assert picked_id(pool, labels={"gpu": "a100", "region": "eu"}) == "gpu"
    assert picked_id(pool, labels={"gpu": "h100"}) is None
    assert picked_id(pool, labels={"region": "us"}) is None
    # A task without labels may run on any worker, whatever labels it carries.
    assert picked_id(pool, labels={}) in {"cpu", "gpu"}


def test_pick_skips_workers_without_free_slots_or_not_ready() -> None:
    pool = pool_of(report("full", free=0), report("down", ready=False), report("ok", free=1))
    assert picked_id(pool) == "ok"
    pool.assigned(view(pool, "ok"))
    assert picked_id(pool) is None


def test_draining_dispatcher_offers_no_worker() -> None:
    pool = pool_of(report("a"), draining=True)
    assert view(pool, "a").ready is False
    assert view(pool, "a").free == 0
    assert picked_id(pool) is None


def test_empty_pool_picks_nobody() -> None:
    assert WorkerPool().pick("acme", "resize", {}) is None


# Spreading load.


def test_picks_spread_evenly_over_equal_workers_and_never_exceed_slots() -> None:
    pool = pool_of(*(report(f"w{i}", slots=25) for i in range(4)))
    counts: Counter[str] = Counter()
    for _ in range(100):
        w = pool.pick("acme", "resize", {})
        assert w is not None
        pool.assigned(w)
        counts[w.worker_id] += 1
        assert counts[w.worker_id] <= w.slots
    assert counts == {"w0": 25, "w1": 25, "w2": 25, "w3": 25}
    assert pool.pick("acme", "resize", {}) is None  # every slot is taken


def test_partial_load_is_spread_evenly() -> None:
    pool = pool_of(*(report(f"w{i}", slots=30) for i in range(4)))
    counts: Counter[str] = Counter()
    for _ in range(50):
        w = pool.pick("acme", "resize", {})
        assert w is not None
        pool.assigned(w)
        counts[w.worker_id] += 1
    assert max(counts.values()) - min(counts.values()) <= 1
    assert sum(counts.values()) == 50


def test_picks_follow_the_share_of_free_slots() -> None:
    pool = pool_of(report("small", slots=10), report("large", slots=30))
    counts: Counter[str] = Counter()
    for _ in range(20):
        w = pool.pick("acme", "resize", {})
        assert w is not None
        pool.assigned(w)
        counts[w.worker_id] += 1
    # Equal shares of free slots: three times as many tasks go to the worker with three times the slots.
    assert counts["large"] == 15
    assert counts["small"] == 5


def test_a_busier_worker_gets_less() -> None:
    pool = pool_of(report("busy", slots=4, free=1), report("idle", slots=4, free=4))
    assert picked_id(pool) == "idle"


def test_ties_spread_across_workers_across_the_pool() -> None:
    # Workers on different dispatchers are spread as well.
    pool = WorkerPool()
    pool.update("d1", 1, False, [report("a", slots=2)], 0.0)
    pool.update("d2", 1, False, [report("b", slots=2)], 0.0)
    got = []
    for _ in range(4):
        w = pool.pick("acme", "resize", {})
        assert w is not None
        pool.assigned(w)
        got.append(w.worker_id)
    assert Counter(got) == {"a": 2, "b": 2}
    assert {view(pool, "a").dispatcher_id, view(pool, "b").dispatcher_id} == {"d1", "d2"}


def test_ties_go_round_robin_under_light_load() -> None:
    reports = [report(f"w{i}", slots=4) for i in range(4)]
    pool = pool_of(*reports, seq=1)
    got = []
    for n in range(8):
        w = pool.pick("acme", "resize", {})
        assert w is not None
        pool.assigned(w)
        got.append(w.worker_id)
        # The task ran and finished before the next one arrived: the dispatcher reports every
        # worker idle again, and that the assignment was consumed.
        received = Counter(got)
        pool.update("d1", n + 2, False, [report(f"w{i}", slots=4, received=received[f"w{i}"]) for i in range(4)], 0.0)
    assert set(got) == {"w0", "w1", "w2", "w3"}, f"all tasks went to {Counter(got)}"


# Avoid.


def test_pick_prefers_a_worker_not_avoided() -> None:
    pool = pool_of(report("bad", slots=10), report("good", slots=1))
    for _ in range(3):
        assert picked_id(pool, avoid=frozenset({"bad"})) == "good"


def test_pick_falls_back_to_an_avoided_worker_when_it_is_the_only_one() -> None:
    pool = pool_of(report("bad"))
    assert picked_id(pool, avoid=frozenset({"bad"})) == "bad"


def test_pick_falls_back_to_an_avoided_worker_when_the_others_are_full() -> None:
    pool = pool_of(report("bad"), report("full", free=0))
    assert picked_id(pool, avoid=frozenset({"bad"})) == "bad"


def test_avoided_fallback_must_still_be_eligible() -> None:
    pool = pool_of(report("bad", free=0), report("other", tenant="globex"))
    assert picked_id(pool, avoid=frozenset({"bad"})) is None


# Free accounting.


def test_free_subtracts_assignments_in_transit() -> None:
    pool = pool_of(report("a", slots=4))
    w = view(pool, "a")
    assert w.free == 4
    assert w.in_transit == 0
    pool.assigned(w)
    pool.assigned(w)
    assert w.sent == 2
    assert w.in_transit == 2
    assert w.free == 2


def test_reported_received_ends_the_transit() -> None:
    pool = pool_of(report("a", slots=4), seq=1)
    w = view(pool, "a")
    for _ in range(3):
        pool.assigned(w)
    # The dispatcher consumed two of the three: they now count in its own free_slots.
    assert pool.update("d1", 2, False, [report("a", slots=4, free=2, received=2)], 1.0)
    w = view(pool, "a")
    assert w.sent == 3  # carried over to the fresh view
    assert w.in_transit == 1
    assert w.free == 1


def test_in_transit_is_never_negative() -> None:
    # A scheduler that took over sent nothing, yet the dispatcher reports many received.
    pool = pool_of(report("a", slots=4, free=3, received=50))
    w = view(pool, "a")
    assert w.in_transit == 0
    assert w.free == 3


def test_free_is_never_negative() -> None:
    pool = pool_of(report("a", slots=2, free=1))
    w = view(pool, "a")
    for _ in range(5):
        pool.assigned(w)
    assert w.free == 0


def test_not_ready_worker_has_no_free_slot() -> None:
    pool = pool_of(report("a", slots=4, ready=False))
    assert view(pool, "a").free == 0


def test_sent_is_not_carried_to_a_new_session_of_the_same_worker() -> None:
    pool = pool_of(report("a", session_id="s1", slots=4), seq=1)
    pool.assigned(view(pool, "a"))
    pool.update("d1", 2, False, [report("a", session_id="s2", slots=4)], 1.0)
    w = view(pool, "a")
    assert w.session_id == "s2"
    assert w.sent == 0
    assert w.free == 4


# Snapshots.


def test_snapshot_replaces_the_dispatchers_workers() -> None:
    pool = pool_of(report("a"), report("b"), seq=1)
    assert len(pool) == 2
    assert pool.update("d1", 2, False, [report("c")], 1.0)
    assert len(pool) == 1
    assert [w.worker_id for w in pool] == ["c"]


def test_snapshots_of_other_dispatchers_are_independent() -> None:
    pool = WorkerPool()
    pool.update("d1", 5, False, [report("a")], 0.0)
    pool.update("d2", 1, False, [report("b")], 0.0)
    assert len(pool) == 2
    assert view(pool, "a").dispatcher_id == "d1"
    assert view(pool, "b").dispatcher_id == "d2"


@pytest.mark.parametrize("seq", [1, 2])
def test_stale_snapshot_is_ignored(seq: int) -> None:
    pool = WorkerPool()
    assert pool.update("d1", 2, False, [report("a", free=4)], 0.0)
    assert pool.update("d1", seq, False, [report("a", free=0), report("b")], 1.0) is False
    assert [w.worker_id for w in pool] == ["a"]
    assert view(pool, "a").free == 4


def test_draining_snapshot_makes_workers_unready() -> None:
    pool = pool_of(report("a"), seq=1)
    assert pool.update("d1", 2, True, [report("a")], 1.0)
    assert view(pool, "a").ready is False
    assert picked_id(pool) is None


def test_forget_silent_drops_dispatchers_not_heard_from() -> None:
    pool = WorkerPool()
    pool.update("old", 1, False, [report("a")], 0.0)
    pool.update("new", 1, False, [report("b")], 4.0)
    assert pool.forget_silent(5.0, 5.0) == []  # exactly stale_after is not silent yet
    assert pool.forget_silent(6.0, 5.0) == ["old"]
    assert [w.worker_id for w in pool] == ["b"]
    assert pool.forget_silent(6.0, 5.0) == []
    assert pool.forget_silent(100.0, 5.0) == ["new"]
    assert len(pool) == 0


def test_even_a_stale_snapshot_counts_as_a_sign_of_life() -> None:
    pool = WorkerPool()
    pool.update("d1", 3, False, [report("a")], 0.0)
    assert pool.update("d1", 2, False, [], 4.0) is False
    assert pool.forget_silent(6.0, 5.0) == []


def test_forget() -> None:
    pool = pool_of(report("a"))
    pool.forget("d1")
    pool.forget("never-seen")
    assert len(pool) == 0
    assert picked_id(pool) is None


def test_an_idle_slot_beats_room_that_only_queues_behind_busy_slots_even_when_preferred() -> None:
    # "gpu" has every slot busy and room only in its queue at the dispatcher; "cpu" idles.
    queued_only = WorkerReport("gpu", "s-gpu", "acme", ("resize",), {"gpu": "a100"}, 4, 2, True, 0, prefetch=2)
    pool = pool_of(queued_only, report("cpu", slots=4))
    w = pool.pick("acme", "resize", {}, preferred=[("gpu", "a100", 5)])
    assert w is not None
    assert w.worker_id == "cpu"
    # With no idle slot anywhere, the queue room still takes it, preferred first.
    busy = report("cpu", slots=4, free=0)
    pool = pool_of(queued_only, busy)
    w = pool.pick("acme", "resize", {}, preferred=[("gpu", "a100", 5)])
    assert w is not None
    assert w.worker_id == "gpu"


def test_a_worker_cooling_only_for_its_host_goes_before_the_one_that_stalled() -> None:
    # Without credentials the principal is the host: one stalled worker cools its neighbours too,
    # but when all cool, the one that did not stall itself takes the task.
    deaf = WorkerReport("deaf", "s-deaf", "acme", ("resize",), {}, 4, 4, True, 0, principal="10.0.0.1")
    good = WorkerReport("good", "s-good", "acme", ("resize",), {}, 4, 4, True, 0, principal="10.0.0.1", acknowledged=3)
    pool = pool_of(deaf, good)
    pool.cool_down("deaf", 0.0, base=5.0)
    picks = {picked(pool) for _ in range(6)}
    assert picks == {"good"}
    # The same on probation (no session of the host acknowledged anything yet): still "good" first.
    pool = pool_of(deaf, replace(good, acknowledged=0))
    pool.cool_down("deaf", 0.0, base=5.0)
    assert {picked(pool) for _ in range(6)} == {"good"}


def picked(pool: WorkerPool) -> str | None:
    w = pool.pick("acme", "resize", {}, now=1.0)
    return None if w is None else w.worker_id


# Probation: a principal none of whose sessions has acknowledged a task yet.


def session(worker_id: str, principal: str, *, slots: int = 4, acknowledged: int = 0, leases: int = 0) -> WorkerReport:
    return WorkerReport(
        worker_id, f"s-{worker_id}", "acme", ("resize",), {}, slots, slots - leases, True, leases,
        principal=principal, leases=leases, acknowledged=acknowledged,
    )  # fmt: skip


def assign_all(pool: WorkerPool, now: float = 1.0, most: int = 100) -> list[str]:
    """Pick and assign until nothing more is placed; the worker ids, in order."""
    placed: list[str] = []
    while len(placed) < most and (w := pool.pick("acme", "resize", {}, now=now)) is not None:
        pool.assigned(w)
        placed.append(w.worker_id)
    return placed


def test_an_unproven_principal_holds_one_task_at_a_time_across_all_its_sessions() -> None:
    mallory = [session(f"m{i}", "mallory", slots=8) for i in range(30)]
    pool = pool_of(*mallory, session("honest", "alice", slots=8, acknowledged=1))
    placed = assign_all(pool)
    assert placed.count("honest") == 8
    assert len([w for w in placed if w.startswith("m")]) == 1, placed
    # The dispatcher reports what it holds: still one, still on probation.
    held = next(w for w in placed if w.startswith("m"))
    reports = [replace(r, free_slots=7, received=1, leases=1) if r.worker_id == held else r for r in mallory]
    assert pool.update("d1", 2, False, [*reports, session("honest", "alice", slots=8, acknowledged=1, leases=8)], 1.0)
    assert assign_all(pool) == []


def test_one_acknowledgement_by_any_session_ends_the_probation_of_the_principal() -> None:
    workers = [session(f"w{i}", "10.0.0.7") for i in range(3)]
    pool = pool_of(*workers)
    assert len(assign_all(pool)) == 1, "a fleet that has acknowledged nothing yet starts one task at a time"
    workers[0] = replace(workers[0], acknowledged=1, received=1, leases=1, free_slots=3)
    assert pool.update("d1", 2, False, workers, 1.0)
    assert len(assign_all(pool)) == 3 + 4 + 4
    # Proven for good: a new session of the principal has every slot at once.
    assert pool.update("d1", 3, False, [session("w9", "10.0.0.7")], 1.0)
    assert len(assign_all(pool)) == 4


def test_an_unproven_principal_that_stalled_gets_no_task_while_anyone_else_serves_the_lane() -> None:
    mallory = [session(f"m{i}", "mallory") for i in range(3)]
    pool = pool_of(*mallory, session("honest", "alice", slots=2, acknowledged=5))
    pool.cool_down("m0", 0.0, base=5.0)
    assert assign_all(pool) == ["honest", "honest"], "the full honest worker is waited for"
    # Nobody else serves the lane: the stalled principal gets its one task, from a session that did not stall.
    pool = pool_of(*mallory)
    pool.cool_down("m0", 0.0, base=5.0)
    assert assign_all(pool) in (["m1"], ["m2"])
    # Once its cooldown is over it is on probation as before: one at a time.
    pool = pool_of(*mallory, session("honest", "alice", slots=2, acknowledged=5))
    pool.cool_down("m0", 0.0, base=5.0)
    placed = assign_all(pool, now=6.0)
    assert placed.count("honest") == 2
    assert len([w for w in placed if w.startswith("m")]) == 1, placed


def test_sessions_with_no_principal_reported_are_never_on_probation() -> None:
    pool = pool_of(report("a"), report("b"))
    assert len(assign_all(pool)) == 8
