"""No DispatcherState seq, however large, locks a dispatcher out of the scheduler's view (WorkerPool.update)."""

from __future__ import annotations

from sluicegate_scheduler.assignment import MAX_SEQ_JUMP, WorkerPool

from .test_assignment_core import report

FORGED_SEQ = 2**64 - 1


def workers(pool: WorkerPool) -> set[str]:
    return {w.worker_id for w in pool}


def test_a_forged_huge_seq_of_another_epoch_lasts_only_until_the_next_full_snapshot() -> None:
    pool = WorkerPool()
    assert pool.update("d1", 100, False, [report("honest")], now=0.0, epoch="run-1")
    # A forgery: a phantom ready worker, seq 2^64-1, no (or a made-up) epoch.
    assert pool.update("d1", FORGED_SEQ, False, [report("phantom")], now=0.1, epoch="")
    assert workers(pool) == {"phantom"}
    # The honest deltas of the real run are not applied to the forged view...
    assert not pool.update("d1", 101, False, [report("honest")], now=0.2, delta=True, epoch="run-1")
    # ...but its next full snapshot replaces it, whatever the forged seq said.
    assert pool.update("d1", 102, False, [report("honest")], now=1.0, epoch="run-1")
    assert workers(pool) == {"honest"}
    assert pool.update("d1", 103, False, [report("honest", free=1)], now=1.1, delta=True, epoch="run-1")


def test_a_huge_jump_within_the_epoch_is_ignored() -> None:
    pool = WorkerPool()
    assert pool.update("d1", 100, False, [report("honest")], now=0.0, epoch="run-1")
    assert not pool.update("d1", FORGED_SEQ, False, [report("phantom")], now=0.1, epoch="run-1")
    assert not pool.update("d1", 100 + MAX_SEQ_JUMP + 1, False, [report("phantom")], now=0.1, epoch="run-1")
    assert workers(pool) == {"honest"}
    assert pool.update("d1", 101, False, [report("honest"), report("second")], now=0.2, delta=True, epoch="run-1")
    assert workers(pool) == {"honest", "second"}
    assert pool.update("d1", 100 + MAX_SEQ_JUMP, False, [report("honest")], now=0.3, epoch="run-1")


def test_a_restarted_dispatcher_is_believed_at_once_and_its_old_run_no_more() -> None:
    pool = WorkerPool()
    assert pool.update("d1", 5_000, False, [report("old")], now=0.0, epoch="run-1")
    assert pool.update("d1", 10, False, [report("new")], now=1.0, epoch="run-2")  # a lower seq, a new run
    assert workers(pool) == {"new"}
    assert not pool.update("d1", 5_001, False, [report("old")], now=1.1, delta=True, epoch="run-1")
    assert not pool.update("d1", 9, False, [report("old")], now=1.2, epoch="run-2")  # older within the run
    assert workers(pool) == {"new"}
