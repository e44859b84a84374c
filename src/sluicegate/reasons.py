"""Reason names: why an assignment goes back to the scheduler, or why a task ended without completing."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    LOCK_TIMEOUT = "lock_timeout"  # the worker's send lock was not acquired in time
    NOT_CONNECTED = "not_connected"  # the worker is not streaming from the dispatcher it was sent to
    NO_SLOT = "no_slot"  # the worker had no free slot
    STREAM_BROKEN = "stream_broken"  # the stream write failed
    STREAM_STALLED = "stream_stalled"  # sent on a stream that then stalled, never acknowledged
    ACK_TIMEOUT = "ack_timeout"  # the worker did not acknowledge receipt in time: stalled
    WORKER_LOST = "worker_lost"  # heartbeats stopped, or the stream dropped and did not come back
    WORKER_REREGISTERED = "worker_reregistered"  # the worker opened a new session
    DRAINING = "draining"  # the dispatcher is shutting down
    HANDLER_FAILED = "handler_failed"  # the handler failed and a retry is left (not a dispatch failure)
    LEASE_EXPIRED = "lease_expired"  # broker dead-lettered it: the dispatcher died holding it
    REJECTED = "rejected"  # broker dead-lettered a message the dispatcher could not read
    UNROUTABLE = "unroutable"  # the dispatcher's inbox did not exist
    INVALID = "invalid"  # the task itself is malformed; it can never run
    CANCELLED = "cancelled"
    RETRIES_EXHAUSTED = "retries_exhausted"  # the handler failed with no retry left: ended failed, kept in dead
    EXPIRED = "expired"  # not started within its schedule-to-start timeout: ended expired, never runs
    REUSED_ID = "reused_id"  # its task id belongs to another task submitted before: refused, never runs
    OVER_LIMIT = "over_limit"  # its tenant has too many tasks waiting: refused, never runs

    @property
    def counts_as_dispatch_failure(self) -> bool:
        return self not in (
            Reason.HANDLER_FAILED,
            Reason.DRAINING,
            Reason.WORKER_REREGISTERED,
            Reason.RETRIES_EXHAUSTED,
            Reason.EXPIRED,
            Reason.CANCELLED,
            Reason.REUSED_ID,
            Reason.OVER_LIMIT,
        )
