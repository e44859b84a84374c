"""What every AMQP consumer checks of the bodies it takes, beyond that they decode (pure).

Anyone who holds broker credentials can publish to any queue: a body that is not what its
producer would ever write must end somewhere visible (`dead`, with a reason) or be dropped and
counted, and never be held, retried for ever, or corrupt what the consumer knows.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Iterable

from sluicegate.errors import InvalidInput
from sluicegate.v1 import messages_pb2
from sluicegate.validation import (
    DEFAULT_MAX_PAYLOAD,
    MAX_LABELS,
    MAX_SLOTS,
    TASK_ID_PATTERN,
    check_action,
    check_labels,
    check_task,
    check_tenant,
)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
MAX_ATTEMPT = 1_000_000
MAX_STATE_WORKERS = 100_000
MAX_WORKER_ACTIONS = 10_000
MAX_REASON = 1024


def check_assignment(assignment: messages_pb2.Assignment, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
    """An attempt as a scheduler places it or a dispatcher sends it back; raises InvalidInput."""
    if not assignment.HasField("task"):
        raise InvalidInput("assignment carries no task")
    check_task(assignment.task, max_payload)
    if not 1 <= assignment.attempt <= MAX_ATTEMPT:
        raise InvalidInput(f"attempt must be between 1 and {MAX_ATTEMPT}")
    if assignment.worker_id and not NAME.fullmatch(assignment.worker_id):
        raise InvalidInput("worker_id must hold 1 to 128 letters, digits or _ . : -")


def first_of_each(
    assignments: Iterable[messages_pb2.Assignment],
) -> tuple[list[messages_pb2.Assignment], list[messages_pb2.Assignment]]:
    """The assignments with each (task, attempt) once, in order, and the copies left out."""
    seen: set[tuple[str, int]] = set()
    unique, copies = [], []
    for a in assignments:
        key = (a.task.task_id, a.attempt)
        if key in seen:
            copies.append(a)
        else:
            seen.add(key)
            unique.append(a)
    return unique, copies


def check_state(state: messages_pb2.DispatcherState) -> None:
    """A dispatcher's report of its workers; raises InvalidInput if no dispatcher would send it."""
    if not NAME.fullmatch(state.dispatcher_id):
        raise InvalidInput("dispatcher_id must hold 1 to 128 letters, digits or _ . : -")
    if len(state.workers) > MAX_STATE_WORKERS:
        raise InvalidInput(f"a state message may describe at most {MAX_STATE_WORKERS} workers")
    for w in state.workers:
        if not NAME.fullmatch(w.worker_id) or not NAME.fullmatch(w.session_id):
            raise InvalidInput("a worker needs a valid worker_id and session_id")
        check_tenant(w.tenant)
        if not w.actions or len(w.actions) > MAX_WORKER_ACTIONS:
            raise InvalidInput("a worker serves 1 to 10000 actions")
        for action in w.actions:
            check_action(action)
        if len(w.labels) > MAX_LABELS:
            raise InvalidInput(f"at most {MAX_LABELS} labels are allowed")
        check_labels(w.labels)
        if not 1 <= w.slots <= MAX_SLOTS or w.free_slots > 2 * w.slots or w.prefetch > w.slots:
            raise InvalidInput("slots, free slots or prefetch out of range")
    for k in state.key_leases:
        check_tenant(k.tenant)
        check_action(k.action)


def valid_cancels(cancels: Iterable[messages_pb2.Cancel]) -> tuple[list[messages_pb2.Cancel], int]:
    """The cancellations that name a task a client could have submitted, and how many did not."""
    good, bad = [], 0
    for c in cancels:
        if TASK_ID_PATTERN.fullmatch(c.task_id) and len(c.reason) <= MAX_REASON:
            good.append(c)
        else:
            bad += 1
    return good, bad


def fingerprint(task: messages_pb2.Task) -> bytes:
    """What makes two submissions the same task: everything but when it was sent and its trace."""
    copy = messages_pb2.Task()
    copy.CopyFrom(task)
    copy.ClearField("trace")
    copy.ClearField("submitted_at_ms")
    return hashlib.blake2b(copy.SerializeToString(deterministic=True), digest_size=16).digest()


class TaskIds:
    """The content of recently submitted task ids, to tell a copy of a submission from a reused id.

    Bounded: past `remember` ids the oldest are forgotten, and a forgotten id that comes again is
    taken for a copy (as before this existed), never refused.
    """

    def __init__(self, remember: int = 100_000) -> None:
        self.remember = remember
        self._prints: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._prints)

    def note(self, task: messages_pb2.Task) -> None:
        self._prints[task.task_id] = fingerprint(task)
        self._prints.move_to_end(task.task_id)
        while len(self._prints) > self.remember:
            self._prints.popitem(last=False)

    def reused(self, task: messages_pb2.Task) -> bool:
        """True if the id was submitted before with other content (not a copy of that submission)."""
        known = self._prints.get(task.task_id)
        return known is not None and known != fingerprint(task)
