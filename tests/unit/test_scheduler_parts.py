"""Unit tests of the scheduler's small pure parts: the delay ladder, limits, the ledger, the outbox, lane names."""

from __future__ import annotations

import itertools

import pytest

from sluicegate.errors import InvalidInput
from sluicegate_scheduler.delays import RUNGS, rung_for
from sluicegate_scheduler.items import Origin, Pending
from sluicegate_scheduler.lanes import LaneKey
from sluicegate_scheduler.ledger import Ledger, Standing, Verdict
from sluicegate_scheduler.limits import ConcurrencyLimits, Rate, RateLimits, parse_counts, parse_rates
from sluicegate_scheduler.outbox import Entry, Kind, Outbox

# The delay ladder.


@pytest.mark.parametrize(
    ("remaining", "rung"),
    [(150, None), (250, 200), (999, 800), (1000, 800), (5_000, 3200), (7 * 24 * 3600 * 1000, 419_430_400)],
)
def test_the_rung_never_overshoots_what_is_left(remaining: int, rung: int | None) -> None:
    assert rung_for(remaining, hold_ms=200) == rung
    if rung is not None:
        assert rung <= remaining


def test_rungs_double_from_100_ms() -> None:
    assert RUNGS[0] == 100
    assert all(b == 2 * a for a, b in itertools.pairwise(RUNGS))


# Limits.


def test_limits_parse_and_the_key_overrides_the_action() -> None:
    caps = ConcurrencyLimits(parse_counts("resize=2, resize:acme=5", "concurrency", low=1))
    assert caps.cap("resize", "acme") == 5
    assert caps.cap("resize", "other") == 2
    assert caps.cap("resize", "") is None, "a task without a key is not capped"
    assert caps.cap("thumb", "acme") is None


@pytest.mark.parametrize("text", ["resize", "resize=", "resize=x", "resize=0"])
def test_bad_limits_are_one_line_errors(text: str) -> None:
    with pytest.raises(InvalidInput, match="concurrency"):
        parse_counts(text, "concurrency", low=1)


def test_rates_parse_periods_and_refuse_nonsense() -> None:
    assert parse_rates("a=10/1m, b=3", "rates") == {"a": Rate(10, 60.0), "b": Rate(3, 1.0)}
    for bad in ("a=0/1s", "a=ten/1s", "a=1/forever"):
        with pytest.raises(InvalidInput):
            parse_rates(bad, "rates")


def test_a_token_bucket_refills_at_its_rate_and_takes_back_an_unused_token() -> None:
    rates = RateLimits({"a": Rate(2, 1.0)})
    rates.take("t", "a", "", 0.0)
    rates.take("t", "a", "", 0.0)
    assert rates.wait("t", "a", "", 0.0) == pytest.approx(0.5)
    assert rates.wait("t", "a", "", 0.5) == 0.0
    rates.give_back("t", "a", "", 0.0)
    assert rates.wait("t", "a", "", 0.0) == 0.0
    assert rates.wait("t", "other", "", 0.0) == 0.0


# The ledger.


def test_a_parked_item_continues_from_its_lane_while_another_intake_copy_is_a_duplicate() -> None:
    ledger = Ledger()
    key = ("t", 1)
    assert ledger.arrive(key, Origin.INTAKE) is Verdict.NEW
    ledger.parked(key)
    assert ledger.arrive(key, Origin.INTAKE) is Verdict.DUPLICATE
    assert ledger.arrive(key, Origin.LANE) is Verdict.NEW
    assert ledger.arrive(key, Origin.LANE) is Verdict.DUPLICATE, "the same lane copy twice"
    ledger.placed(key)
    assert ledger.arrive(key, Origin.DUE) is Verdict.DUPLICATE
    ledger.buried(key)
    assert ledger.arrive(key, Origin.LANE) is Verdict.DROP
    assert ledger.duplicates == 3


def test_held_items_are_forgotten_when_a_session_ends_and_the_ledger_stays_bounded() -> None:
    ledger = Ledger(remember=3)
    ledger.arrive(("held", 1), Origin.INTAKE)
    ledger.arrive(("placed", 1), Origin.INTAKE)
    ledger.placed(("placed", 1))
    ledger.forget_held()
    assert ledger.standing(("held", 1)) is None
    assert ledger.standing(("placed", 1)) is Standing.PLACED
    for i in range(5):
        ledger.arrive((f"x{i}", 1), Origin.INTAKE)
    assert len(ledger) == 3


def test_overdue_reports_only_what_still_waits() -> None:
    ledger = Ledger()
    for name in ("waits", "placed"):
        ledger.arrive((name, 1), Origin.INTAKE)
        ledger.watch((name, 1), 1000)
    ledger.placed(("placed", 1))
    assert ledger.next_deadline() == 1000
    assert ledger.overdue(999) == []
    assert ledger.overdue(1000) == [(("waits", 1), Standing.HELD)]


# The outbox.


def entry(kind: Kind, destination: str, size: int = 10) -> Entry:
    return Entry(kind, destination, body=None, item=None, size=size)


def test_one_publish_in_flight_per_destination_and_what_piles_up_goes_next_together() -> None:
    outbox = Outbox(max_items=3, max_bytes=1000)
    for _ in range(5):
        outbox.add(entry(Kind.ASSIGN, "d1"))
    first = outbox.take((Kind.ASSIGN, "d1"))
    assert len(first) == 3
    assert outbox.ready() == []
    outbox.sent((Kind.ASSIGN, "d1"))
    assert outbox.ready() == [(Kind.ASSIGN, "d1")]
    assert len(outbox.take((Kind.ASSIGN, "d1"))) == 2


def test_a_batch_is_cut_by_bytes_and_a_failed_one_goes_again_first_in_order() -> None:
    outbox = Outbox(max_items=100, max_bytes=25)
    entries = [entry(Kind.PARK, "lane", size=10) for _ in range(4)]
    for e in entries:
        outbox.add(e)
    batch = outbox.take((Kind.PARK, "lane"))
    assert batch == entries[:2]
    outbox.put_back((Kind.PARK, "lane"), batch)
    outbox.sent((Kind.PARK, "lane"))
    assert outbox.take((Kind.PARK, "lane")) == entries[:2]
    cleared = outbox.clear()
    assert [e for e, _ in cleared] == entries, "in flight or queued, nothing is forgotten"
    assert [flying for _, flying in cleared] == [True, True, False, False], "and which were on their way"


# Lane names.


def test_lane_names_are_readable_bounded_and_unique_per_key() -> None:
    long = LaneKey("t" * 64, "a" * 128, 9, "f" * 128, "c" * 128)
    assert len(long.queue_name("p" * 63).encode()) <= 255
    a = LaneKey("acme", "resize", 0, fairness_key="k1").queue_name("sg")
    b = LaneKey("acme", "resize", 0, fairness_key="k2").queue_name("sg")
    assert a != b
    assert a.startswith("sg.lane.acme.resize.p0.keyed.")
    assert LaneKey("acme", "resize", 3).queue_name("sg").startswith("sg.lane.acme.resize.p3.lane.")


def test_an_item_is_known_by_task_and_the_attempt_it_will_run_as() -> None:
    from sluicegate.v1 import messages_pb2

    item = Pending(
        messages_pb2.Task(task_id="t", submitted_at_ms=1000, schedule_timeout_ms=500), None, Origin.REQUEUE, 3
    )
    assert item.key == ("t", 3)
    assert item.deadline_ms == 1500
