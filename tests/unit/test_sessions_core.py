"""Unit tests of the dispatcher's session and lease bookkeeping (Sessions), driven with explicit clocks."""

from __future__ import annotations

from typing import Any

import pytest

from sluicegate.errors import InvalidInput, NoFreeSlot, NotConnected, UnknownSession
from sluicegate_dispatcher.sessions import Sessions, WorkerSession

pytestmark = pytest.mark.timeout(5)

HB = 6.0  # heartbeat timeout used throughout
GRACE = 0.5  # reconnect grace used throughout


def register(
    sessions: Sessions, worker_id: str = "w1", *, slots: int = 2, now: float = 0.0, **kw: Any
) -> WorkerSession:
    session, _ = sessions.register(
        worker_id=worker_id,
        tenant=kw.get("tenant", "acme"),
        actions=kw.get("actions", frozenset({"resize"})),
        labels=kw.get("labels", {}),
        slots=slots,
        now=now,
    )
    return session


def streaming(sessions: Sessions, worker_id: str = "w1", *, slots: int = 2, now: float = 0.0) -> WorkerSession:
    session = register(sessions, worker_id, slots=slots, now=now)
    sessions.attach(session, object(), now)
    return session


def take(
    sessions: Sessions, session: WorkerSession, task: str, attempt: int = 1, *, now: float = 0.0, ack: float = 5.0
) -> Any:
    return sessions.take(
        session, (task, attempt), payload=f"payload-{task}", token=f"token-{task}", now=now, ack_timeout=ack
    )


# Register and supersede.


def test_register_opens_a_session_without_a_stream() -> None:
    sessions = Sessions()
    session, previous = sessions.register(
        worker_id="w1", tenant="acme", actions=frozenset({"a"}), labels={"gpu": "1"}, slots=3, now=10.0
    )
    assert previous is None
    assert len(sessions) == 1
    assert list(sessions) == [session]
    assert session.worker_id == "w1"
    assert session.session_id
    assert session.slots == 3
    assert session.free_slots == 3
    assert session.last_seen == 10.0
    assert not session.streaming
    assert not session.ready
    assert session.stream_lost_at == 10.0
    assert sessions.session("w1", session.session_id) is session


def test_register_without_worker_id_makes_one_up() -> None:
    sessions = Sessions()
    a = register(sessions, "")
    b = register(sessions, "")
    assert a.worker_id
    assert b.worker_id
    assert a.worker_id != b.worker_id
    assert len(sessions) == 2


@pytest.mark.parametrize(
    ("actions", "slots"),
    [(frozenset(), 1), (frozenset({"a"}), 0), (frozenset({"a"}), -1)],
)
def test_register_rejects_no_actions_or_no_slots(actions: frozenset[str], slots: int) -> None:
    sessions = Sessions()
    with pytest.raises(InvalidInput):
        sessions.register(worker_id="w1", tenant="t", actions=actions, labels={}, slots=slots, now=0.0)
    assert len(sessions) == 0


def test_session_ids_are_unique_per_registration() -> None:
    sessions = Sessions()
    ids = {register(sessions, f"w{i}").session_id for i in range(20)}
    assert len(ids) == 20


def test_registering_again_supersedes_the_old_session() -> None:
    sessions = Sessions()
    old = streaming(sessions, "w1")
    take(sessions, old, "t1")
    new, previous = sessions.register(
        worker_id="w1", tenant="acme", actions=frozenset({"resize"}), labels={}, slots=2, now=1.0
    )
    assert previous is old
    assert old.closed
    assert new is not old
    assert new.session_id != old.session_id
    assert len(sessions) == 1
    assert list(sessions) == [new]
    with pytest.raises(UnknownSession):
        sessions.session("w1", old.session_id)
    assert sessions.session("w1", new.session_id) is new
    # An assignment for the old session is refused, not sent to a closed session.
    with pytest.raises(NotConnected):
        sessions.target("w1", old.session_id)

    # The caller then closes the superseded session; that must not touch the new one.
    leases = sessions.close(old)
    assert [lease.key for lease in leases] == [("t1", 1)]
    assert sessions.session("w1", new.session_id) is new
    assert len(sessions) == 1
    assert sessions.leases == 0


