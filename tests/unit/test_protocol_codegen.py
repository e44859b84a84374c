"""Unit tests of the protocol code: the committed generated modules are current and round-trip batches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sluicegate.v1 import messages_pb2, worker_pb2

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current() -> None:
    python = ROOT / ".venv" / "bin" / "python"
    result = subprocess.run(
        [str(python if python.exists() else sys.executable), str(ROOT / "scripts" / "protogen.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_proto_package_equals_the_python_import_path() -> None:
    assert messages_pb2.DESCRIPTOR.package == "sluicegate.v1"
    assert worker_pb2.DESCRIPTOR.package == "sluicegate.v1"
    # The file lives where its package says, so generated imports need no patching.
    assert messages_pb2.DESCRIPTOR.name == "sluicegate/v1/messages.proto"
    assert messages_pb2.__name__ == "sluicegate.v1.messages_pb2"


def test_assignment_batch_round_trips() -> None:
    batch = messages_pb2.AssignmentBatch()
    for i in range(5):
        a = batch.assignments.add(
            attempt=i + 1,
            worker_id=f"w{i}",
            session_id=f"s{i}",
            dispatcher_id="d1",
            dispatch_failures=i,
            run_failures=1,
            assigned_at_ms=1_700_000_000_000 + i,
        )
        a.task.task_id = f"task-{i}"
        a.task.tenant = "acme"
        a.task.action = "images.resize"
        a.task.payload = bytes(range(256)) * (i + 1)
        a.task.priority = 200 + i
        a.task.labels["region"] = "eu"
        a.task.trace["traceparent"] = f"00-{i:032x}-{i:016x}-01"
        a.trace["traceparent"] = "00-abc-def-01"
        a.history.add(
            reason="lock_timeout", detail="send lock not acquired in time", worker_id="w9", attempt=i, at_ms=5
        )
    body = batch.SerializeToString()
    back = messages_pb2.AssignmentBatch.FromString(body)
    assert back == batch
    assert len(back.assignments) == 5
    assert [a.task.task_id for a in back.assignments] == [f"task-{i}" for i in range(5)]
    assert [a.attempt for a in back.assignments] == [1, 2, 3, 4, 5]
    third = back.assignments[2]
    assert third.task.payload == bytes(range(256)) * 3
    assert dict(third.task.labels) == {"region": "eu"}
    assert third.history[0].reason == "lock_timeout"
    assert third.dispatcher_id == "d1"


def test_empty_batch_round_trips() -> None:
    assert (
        messages_pb2.AssignmentBatch.FromString(messages_pb2.AssignmentBatch().SerializeToString())
        == messages_pb2.AssignmentBatch()
    )
