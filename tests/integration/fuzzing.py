"""Property-based fuzzing against services running on the test's event loop.

Hypothesis drives a plain function in a thread of its own; each example is handed to the event
loop (where the dispatcher, scheduler and client run) and waited for. Shrinking works as usual,
and a run is bounded by its number of examples and, per example, by a timeout.
"""

from __future__ import annotations

import asyncio
import random
import string
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluicegate.v1 import messages_pb2, worker_pb2

T = TypeVar("T")

NAMES = st.one_of(
    st.sampled_from(["default", "t1", "work", "w1", "x", ""]),
    st.text(max_size=12),
    st.text(alphabet=string.ascii_letters + string.digits + "_.-:", min_size=1, max_size=140),
)
SMALL_INTS = st.integers(min_value=0, max_value=2**32 - 1)
COUNTS = st.one_of(st.integers(min_value=0, max_value=6), SMALL_INTS)  # mostly where the rules change
IDS = st.one_of(st.uuids().map(str), NAMES)  # mostly distinct: copies of one id are settled as copies


async def fuzz(strategy: st.SearchStrategy[T], check: Callable[[T], Awaitable[None]], *, examples: int = 100) -> None:
    """Run `check` on `examples` values drawn from `strategy`, on this event loop; fail as hypothesis fails."""
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,  # the same examples on every run: a CI failure is the one seen locally
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def run(value: T) -> None:
        # Hypothesis seeds the global `random` the same way for every example, and the services on
        # the loop draw from it too (aiormq's consumer tags): without fresh entropy two examples
        # would hand them the same "random" tag.
        random.seed()
        asyncio.run_coroutine_threadsafe(check(value), loop).result(timeout=15)

    await asyncio.to_thread(run)


def mutated(message: Any) -> st.SearchStrategy[bytes]:
    """Serialized `message` with bytes flipped, cut or added: near misses of a valid body."""
    body = message.SerializeToString()
    return st.one_of(
        st.binary(max_size=200),
        st.integers(min_value=0, max_value=max(0, len(body) - 1)).map(lambda cut: body[:cut]),
        st.tuples(st.integers(min_value=0, max_value=max(0, len(body) - 1)), st.integers(0, 255)).map(
            lambda edit: body[: edit[0]] + bytes([edit[1]]) + body[edit[0] + 1 :] if body else b""
        ),
        st.binary(max_size=16).map(lambda extra: body + extra),
    )


def tasks() -> st.SearchStrategy[messages_pb2.Task]:
    return st.builds(
        messages_pb2.Task,
        task_id=IDS,
        tenant=st.sampled_from(["default", "t1", "", "bad tenant"]),
        action=st.sampled_from(["fuzzed", "other", "", "9bad"]),  # never the honest worker's action
        payload=st.binary(max_size=64),
        priority=st.integers(min_value=-(2**31), max_value=2**31 - 1),
        timeout_ms=SMALL_INTS,
        schedule_timeout_ms=st.sampled_from([0, 1, 2**32 - 1]),
        run_at_ms=st.sampled_from([0, 1, 2**62]),
        labels=st.dictionaries(NAMES, st.text(max_size=8), max_size=3),
        reply_to=NAMES,
        concurrency_key=NAMES,
    )


def assignments() -> st.SearchStrategy[messages_pb2.Assignment]:
    return st.builds(
        messages_pb2.Assignment,
        task=tasks(),
        attempt=COUNTS,
        worker_id=NAMES,
        session_id=NAMES,
        dispatch_failures=COUNTS,
        run_failures=COUNTS,
        history=st.lists(st.builds(messages_pb2.Requeue, reason=NAMES, detail=st.text(max_size=20)), max_size=3),
    )


def assignment_bodies() -> st.SearchStrategy[bytes]:
    batch = st.lists(assignments(), max_size=4).map(lambda a: messages_pb2.AssignmentBatch(assignments=a))
    return st.one_of(batch.map(lambda b: b.SerializeToString()), st.binary(max_size=200))


