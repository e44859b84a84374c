"""Sluicegate: RabbitMQ-backed task dispatch to long-running workers over gRPC streams."""

from sluicegate.client import Client, TaskResult, TaskSpec
from sluicegate.errors import (
    InvalidInput,
    PermanentError,
    RetryableError,
    SluicegateError,
    StoreUnavailable,
    TaskFailed,
    TaskPending,
)
from sluicegate.settings import BrokerSettings
from sluicegate.store import HistoryEntry, StoreSettings, TaskRecord, TaskState
from sluicegate.worker import TaskContext, Worker, WorkerSettings

__all__ = [
    "BrokerSettings",
    "Client",
    "HistoryEntry",
    "InvalidInput",
    "PermanentError",
    "RetryableError",
    "SluicegateError",
    "StoreSettings",
    "StoreUnavailable",
    "TaskContext",
    "TaskFailed",
    "TaskPending",
    "TaskRecord",
    "TaskResult",
    "TaskSpec",
    "TaskState",
    "Worker",
    "WorkerSettings",
]