def test_session_lookup_checks_the_worker_id() -> None:
    sessions = Sessions()
    s = register(sessions, "w1")
    with pytest.raises(UnknownSession):
        sessions.session("w2", s.session_id)
    with pytest.raises(UnknownSession):
        sessions.session("w1", "no-such-session")


# Target.


def test_target_refuses_a_session_that_is_not_streaming() -> None:
    sessions = Sessions()
    s = register(sessions, "w1")
    with pytest.raises(NotConnected):
        sessions.target("w1", s.session_id)
    sessions.attach(s, object(), 0.0)
    assert sessions.target("w1", s.session_id) is s


def test_target_refuses_unknown_or_mismatched_sessions() -> None:
    sessions = Sessions()
    s = streaming(sessions, "w1")
    with pytest.raises(NotConnected):
        sessions.target("w2", s.session_id)
    with pytest.raises(NotConnected):
        sessions.target("w1", "nope")


def test_target_refuses_a_closed_session() -> None:
    sessions = Sessions()
    s = streaming(sessions, "w1")
    sessions.close(s)
    with pytest.raises(NotConnected):
        sessions.target("w1", s.session_id)


def test_target_raises_no_free_slot_when_leases_fill_the_slots() -> None:
    sessions = Sessions()
    s = streaming(sessions, "w1", slots=2)
    take(sessions, s, "t1")
    assert sessions.target("w1", s.session_id) is s
    take(sessions, s, "t2")
    assert s.free_slots == 0
    with pytest.raises(NoFreeSlot):
        sessions.target("w1", s.session_id)
    sessions.settle(("t1", 1))
    assert sessions.target("w1", s.session_id) is s


def test_not_streaming_is_reported_before_no_free_slot() -> None:
    sessions = Sessions()
    s = streaming(sessions, "w1", slots=1)
    stream = s.stream
    take(sessions, s, "t1")
    sessions.detach(s, stream, 1.0)
    with pytest.raises(NotConnected):
        sessions.target("w1", s.session_id)


# Leases.


def test_take_and_settle() -> None:
    sessions = Sessions()
    s = streaming(sessions, "w1", slots=3)
    lease = take(sessions, s, "t1", 2, now=4.0, ack=5.0)
    assert lease.key == ("t1", 2)
    assert lease.session is s
    assert lease.payload == "payload-t1"
    assert lease.token == "token-t1"
    assert lease.taken_at == 4.0
    assert lease.receipt_deadline == 9.0
    assert not lease.received
    assert sessions.leases == 1
    assert s.free_slots == 2
    assert sessions.holder_of(("t1", 2)) is lease
    assert not sessions.was_settled(("t1", 2))

    assert sessions.settle(("t1", 2)) is lease
    assert sessions.leases == 0
    assert s.free_slots == 3
    assert sessions.was_settled(("t1", 2))
    assert sessions.holder_of(("t1", 2)) is None
    # Whoever settles first decides; a second settle finds nothing.
    assert sessions.settle(("t1", 2)) is None


def test_settle_unknown_key_returns_none_and_is_not_remembered() -> None:
    sessions = Sessions()
    assert sessions.settle(("ghost", 1)) is None
    assert not sessions.was_settled(("ghost", 1))


def test_attempts_are_distinct_leases() -> None:
    sessions = Sessions()
    s = streaming(sessions, "w1", slots=3)
    take(sessions, s, "t1", 1)
    take(sessions, s, "t1", 2)
    assert sessions.leases == 2
    sessions.settle(("t1", 1))
    assert sessions.was_settled(("t1", 1))
    assert not sessions.was_settled(("t1", 2))
    assert sessions.holder_of(("t1", 2)) is not None