def task_bodies() -> st.SearchStrategy[bytes]:
    batch = st.lists(tasks(), max_size=4).map(lambda t: messages_pb2.TaskBatch(tasks=t))
    return st.one_of(batch.map(lambda b: b.SerializeToString()), st.binary(max_size=200))


def parked_bodies() -> st.SearchStrategy[bytes]:
    parked = st.builds(messages_pb2.Parked, task=tasks(), attempt=COUNTS)
    batch = st.lists(parked, max_size=4).map(lambda p: messages_pb2.ParkedBatch(items=p))
    return st.one_of(batch.map(lambda b: b.SerializeToString()), st.binary(max_size=200))


def state_bodies() -> st.SearchStrategy[bytes]:
    """Dispatcher states under ids no real dispatcher has; well-formed forged states are the publisher check's."""
    worker = st.builds(
        messages_pb2.WorkerState,
        worker_id=NAMES,
        session_id=NAMES,
        tenant=NAMES,
        actions=st.lists(st.sampled_from(["fuzzed", "", "bad name"]), max_size=3),
        slots=SMALL_INTS,
        free_slots=SMALL_INTS,
        ready=st.booleans(),
        received=st.integers(min_value=0, max_value=2**64 - 1),
    )
    state = st.builds(
        messages_pb2.DispatcherState,
        dispatcher_id=st.sampled_from(["fuzz-d1", "", "bad id!"]),
        seq=st.integers(min_value=0, max_value=2**64 - 1),
        workers=st.lists(worker, max_size=3),
        delta=st.booleans(),
        gone=st.lists(NAMES, max_size=2),
    )
    return st.one_of(state.map(lambda s: s.SerializeToString()), st.binary(max_size=200))


def cancel_bodies() -> st.SearchStrategy[bytes]:
    cancel = st.builds(messages_pb2.Cancel, task_id=NAMES, reason=st.text(max_size=40), requested_by=NAMES)
    batch = st.lists(cancel, max_size=4).map(lambda c: messages_pb2.CancelBatch(cancels=c))
    return st.one_of(batch.map(lambda b: b.SerializeToString()), st.binary(max_size=200))


def result_bodies() -> st.SearchStrategy[bytes]:
    result = st.builds(
        messages_pb2.TaskResult,
        task_id=NAMES,
        status=st.integers(min_value=0, max_value=20),
        output=st.binary(max_size=32),
        error=st.text(max_size=40),
        attempt=SMALL_INTS,
    )
    batch = st.lists(result, max_size=4).map(lambda r: messages_pb2.TaskResultBatch(results=r))
    return st.one_of(batch.map(lambda b: b.SerializeToString()), st.binary(max_size=200))


def register_requests() -> st.SearchStrategy[worker_pb2.RegisterRequest]:
    return st.builds(
        worker_pb2.RegisterRequest,
        worker_id=NAMES,
        tenant=NAMES,
        actions=st.lists(NAMES, max_size=5),
        slots=SMALL_INTS,
        labels=st.dictionaries(NAMES, st.text(max_size=8), max_size=3),
        action_options=st.dictionaries(
            NAMES,
            st.builds(
                messages_pb2.ActionOptions,
                max_retries=SMALL_INTS,
                backoff=st.builds(
                    messages_pb2.Backoff,
                    initial_ms=SMALL_INTS,
                    max_ms=SMALL_INTS,
                    multiplier=st.floats(allow_nan=True, width=32),
                ),
            ),
            max_size=2,
        ),
    )


def events() -> st.SearchStrategy[worker_pb2.TaskEvent]:
    return st.builds(
        worker_pb2.TaskEvent,
        task_id=NAMES,
        attempt=SMALL_INTS,
        kind=st.integers(min_value=0, max_value=10),
        output=st.binary(max_size=32),
        error=st.text(max_size=20),
        retryable=st.booleans(),
        at_ms=st.integers(min_value=-(2**63), max_value=2**63 - 1),
        extend_ms=SMALL_INTS,
    )
