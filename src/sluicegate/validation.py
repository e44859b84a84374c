"""Checks on tasks and names, shared by the client, the scheduler and the dispatcher."""

from __future__ import annotations

import re
from collections.abc import Mapping

from sluicegate.errors import InvalidInput
from sluicegate.v1 import messages_pb2

ACTION_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]{0,127}$")
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LABEL_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}$")
TASK_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
DEFAULT_MAX_PAYLOAD = 1024 * 1024
MAX_PRIORITY = 9
KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/=+-]{0,127}$")
MAX_DELAY_MS = 7 * 24 * 3600 * 1000
MAX_PREFERRED = 16
MAX_RETRIES = 100
MAX_TIMEOUT_MS = 7 * 24 * 3600 * 1000
MAX_LABELS = 32
MAX_LABEL_VALUE = 256
MAX_SLOTS = 10_000
MAX_BACKOFF_MS = 24 * 3600 * 1000
MAX_MULTIPLIER = 10.0


def check_action(action: str) -> None:
    if not action:
        raise InvalidInput("action must not be empty")
    if not ACTION_PATTERN.fullmatch(action):
        raise InvalidInput("action must start with a letter and hold at most 128 letters, digits or _ . : -")


def check_tenant(tenant: str) -> None:
    if not TENANT_PATTERN.fullmatch(tenant):
        raise InvalidInput("tenant must hold 1 to 64 letters, digits or _ . -")


def check_labels(labels: Mapping[str, str]) -> None:
    items = dict(labels)
    if len(items) > MAX_LABELS:
        raise InvalidInput(f"at most {MAX_LABELS} labels are allowed")
    for key, value in items.items():
        if not LABEL_KEY_PATTERN.fullmatch(key):
            raise InvalidInput(f"label key {key[:40]!r} must hold 1 to 63 letters, digits or _ . - /")
        if len(value) > MAX_LABEL_VALUE:
            raise InvalidInput(f"label {key!r} is longer than {MAX_LABEL_VALUE} characters")


def check_task(task: messages_pb2.Task, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
    """Raise InvalidInput naming the first field of `task` that is out of range."""
    if not TASK_ID_PATTERN.fullmatch(task.task_id):
        raise InvalidInput("task_id must hold 1 to 128 letters, digits or _ . : -")
    check_action(task.action)
    check_tenant(task.tenant)
    if len(task.payload) > max_payload:
        raise InvalidInput(f"payload is {len(task.payload)} bytes; the limit is {max_payload}")
    if not 0 <= task.priority <= MAX_PRIORITY:
        raise InvalidInput(f"priority must be between 0 and {MAX_PRIORITY}")
    if task.max_retries > MAX_RETRIES:
        raise InvalidInput(f"max_retries must be at most {MAX_RETRIES}")
    if task.timeout_ms > MAX_TIMEOUT_MS:
        raise InvalidInput("timeout must be at most 7 days")
    check_labels(task.labels)
    if task.run_at_ms and task.submitted_at_ms and task.run_at_ms - task.submitted_at_ms > MAX_DELAY_MS:
        raise InvalidInput("a task can be delayed by at most 7 days")
    if task.schedule_timeout_ms > MAX_TIMEOUT_MS:
        raise InvalidInput("schedule_timeout must be at most 7 days")
    for name in ("fairness_key", "concurrency_key", "sticky_key"):
        value = getattr(task, name)
        if value and not KEY_PATTERN.fullmatch(value):
            raise InvalidInput(f"{name} must hold 1 to 128 letters, digits or _ . : @ / = + -")
    if len(task.preferred) > MAX_PREFERRED:
        raise InvalidInput(f"at most {MAX_PREFERRED} preferred labels are allowed")
    for preference in task.preferred:
        if not LABEL_KEY_PATTERN.fullmatch(preference.key) or len(preference.value) > MAX_LABEL_VALUE:
            raise InvalidInput("a preferred label needs a valid key and a value of at most 256 characters")
        if not 1 <= preference.weight <= 100:
            raise InvalidInput("a preferred label's weight must be between 1 and 100")
    if task.HasField("backoff"):
        check_backoff(task.backoff)


def check_backoff_values(initial_ms: int, max_ms: int, multiplier: float) -> None:
    """Raise InvalidInput unless the waits are within 0..24 h and the multiplier within 1..10 (0 means 2)."""
    if not 0 <= initial_ms <= MAX_BACKOFF_MS:
        raise InvalidInput("backoff initial wait must be between 0 and 24 hours")
    if not 0 <= max_ms <= MAX_BACKOFF_MS:
        raise InvalidInput("backoff max wait must be between 0 and 24 hours")
    if max_ms < initial_ms:
        raise InvalidInput("backoff max wait must not be shorter than its initial wait")
    # Written so that NaN fails too.
    if multiplier != 0 and not 1 <= multiplier <= MAX_MULTIPLIER:
        raise InvalidInput(f"backoff multiplier must be between 1 and {MAX_MULTIPLIER:g} (0 means 2)")


def check_backoff(backoff: messages_pb2.Backoff) -> None:
    check_backoff_values(backoff.initial_ms, backoff.max_ms, backoff.multiplier)


def check_action_options(action: str, options: messages_pb2.ActionOptions) -> None:
    """A worker's defaults for one action: the same limits as a task's own settings."""
    if options.max_retries > MAX_RETRIES:
        raise InvalidInput(f"max_retries of action {action[:128]!r} must be at most {MAX_RETRIES}")
    if options.HasField("backoff"):
        try:
            check_backoff(options.backoff)
        except InvalidInput as err:
            raise InvalidInput(f"action {action[:128]!r}: {err}") from err


def parse_labels(items: str | list[str]) -> dict[str, str]:
    """Labels written `k=v,k2=v2` (an environment variable) or as a list of `k=v` (repeated flags), checked."""
    parts = items.split(",") if isinstance(items, str) else items
    labels: dict[str, str] = {}
    for part in parts:
        if not part.strip() and isinstance(items, str):
            continue  # `a=1,` or an empty variable
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidInput(f"labels are written key=value; {part.strip()[:40]!r} is not")
        if key in labels:
            raise InvalidInput(f"label {key[:40]!r} is given twice")
        labels[key] = value.strip()
    check_labels(labels)
    return labels