def test_settled_memory_is_bounded_oldest_first() -> None:
    sessions = Sessions(remember_settled=3)
    s = streaming(sessions, "w1", slots=10)
    for i in range(5):
        take(sessions, s, f"t{i}")
        sessions.settle((f"t{i}", 1))
    assert [sessions.was_settled((f"t{i}", 1)) for i in range(5)] == [False, False, True, True, True]


def test_holder_only_for_the_holding_session() -> None:
    sessions = Sessions()
    a = streaming(sessions, "wa")
    b = streaming(sessions, "wb")
    lease = take(sessions, a, "t1")
    assert sessions.holder(("t1", 1), a) is lease
    assert sessions.holder(("t1", 1), b) is None
    assert sessions.holder(("t1", 2), a) is None
    sessions.settle(("t1", 1))
    assert sessions.holder(("t1", 1), a) is None


def test_holder_refuses_the_superseded_session_of_the_same_worker() -> None:
    sessions = Sessions()
    old = streaming(sessions, "w1")
    lease = take(sessions, old, "t1")
    new = register(sessions, "w1", now=1.0)
    assert sessions.holder(("t1", 1), new) is None
    assert sessions.holder(("t1", 1), old) is lease


def test_close_returns_and_settles_the_leases() -> None:
    sessions = Sessions()
    s = streaming(sessions, "w1", slots=3)
    other = streaming(sessions, "w2", slots=3)
    take(sessions, s, "t1")
    take(sessions, s, "t2")
    keep = take(sessions, other, "t3")
    leases = sessions.close(s)
    assert sorted(lease.key for lease in leases) == [("t1", 1), ("t2", 1)]
    assert all(lease.session is s for lease in leases)
    assert s.closed
    assert s.leases == {}
    assert sessions.leases == 1
    assert sessions.was_settled(("t1", 1))
    assert sessions.was_settled(("t2", 1))
    assert sessions.settle(("t1", 1)) is None  # the caller requeues them; nobody else can settle them
    assert sessions.holder_of(("t3", 1)) is keep
    assert len(sessions) == 1
    with pytest.raises(UnknownSession):
        sessions.session("w1", s.session_id)


def test_close_is_idempotent() -> None:
    sessions = Sessions()
    s = streaming(sessions, "w1")
    take(sessions, s, "t1")
    assert len(sessions.close(s)) == 1
    assert sessions.close(s) == []
    assert len(sessions) == 0


def test_close_after_reregistration_leaves_the_new_session_reachable_by_worker() -> None:
    sessions = Sessions()
    old = streaming(sessions, "w1")
    new = register(sessions, "w1", now=1.0)
    sessions.close(old)
    # Registering again must still see `new` as the one being superseded.
    newest, previous = sessions.register(
        worker_id="w1", tenant="acme", actions=frozenset({"resize"}), labels={}, slots=1, now=2.0
    )
    assert previous is new
    assert list(sessions) == [newest]


def test_overdue_receipts() -> None:
    sessions = Sessions()
    s = streaming(sessions, "w1", slots=5)
    early = take(sessions, s, "early", now=0.0, ack=1.0)
    late = take(sessions, s, "late", now=0.5, ack=1.0)
    acked = take(sessions, s, "acked", now=0.0, ack=1.0)
    acked.received = True
    assert sessions.overdue_receipts(1.0) == []  # exactly at the deadline is not overdue
    assert sessions.overdue_receipts(1.2) == [early]
    assert set(map(id, sessions.overdue_receipts(2.0))) == {id(early), id(late)}
    sessions.settle(early.key)
    assert sessions.overdue_receipts(2.0) == [late]


# Streams.


