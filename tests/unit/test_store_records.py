"""Task records as readers see them: results, JSON, the CLI's rendering, and the store's settings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from sluicegate.errors import InvalidInput
from sluicegate.settings import load
from sluicegate.store import HistoryEntry, StoreSettings, TaskRecord, TaskState, show
from sluicegate.v1 import messages_pb2

pytestmark = pytest.mark.timeout(5)

T0 = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)


def _record(**changes: object) -> TaskRecord:
    fields: dict[str, object] = {
        "task_id": "t1",
        "status": TaskState.COMPLETED,
        "tenant": "acme",
        "action": "echo",
        "attempts": 2,
        "worker_id": "w2",
        "dispatcher_id": "d1",
        "reason": "",
        "detail": "",
        "output": b"hello",
        "output_size": 5,
        "error": "",
        "submitted_at": T0,
        "first_assigned_at": T0 + timedelta(milliseconds=3),
        "started_at": T0 + timedelta(seconds=2, milliseconds=5),
        "finished_at": T0 + timedelta(seconds=2, milliseconds=9),
        "updated_at": T0 + timedelta(seconds=3),
        "payload_size": 10,
        "history": (
            HistoryEntry("submitted", 0, T0),
            HistoryEntry("assigned", 1, T0 + timedelta(milliseconds=3), worker_id="w1"),
            HistoryEntry(
                "requeued", 1, T0 + timedelta(seconds=2), worker_id="w1", reason="ack_timeout", detail="no receipt"
            ),
            HistoryEntry("assigned", 2, T0 + timedelta(seconds=2, milliseconds=1), worker_id="w2"),
            HistoryEntry("completed", 2, T0 + timedelta(seconds=2, milliseconds=9), worker_id="w2"),
        ),
    }
    fields.update(changes)
    return TaskRecord(**fields)  # type: ignore[arg-type]


def test_a_terminal_record_is_the_result_a_client_would_have_had() -> None:
    result = _record().to_result()
    assert result.status == messages_pb2.TASK_STATUS_COMPLETED
    assert (result.task_id, result.output, result.attempt, result.worker_id) == ("t1", b"hello", 2, "w2")
    assert result.submitted_at_ms == int(T0.timestamp() * 1000)
    assert result.finished_at_ms == int(T0.timestamp() * 1000) + 2009
    assert [(h.reason, h.detail, h.attempt, h.worker_id) for h in result.history] == [
        ("ack_timeout", "no receipt", 1, "w1")
    ]


@pytest.mark.parametrize(
    ("state", "status"),
    [
        (TaskState.FAILED, messages_pb2.TASK_STATUS_FAILED),
        (TaskState.DEAD, messages_pb2.TASK_STATUS_DEAD),
        (TaskState.REJECTED, messages_pb2.TASK_STATUS_REJECTED),
        (TaskState.EXPIRED, messages_pb2.TASK_STATUS_EXPIRED),
        (TaskState.CANCELLED, messages_pb2.TASK_STATUS_CANCELLED),
    ],
)
def test_every_terminal_state_maps_to_its_result_status(state: TaskState, status: int) -> None:
    assert _record(status=state).to_result().status == status


def test_a_record_that_has_not_finished_has_no_result() -> None:
    record = _record(status=TaskState.RUNNING, finished_at=None)
    assert not record.terminal
    with pytest.raises(ValueError, match="running"):
        record.to_result()


def test_json_holds_text_output_as_text_and_binary_output_as_base64() -> None:
    data = _record().to_json()
    assert data["status"] == "completed"
    assert data["output"] == "hello"
    assert data["submitted_at"] == "2026-12-01T10:00:00+00:00"
    assert [h["kind"] for h in data["history"]] == ["submitted", "assigned", "requeued", "assigned", "completed"]
    binary = _record(output=b"\xff\x00", output_size=2).to_json()
    assert "output" not in binary
    assert binary["output_base64"] == "/wA="


def test_truncated_output_is_flagged() -> None:
    assert _record(output=b"hel", output_size=5).output_truncated
    assert not _record().output_truncated


def test_render_shows_state_timings_output_and_history() -> None:
    text = show.render(_record())
    assert "status     completed (2 attempts)" in text
    assert "worker     w2 (dispatcher d1)" in text
    assert "submitted  2026-12-01 10:00:00.000 UTC" in text
    assert "assigned   2026-12-01 10:00:00.003 UTC (+3 ms)" in text
    assert "finished   2026-12-01 10:00:02.009 UTC (+2.01 s)" in text
    assert "output     hello (5 bytes)" in text
    assert "requeued    attempt 1  w1  ack_timeout: no receipt" in text
    failed = show.render(_record(status=TaskState.FAILED, output=b"", output_size=0, error="boom"))
    assert "error      boom" in failed
    assert "output" not in failed


def test_table_aligns_one_line_per_record() -> None:
    lines = show.table([_record(), _record(task_id="a-much-longer-task-id", status=TaskState.RUNNING)]).splitlines()
    assert lines[0].split() == ["TASK", "STATUS", "ACTION", "TENANT", "ATTEMPTS", "WORKER", "UPDATED"]
    assert len(lines) == 3
    assert lines[1].index("completed") == lines[2].index("running") == lines[0].index("STATUS")


def test_store_url_must_be_postgresql_and_is_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEGATE_STORE_URL", "mysql://user:s3cret@db/x")
    with pytest.raises(InvalidInput, match="SLUICEGATE_STORE_URL") as info:
        load(StoreSettings)
    assert "s3cret" not in str(info.value)
    monkeypatch.setenv("SLUICEGATE_STORE_URL", "postgresql://user:s3cret@db:port/x")
    with pytest.raises(InvalidInput, match="numeric port") as info:
        load(StoreSettings)
    assert "s3cret" not in str(info.value)


def test_no_store_url_means_no_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLUICEGATE_STORE_URL", raising=False)
    assert not load(StoreSettings).configured
    monkeypatch.setenv("SLUICEGATE_STORE_URL", "")
    assert not load(StoreSettings).configured
    monkeypatch.setenv("SLUICEGATE_STORE_URL", "postgres://u:p@db:5432/x")
    settings = load(StoreSettings)
    assert settings.configured
    assert settings.dsn == "postgres://u:p@db:5432/x"
    assert "u:p" not in repr(settings)
