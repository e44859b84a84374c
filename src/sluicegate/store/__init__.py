"""The task store: one record per task in PostgreSQL, kept by the recorder, readable from anywhere."""

from sluicegate.store.reader import TaskStore
from sluicegate.store.records import HistoryEntry, TaskRecord, TaskState
from sluicegate.store.settings import StoreSettings

__all__ = ["HistoryEntry", "StoreSettings", "TaskRecord", "TaskState", "TaskStore"]