def test_attach_and_detach() -> None:
    sessions = Sessions()
    s = register(sessions, "w1", now=0.0)
    first, second = object(), object()
    assert sessions.attach(s, first, 1.0) is None
    assert s.streaming
    assert s.ready
    assert s.stream is first
    assert s.stream_lost_at is None
    assert s.last_seen == 1.0
    assert s.streams_opened == 1

    assert sessions.attach(s, second, 2.0) is first  # returns the stream it replaces
    assert s.stream is second
    assert s.streams_opened == 2

    # The replaced stream's handler ends later: its detach must not drop the new stream.
    assert sessions.detach(s, first, 3.0) is False
    assert s.stream is second
    assert s.stream_lost_at is None

    assert sessions.detach(s, second, 4.0) is True
    assert not s.streaming
    assert not s.ready
    assert s.stream_lost_at == 4.0
    assert sessions.detach(s, second, 5.0) is False
    assert s.stream_lost_at == 4.0


def test_closed_session_is_not_ready_even_with_a_stream() -> None:
    sessions = Sessions()
    s = streaming(sessions, "w1")
    sessions.close(s)
    assert s.streaming
    assert not s.ready


# Lost sessions.


def lost_ids(sessions: Sessions, now: float) -> list[str]:
    return [s.worker_id for s in sessions.lost(now, heartbeat_timeout=HB, reconnect_grace=GRACE)]


def test_lost_after_heartbeat_timeout() -> None:
    sessions = Sessions()
    s = streaming(sessions, "w1", now=0.0)
    assert lost_ids(sessions, HB) == []  # exactly the timeout is still alive
    assert lost_ids(sessions, HB + 0.1) == ["w1"]
    sessions.seen(s, HB)
    assert lost_ids(sessions, HB + 0.1) == []
    assert lost_ids(sessions, 2 * HB + 0.1) == ["w1"]


def test_a_session_that_never_streamed_has_the_heartbeat_timeout_not_the_grace() -> None:
    # It holds no lease (it cannot get work before it streams), and under load a Listen can take
    # longer than the grace after Register: only silence loses it.
    sessions = Sessions()
    register(sessions, "w1", now=0.0)
    assert lost_ids(sessions, GRACE + 0.01) == []
    assert lost_ids(sessions, HB + 0.01) == ["w1"]


def test_streaming_session_is_not_lost_by_the_grace() -> None:
    sessions = Sessions()
    streaming(sessions, "w1", now=0.0)
    assert lost_ids(sessions, GRACE * 10) == []


def test_dropped_stream_starts_the_reconnect_grace() -> None:
    sessions = Sessions()
    s = streaming(sessions, "w1", now=0.0)
    stream = s.stream
    sessions.detach(s, stream, 2.0)
    assert lost_ids(sessions, 2.0 + GRACE) == []
    assert lost_ids(sessions, 2.0 + GRACE + 0.01) == ["w1"]
    sessions.attach(s, object(), 2.3)  # reconnected in time
    assert lost_ids(sessions, 2.0 + GRACE + 0.01) == []


def test_seen_restarts_the_grace_of_a_session_without_stream() -> None:
    sessions = Sessions()
    s = streaming(sessions, "w1", now=0.0)
    sessions.detach(s, s.stream, 1.0)
    sessions.seen(s, 1.4)
    assert s.last_seen == 1.4
    assert s.stream_lost_at == 1.4
    assert lost_ids(sessions, 1.0 + GRACE + 0.1) == []
    assert lost_ids(sessions, 1.4 + GRACE + 0.01) == ["w1"]


def test_seen_keeps_a_streaming_session_without_grace() -> None:
    sessions = Sessions()
    s = streaming(sessions, "w1", now=0.0)
    sessions.seen(s, 3.0)
    assert s.last_seen == 3.0
    assert s.stream_lost_at is None


def test_lost_does_not_remove_anything_by_itself() -> None:
    sessions = Sessions()
    register(sessions, "w1", now=0.0)
    assert lost_ids(sessions, 100.0) == ["w1"]
    assert lost_ids(sessions, 100.0) == ["w1"]
    assert len(sessions) == 1


