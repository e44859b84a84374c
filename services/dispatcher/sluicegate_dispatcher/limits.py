"""Limits on what one worker, principal or tenant may ask of a dispatcher (pure: time is passed in).

A principal is whoever stands behind a session: the authenticated identity when the edge has
one, else the peer's host. Sessions, register rates and a stall's cooldown follow it, so that
many sessions of one party count as one party.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sluicegate.errors import LimitExceeded
from sluicegate.ratelimit import Buckets
from sluicegate_dispatcher.sessions import WorkerSession


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    sessions_per_principal: int = 1000
    sessions_per_tenant: int = 5000
    max_actions: int = 64  # action names per registration
    max_action_chars: int = 4096  # all its action names together
    max_labels: int = 32
    max_label_chars: int = 4096  # all its label keys and values together
    max_events: int = 1000  # task events in one worker message
    register_rate: float = 20.0  # registrations per second per principal (0: no limit)
    register_burst: int = 1000  # as many as its sessions: a fleet on one host starts at once
    heartbeat_rate: float = 10.0  # empty messages per second per session (0: no limit)
    heartbeat_burst: int = 50


def check_registration(limits: EdgeLimits, actions: Iterable[str], labels: Mapping[str, str]) -> None:
    """What one registration may declare; raises LimitExceeded naming the limit."""
    names = list(actions)
    if len(names) > limits.max_actions:
        raise LimitExceeded(f"a worker may serve at most {limits.max_actions} actions (it named {len(names)})")
    if sum(map(len, names)) > limits.max_action_chars:
        raise LimitExceeded(f"a worker's action names may hold at most {limits.max_action_chars} characters in all")
    if len(labels) > limits.max_labels:
        raise LimitExceeded(f"a worker may carry at most {limits.max_labels} labels")
    if sum(len(k) + len(v) for k, v in labels.items()) > limits.max_label_chars:
        raise LimitExceeded(f"a worker's labels may hold at most {limits.max_label_chars} characters in all")


def check_events(limits: EdgeLimits, count: int) -> None:
    """Checked before any event of the message is applied."""
    if count > limits.max_events:
        raise LimitExceeded(f"a message may carry at most {limits.max_events} events (it carried {count})")


class Admission:
    """Who may open a session now, and whether a session's heartbeats come too fast."""

    def __init__(self, limits: EdgeLimits) -> None:
        self.limits = limits
        self._registers = Buckets(limits.register_rate, limits.register_burst)
        self._heartbeats = Buckets(limits.heartbeat_rate, limits.heartbeat_burst)
        self.refused = 0

    def register(
        self, sessions: Iterable[WorkerSession], *, principal: str, tenant: str, worker_id: str, now: float
    ) -> None:
        """Raises LimitExceeded if this principal registers too fast or one more session is too many.

        A session the registration replaces (the same worker id) does not count against it.
        """
        if not self._registers.take(principal, now):
            self.refused += 1
            raise LimitExceeded(f"too many registrations; at most {self.limits.register_rate:g} a second")
        mine = theirs = 0
        for s in sessions:
            if s.closed or (worker_id and s.worker_id == worker_id):
                continue
            mine += s.principal == principal
            theirs += s.tenant == tenant
        if mine >= self.limits.sessions_per_principal:
            self.refused += 1
            raise LimitExceeded(f"at most {self.limits.sessions_per_principal} sessions per principal")
        if theirs >= self.limits.sessions_per_tenant:
            self.refused += 1
            raise LimitExceeded(f"at most {self.limits.sessions_per_tenant} sessions per tenant")

    def heartbeat(self, session_id: str, now: float) -> None:
        if not self._heartbeats.take(session_id, now):
            self.refused += 1
            raise LimitExceeded(f"heartbeats too fast; at most {self.limits.heartbeat_rate:g} a second")

    def forget(self, session_id: str) -> None:
        self._heartbeats.forget(session_id)
