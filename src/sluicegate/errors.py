"""The one error root of Sluicegate and its retryable and permanent branches.

    SluicegateError
    ├── RetryableError          the same request may succeed later
    │   ├── PublishError        the broker did not confirm a publish
    │   ├── NotConnected        the worker is not streaming from this dispatcher
    │   ├── NoFreeSlot          the worker has no free slot
    │   ├── LockTimeout         the worker's send lock was not acquired in time
    │   ├── StreamBroken        the worker's stream failed or was ended
    │   ├── StoreUnavailable    the task store could not be reached or did not answer
    │   └── TaskPending         the task has no terminal result yet
    └── PermanentError          retrying the same request cannot help
        ├── InvalidInput        a task, request or setting is malformed
        ├── Unroutable          the broker had no queue for a publish
        ├── UnknownSession      the worker session does not exist (any more)
        ├── StaleAttempt        a report for an attempt the worker no longer holds
        ├── TaskFailed          a task ended in a state other than completed
        ├── BrokerRefused       the broker refused the login (user, password or virtual host)
        ├── SchemaBehind        the task store's schema is older than this release needs
        ├── Unauthenticated     no credentials, or credentials that do not verify
        └── PermissionDenied    the caller is known but may not do this

Edges convert once: the gRPC servicer maps these to status codes, the AMQP consumers map them
to requeue or dead-letter reasons, the CLI to a one-line message and an exit code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sluicegate.v1 import messages_pb2


class SluicegateError(Exception):
    """Root of every error Sluicegate raises on purpose."""

    retryable: bool = False


class RetryableError(SluicegateError):
    """The same request may succeed later."""

    retryable = True


class PermanentError(SluicegateError):
    """Retrying the same request cannot help."""


class PublishError(RetryableError):
    """The broker did not confirm a publish (nack, timeout, or lost connection)."""


class NotConnected(RetryableError):
    """The worker is not streaming from this dispatcher."""


class NoFreeSlot(RetryableError):
    """The worker has no free slot."""


class LockTimeout(RetryableError):
    """The worker's send lock was not acquired within the timeout."""


class StreamBroken(RetryableError):
    """The worker's stream failed or was ended while sending."""


class StoreUnavailable(RetryableError):
    """The task store (PostgreSQL) could not be reached or failed to answer."""


class TaskPending(RetryableError):
    """The task has no terminal result yet (asked without waiting)."""


class InvalidInput(PermanentError):
    """A task, request or setting is malformed; the message says which field and why."""


class Unroutable(PermanentError):
    """The broker returned a mandatory publish: no queue is bound for it."""


class UnknownSession(PermanentError):
    """The worker session does not exist on this dispatcher (any more)."""


class StaleAttempt(PermanentError):
    """A report names an attempt that the worker no longer holds."""


class TaskFailed(PermanentError):
    """A task ended in a state other than completed."""

    def __init__(self, result: messages_pb2.TaskResult) -> None:
        from sluicegate.v1 import messages_pb2

        status = messages_pb2.TaskStatus.Name(result.status).removeprefix("TASK_STATUS_").lower()
        super().__init__(f"task {result.task_id} {status}: {result.error or 'no error message'}")
        self.result = result


class BrokerRefused(PermanentError):
    """The broker refused the login: wrong user or password, or no access to the virtual host."""


class SchemaBehind(PermanentError):
    """The task store's schema is older than this release needs: run `sluicegate migrate`."""


class Unauthenticated(PermanentError):
    """No credentials, or credentials that do not verify (bad signature, expired, unknown key)."""


class PermissionDenied(PermanentError):
    """The caller is who it says, but may not do this (a role, a tenant or a worker id not its own)."""