def test_lost_ignores_superseded_and_closed_sessions() -> None:
    sessions = Sessions()
    old = streaming(sessions, "w1", now=0.0)
    streaming(sessions, "w1", now=50.0)
    gone = streaming(sessions, "w2", now=0.0)
    sessions.close(gone)
    assert old.closed
    assert lost_ids(sessions, 50.0 + HB) == []


def test_lost_picks_only_the_lost_ones() -> None:
    sessions = Sessions()
    streaming(sessions, "quiet", now=0.0)
    fresh = streaming(sessions, "fresh", now=0.0)
    sessions.seen(fresh, 5.0)
    assert lost_ids(sessions, 7.0) == ["quiet"]


# Counting and versions.


def test_count_received() -> None:
    sessions = Sessions()
    s = register(sessions, "w1")
    sessions.count_received("w1", s.session_id)
    sessions.count_received("w1", s.session_id)
    assert s.received == 2
    sessions.count_received("w2", s.session_id)  # wrong worker: ignored
    sessions.count_received("w1", "nope")  # unknown session: ignored
    assert s.received == 2


def test_count_received_ignores_a_superseded_session() -> None:
    sessions = Sessions()
    old = register(sessions, "w1")
    new = register(sessions, "w1")
    sessions.count_received("w1", old.session_id)
    assert old.received == 0
    assert new.received == 0


def test_version_bumps_on_every_change() -> None:
    sessions = Sessions()
    seen = [sessions.version]

    def bumped() -> None:
        assert sessions.version > seen[-1]
        seen.append(sessions.version)

    s = register(sessions, "w1", slots=2)
    bumped()
    stream = object()
    sessions.attach(s, stream, 0.0)
    bumped()
    take(sessions, s, "t1")
    bumped()
    sessions.settle(("t1", 1))
    bumped()
    before = sessions.version
    assert sessions.settle(("t1", 1)) is None
    assert sessions.version == before  # nothing changed
    assert sessions.detach(s, object(), 1.0) is False
    assert sessions.version == before
    sessions.detach(s, stream, 1.0)
    bumped()
    register(sessions, "w1")  # supersedes
    bumped()
    sessions.close(s)
    bumped()
    sessions.changed()
    bumped()


# The receipt window.


def test_the_receipt_window_caps_unacknowledged_assignments_below_the_slots() -> None:
    sessions = Sessions(receipt_window=2)
    session = streaming(sessions, slots=5)
    first, second = take(sessions, session, "a"), take(sessions, session, "b")
    assert session.unacknowledged == 2
    assert session.free_slots == 0, "two unacknowledged fill a window of two"
    with pytest.raises(NoFreeSlot):
        sessions.target(session.worker_id, session.session_id)
    assert sessions.acknowledge(first) is True
    assert sessions.acknowledge(first) is False, "a receipt counts once"
    assert session.free_slots == 1
    assert sessions.unacknowledged(session) == [second]
    sessions.settle(second.key)  # settling an unacknowledged lease frees its place in the window
    assert session.unacknowledged == 0
    assert session.free_slots == 2, "the window still bounds what may be sent before receipts"
    for name in "cde":
        sessions.acknowledge(take(sessions, session, name))
    assert session.free_slots == 1, "four running of five slots, whatever the window"
    sessions.settle(first.key)
    assert session.free_slots == 2


def test_a_window_wider_than_the_slots_is_the_slots() -> None:
    sessions = Sessions(receipt_window=100)
    session = streaming(sessions, slots=3)
    assert session.window == 3
    for name in "abc":
        take(sessions, session, name)
    assert session.free_slots == 0


# Leases per concurrency key, for the scheduler's limits.


