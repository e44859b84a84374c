"""The CLI's shape (help, defaults, common options, one-line usage errors) and the operator commands' pure parts."""

from __future__ import annotations

import argparse
import socket

import pytest

from sluicegate import cli, dead, status
from sluicegate.cli_base import HelpFormatter
from sluicegate.errors import InvalidInput
from sluicegate.setup_checks import check_listen, split_host_port
from sluicegate.store.records import TaskState, status_key
from sluicegate.v1 import messages_pb2

K = messages_pb2.LifecycleEvent


def _parsers(parser: argparse.ArgumentParser, path: str = "sluicegate") -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _parsers(sub, f"{path} {name}")
    return found


def test_every_command_has_a_description_and_every_flag_a_default_in_its_help() -> None:
    for path, parser in _parsers(cli.build_parser()):
        assert parser.description, path
        formatter = HelpFormatter(path)
        for action in parser._actions:
            if not action.option_strings or action.dest in ("help", "version"):
                continue
            text = formatter._expand_help(action)
            assert "default" in text, f"{path} {action.option_strings[0]}: {text!r}"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{path} {choice.dest}"


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [
        (["--prefix", "before", "status"], "before"),
        (["status", "--prefix", "after"], "after"),
        (["--prefix", "before", "dead", "list", "--prefix", "after"], "after"),
        (["dead", "--prefix", "middle", "list"], "middle"),
        (["status"], None),
    ],
)
def test_common_options_go_before_or_after_the_command(argv: list[str], prefix: str | None) -> None:
    assert cli.build_parser().parse_args(argv).prefix == prefix


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"sluicegate {cli.version()}"


@pytest.mark.parametrize(
    "argv", [["status", "--bogus"], ["dead"], ["dead", "replay"], ["nosuchcommand"], ["submit", "echo", "--count", "x"]]
)
def test_bad_usage_is_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("sluicegate")
    assert err[0].endswith("--help)")


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1:50051", ("127.0.0.1", 50051)), ("[::1]:0", ("::1", 0)), ("localhost:1", ("localhost", 1))],
)
def test_listen_addresses_parse(address: str, expected: tuple[str, int]) -> None:
    assert split_host_port(address, "x") == expected


@pytest.mark.parametrize("address", ["garbage", ":50051", "host:", "host:port", "host:70000", "::1:50051"])
def test_bad_listen_addresses_are_refused(address: str) -> None:
    with pytest.raises(InvalidInput):
        split_host_port(address, "the address")


def test_a_taken_port_is_refused_and_a_free_one_is_not() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(InvalidInput, match="the port is taken"):
            check_listen(f"127.0.0.1:{port}")
    assert check_listen("127.0.0.1:0") == ("127.0.0.1", 0)


def _worker(session: str, free: int = 1) -> messages_pb2.WorkerState:
    return messages_pb2.WorkerState(worker_id=f"w-{session}", session_id=session, slots=2, free_slots=free)


def test_status_folds_a_snapshot_and_the_deltas_that_follow_it() -> None:
    views: dict[str, status.DispatcherView] = {}
    delta = messages_pb2.DispatcherState(dispatcher_id="d", seq=4, delta=True, workers=[_worker("a", 0)])
    status.apply(views, delta)
    assert views == {}  # a delta with no snapshot before it
    status.apply(views, messages_pb2.DispatcherState(dispatcher_id="d", seq=5, workers=[_worker("a"), _worker("b")]))
    status.apply(views, messages_pb2.DispatcherState(dispatcher_id="d", seq=6, delta=True, workers=[_worker("a", 0)]))
    status.apply(views, messages_pb2.DispatcherState(dispatcher_id="d", seq=7, delta=True, gone=["b"]))
    status.apply(views, messages_pb2.DispatcherState(dispatcher_id="d", seq=9, delta=True, gone=["a"]))  # a gap
    status.apply(views, messages_pb2.DispatcherState(dispatcher_id="d", seq=3, workers=[]))  # older snapshot
    (view,) = views.values()
    assert view.seq == 7
    assert {s: w.free_slots for s, w in view.workers.items()} == {"a": 0}


def test_waiting_since_reads_each_kind_of_body() -> None:
    parked = messages_pb2.ParkedBatch(
        items=[messages_pb2.Parked(parked_at_ms=30), messages_pb2.Parked(parked_at_ms=20)]
    )
    assert status.waiting_since("lane", parked.SerializeToString()) == 20
    letters = messages_pb2.DeadLetterBatch(dead=[messages_pb2.DeadLetter(at_ms=7)])
    assert status.waiting_since("dead", letters.SerializeToString()) == 7
    tasks = messages_pb2.TaskBatch(tasks=[messages_pb2.Task(submitted_at_ms=11)])
    assert status.waiting_since("intake", tasks.SerializeToString()) == 11
    assert status.waiting_since("dead", b"\xff\xff not protobuf") is None


def test_a_replay_is_a_new_task_counted_from_now() -> None:
    task = messages_pb2.Task(task_id="a" * 32, action="charge", payload=b"p", run_at_ms=5, submitted_at_ms=1)
    task.trace["traceparent"] = "00-x"
    letter = messages_pb2.DeadLetter(task=task, reasons=[messages_pb2.Requeue(reason="lock_timeout", attempt=5)])
    new = dead.replay_task(letter, "client-1", now=1000)
    assert new.task_id != task.task_id
    assert len(new.task_id) == 32
    assert (new.action, new.payload, new.reply_to, new.submitted_at_ms, new.run_at_ms) == (
        "charge",
        b"p",
        "client-1",
        1000,
        0,
    )
    assert not new.trace
    old_event, new_event = dead.replay_events(letter, new, at=1000)
    assert (old_event.task_id, old_event.kind, old_event.attempt) == (task.task_id, K.KIND_REPLAYED, 5)
    assert old_event.detail == f"replayed as {new.task_id}"
    assert (new_event.task_id, new_event.detail) == (new.task_id, f"replay of {task.task_id}")


def test_replayed_never_changes_a_finished_record_and_yields_to_submitted() -> None:
    dead_key = status_key(K.KIND_DEAD, 5, 100)
    assert status_key(K.KIND_REPLAYED, 5, 200) < dead_key
    assert status_key(K.KIND_REPLAYED, 0, 200) < status_key(K.KIND_SUBMITTED, 0, 100)
    from sluicegate.store.records import STATE_OF_KIND

    assert STATE_OF_KIND[K.KIND_REPLAYED] == TaskState.SUBMITTED


@pytest.mark.parametrize("dispatchers", ["garbage", "127.0.0.1:99999", "a:1,,b:2", "host:port"])
def test_a_malformed_dispatcher_address_is_a_setting_error(dispatchers: str) -> None:
    from sluicegate.settings import load
    from sluicegate.worker_settings import WorkerSettings

    with pytest.raises(InvalidInput, match="SLUICEGATE_WORKER_DISPATCHERS"):
        load(WorkerSettings, dispatchers=dispatchers)


@pytest.mark.parametrize("dispatchers", ["127.0.0.1:50051", "a:1, b:2", "dns:///dispatcher:50051", "[::1]:50051"])
def test_good_dispatcher_addresses_are_taken(dispatchers: str) -> None:
    from sluicegate.settings import load
    from sluicegate.worker_settings import WorkerSettings

    assert load(WorkerSettings, dispatchers=dispatchers).dispatchers == dispatchers