def test_leases_are_counted_per_tenant_action_and_concurrency_key() -> None:
    sessions = Sessions()
    w1, w2 = streaming(sessions, "w1", slots=5), streaming(sessions, "w2", slots=5)
    k = sessions.take
    k(w1, ("a", 1), "p", "t", 0.0, 5.0, concurrency=("acme", "resize", "customer-1"))
    k(w1, ("b", 1), "p", "t", 0.0, 5.0, concurrency=("acme", "resize", "customer-1"))
    k(w2, ("c", 1), "p", "t", 0.0, 5.0, concurrency=("acme", "resize", "customer-1"))
    k(w2, ("d", 1), "p", "t", 0.0, 5.0, concurrency=("acme", "resize", "customer-2"))
    k(w2, ("e", 1), "p", "t", 0.0, 5.0, concurrency=("globex", "resize", "customer-1"))
    k(w1, ("f", 1), "p", "t", 0.0, 5.0)  # no key: not counted
    assert sessions.key_leases() == {
        ("acme", "resize", "customer-1"): 3,
        ("acme", "resize", "customer-2"): 1,
        ("globex", "resize", "customer-1"): 1,
    }


def test_a_key_leaves_the_count_once_its_last_lease_is_settled() -> None:
    sessions = Sessions()
    session = streaming(sessions, slots=4)
    key = ("acme", "resize", "customer-1")
    sessions.take(session, ("a", 1), "p", "t", 0.0, 5.0, concurrency=key)
    sessions.take(session, ("b", 1), "p", "t", 0.0, 5.0, concurrency=key)
    sessions.settle(("a", 1))
    sessions.settle(("a", 1))  # settling twice counts once
    assert sessions.key_leases() == {key: 1}
    sessions.settle(("b", 1))
    assert sessions.key_leases() == {}, "a key with no lease left is left out"


def test_closing_a_session_gives_back_its_keys_leases() -> None:
    sessions = Sessions()
    w1, w2 = streaming(sessions, "w1", slots=4), streaming(sessions, "w2", slots=4)
    key = ("acme", "resize", "k")
    sessions.take(w1, ("a", 1), "p", "t", 0.0, 5.0, concurrency=key)
    sessions.take(w2, ("b", 1), "p", "t", 0.0, 5.0, concurrency=key)
    version = sessions.version
    sessions.close(w1)
    assert sessions.key_leases() == {key: 1}
    assert sessions.version > version, "the scheduler hears about the change"


def test_the_count_is_a_copy() -> None:
    sessions = Sessions()
    session = streaming(sessions)
    sessions.take(session, ("a", 1), "p", "t", 0.0, 5.0, concurrency=("acme", "resize", "k"))
    counts = sessions.key_leases()
    counts.clear()
    assert sessions.key_leases() == {("acme", "resize", "k"): 1}


def test_a_session_keeps_its_per_action_defaults() -> None:
    sessions = Sessions()
    defaults = {"resize": object()}
    session, _ = sessions.register(
        worker_id="w1",
        tenant="acme",
        actions=frozenset({"resize"}),
        labels={},
        slots=1,
        now=0.0,
        action_options=defaults,
    )
    defaults.clear()
    assert list(session.action_options) == ["resize"]
    assert register(sessions, "w2").action_options == {}


# Probes of a worker's reading.


def probed(sessions: Sessions, worker_id: str = "w1", *, answers: bool = True) -> WorkerSession:
    """A streaming session that holds a task, of a worker that says (or not) it answers probes."""
    session, _ = sessions.register(
        worker_id=worker_id, tenant="acme", actions=frozenset({"resize"}), labels={}, slots=2, now=0.0,
        answers_pings=answers,
    )  # fmt: skip
    sessions.attach(session, object(), 0.0)
    take(sessions, session, f"t-{worker_id}")
    return session


def test_a_session_holding_tasks_is_probed_and_the_next_probe_waits_for_the_answer() -> None:
    sessions = Sessions()
    s = probed(sessions, "w1")
    streaming(sessions, "idle")  # holds nothing: not probed
    probed(sessions, "old", answers=False)  # did not say it answers probes
    assert [x.worker_id for x in sessions.to_ping(1.0, every=2.0)] == ["w1"]
    assert (s.ping, s.ping_unanswered_since) == (1, 1.0)
    assert sessions.to_ping(5.0, every=2.0) == [], "unanswered: no second probe"
    sessions.ponged(s, 1)
    assert s.ping_unanswered_since is None
    assert sessions.to_ping(2.5, every=2.0) == [], "answered, but the next is due 2 s after the last"
    assert [x.worker_id for x in sessions.to_ping(3.0, every=2.0)] == ["w1"]
    assert s.ping == 2
    sessions.ponged(s, 1)  # an old answer does not answer the new probe
    assert s.ping_unanswered_since == 3.0


def test_a_session_that_stops_reading_while_holding_tasks_is_lost_after_the_heartbeat_timeout() -> None:
    sessions = Sessions()
    s = probed(sessions, "w1")
    sessions.to_ping(0.0, every=2.0)
    sessions.ponged(s, 1)
    sessions.to_ping(2.0, every=2.0)
    for now in (3.0, 5.0, 7.0, 8.0):
        sessions.seen(s, now)  # heartbeats keep coming: written, not read
        assert lost_ids(sessions, now) == []
    sessions.seen(s, 8.1)
    assert lost_ids(sessions, 8.1) == ["w1"], "its probe of 2.0 went unanswered for more than 6 s"


def test_a_worker_that_did_not_say_it_answers_probes_is_never_lost_for_them() -> None:
    sessions = Sessions()
    s = probed(sessions, "w1", answers=False)
    assert sessions.to_ping(0.0, every=2.0) == []
    sessions.seen(s, 9.0)
    assert lost_ids(sessions, 9.0) == []


# Whether a worker keeps up with what it is sent (a send-lock timeout blames it only if not).


def test_a_worker_keeps_up_until_something_written_to_it_owes_its_receipt_past_the_grace() -> None:
    sessions = Sessions()
    session = streaming(sessions, slots=3)
    queued = take(sessions, session, "queued")
    assert sessions.keeps_up(session, now=100.0, within=1.0), "nothing written yet: nothing owed"
    written = take(sessions, session, "written")
    written.written_at = 10.0
    assert sessions.keeps_up(session, now=10.9, within=1.0), "owed, but for less than the grace"
    assert not sessions.keeps_up(session, now=11.0, within=1.0)
    sessions.acknowledge(written)
    assert sessions.keeps_up(session, now=50.0, within=1.0)
    assert queued.written_at == float("inf")


def test_a_settled_lease_owes_nothing() -> None:
    sessions = Sessions()
    session = streaming(sessions)
    lease = take(sessions, session, "t")
    lease.written_at = 0.0
    assert not sessions.keeps_up(session, now=5.0, within=1.0)
    sessions.settle(lease.key)
    assert sessions.keeps_up(session, now=5.0, within=1.0)


def test_queued_leases_come_in_the_queue_s_order_and_settling_them_counts_them_out() -> None:
    sessions = Sessions(prefetch=4)
    session = streaming(sessions, slots=1)
    room = session.free_slots
    first, second = (
        sessions.take(session, (t, 1), payload=t, token=t, now=0.0, ack_timeout=5.0, queue=True, priority=p)
        for t, p in (("low", 0), ("high", 5))
    )
    assert session.queued == 2
    queued = sessions.queued_leases(session)
    assert queued == [second, first], "highest priority first, as the queue would have sent them"
    assert sessions.settle(second.key) is second
    assert sessions.queued_leases(session) == [first], "a settled lease is no longer waiting"
    assert sessions.settle(first.key) is first
    assert session.queued == 0
    assert sessions.forward_queued(session, now=1.0, ack_timeout=5.0) == []
    assert session.free_slots == room, "their room is free again"
