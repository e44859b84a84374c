"""The operator's commands against a real broker and PostgreSQL: status, dead letters, cleanup."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aio_pika
import aiormq
import pytest

from sluicegate.settings import BrokerSettings
from sluicegate.store import StoreSettings, TaskStore
from sluicegate.v1 import messages_pb2

from .conftest import Stack, eventually
from .store_helpers import migrate, recorder, run_cli

pytestmark = pytest.mark.timeout(120)


def _env(broker: BrokerSettings, **extra: str) -> dict[str, str]:
    return {"RABBITMQ_URL": broker.rabbitmq_url.get_secret_value(), "SLUICEGATE_STORE_URL": "", **extra}


async def _cli_json(broker: BrokerSettings, *args: str, **env: str) -> Any:
    code, out, err = await run_cli(*args, "--prefix", broker.prefix, "--json", env=_env(broker, **env))
    assert code == 0, err
    return json.loads(out)


async def _dead_letter(stack: Stack) -> str:
    """A task that fails with no retry left: in the dead queue once its client has its result."""
    client = await stack.client()
    task_id = await client.submit("fail", b"", max_retries=0)
    assert (await client.result(task_id, timeout=20)).status == messages_pb2.TASK_STATUS_FAILED
    return task_id


async def test_status_shows_dispatchers_workers_queues_and_in_flight(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    await stack.start_worker(dispatcher, "w-status", slots=3)
    await stack.wait_workers_known(1)
    dead_id = await _dead_letter(stack)
    client = await stack.client()
    await client.submit("nobody-serves-this", b"")  # waits in a lane

    found = await _cli_json(stack.broker, "status")

    (d,) = found["dispatchers"]
    assert d["id"] == dispatcher.id
    assert (d["workers"], d["slots_total"], d["draining"]) == (1, 3, False)
    (w,) = found["workers"]
    assert (w["worker_id"], w["dispatcher"], w["slots_total"], w["slots_free"]) == ("w-status", dispatcher.id, 3, 3)
    assert w["last_heartbeat"].endswith("s")
    assert float(w["last_heartbeat"][:-1]) < 10
    assert sorted(w["actions"]) == ["echo", "fail", "sleep"]
    queues = {q["name"]: q for q in found["queues"]}
    dead = queues[f"{stack.broker.prefix}.dead"]
    assert dead["depth"] == 1
    assert dead["oldest_wait"] != "-"  # read from the head of the queue and put back
    lanes = [q for q in found["queues"] if q["kind"] == "lane"]
    assert any("nobody-serves-this" in q["name"] and q["depth"] == 1 for q in lanes), lanes
    assert found["in_flight"] == 0
    assert found["tasks"] is None  # no store configured
    # The peek put the dead letter back.
    again = await _cli_json(stack.broker, "dead", "list")
    assert [letter["task_id"] for letter in again] == [dead_id]

    code, out, err = await run_cli("status", "--prefix", stack.broker.prefix, env=_env(stack.broker))
    assert code == 0, err
    assert "w-status" in out
    assert "LAST HEARTBEAT" in out
    assert "OLDEST WAIT" in out


async def test_status_counts_the_leases_of_a_busy_worker(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    await stack.start_worker(dispatcher, "w-busy", slots=2)
    await stack.wait_workers_known(1)
    client = await stack.client()
    for _ in range(2):
        await client.submit("sleep", {"seconds": 20})
    await eventually(lambda: dispatcher.sessions.leases == 2, timeout=10)

    found = await _cli_json(stack.broker, "status")
    assert found["in_flight"] == 2
    (w,) = found["workers"]
    assert (w["in_flight"], w["slots_free"]) == (2, 0)


async def test_status_of_a_prefix_where_nothing_runs_is_one_line(broker: BrokerSettings) -> None:
    code, _, err = await run_cli("status", "--prefix", broker.prefix, env=_env(broker))
    assert code == 2
    expected = f"sluicegate: nothing runs under prefix {broker.prefix!r} (there is no exchange {broker.prefix}.events)"
    assert err.strip().splitlines() == [expected]


async def test_dead_list_show_replay_and_purge(stack: Stack, store_url: str) -> None:
    store = await migrate(store_url)
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    await stack.start_worker(dispatcher, "w-dead")
    await stack.wait_workers_known(1)
    async with recorder(store, stack.broker):
        first, second = await _dead_letter(stack), await _dead_letter(stack)

        listed = await _cli_json(stack.broker, "dead", "list")
        assert sorted(letter["task_id"] for letter in listed) == sorted([first, second])
        assert {letter["reason"] for letter in listed} == {"retries_exhausted"}

        shown = await _cli_json(stack.broker, "dead", "show", first)
        assert shown["action"] == "fail"
        assert shown["reasons"][-1]["detail"] == "RuntimeError: failed on purpose"

        env = _env(stack.broker, SLUICEGATE_STORE_URL=store_url)
        code, out, err = await run_cli("dead", "replay", first, "--wait", "--prefix", stack.broker.prefix, env=env)
        assert code == 1, err  # the replay ran, and failed again, as `fail` does
        replayed_as = out.splitlines()[0].split()[-1]
        assert out.splitlines()[0] == f"{first} replayed as {replayed_as}"
        assert out.splitlines()[1].startswith(f"{replayed_as} failed")

        # The replay died in its turn; the first letter is gone, the second kept.
        listed = await _cli_json(stack.broker, "dead", "list")
        assert sorted(letter["task_id"] for letter in listed) == sorted([second, replayed_as])

        async with TaskStore(store) as records:

            async def both_recorded() -> bool:
                old, new = await records.get(first), await records.get(replayed_as)
                return bool(
                    old
                    and new
                    and any(h.kind == "replayed" for h in old.history)
                    and any(h.kind == "replayed" for h in new.history)
                )

            for _ in range(100):
                if await both_recorded():
                    break
                await asyncio.sleep(0.1)
            old, new = await records.get(first), await records.get(replayed_as)
            assert old is not None
            assert new is not None
            assert old.status.value == "failed"  # a terminal state stays final
            assert [h.detail for h in old.history if h.kind == "replayed"] == [f"replayed as {replayed_as}"]
            assert [h.detail for h in new.history if h.kind == "replayed"] == [f"replay of {first}"]
            assert new.status.value == "failed"
            assert new.attempts == 1

    code, _, err = await run_cli("dead", "purge", "--prefix", stack.broker.prefix, env=_env(stack.broker))
    assert code == 2
    assert "--yes" in err
    code, out, err = await run_cli("dead", "purge", "--yes", "--prefix", stack.broker.prefix, env=_env(stack.broker))
    assert code == 0, err
    assert out.strip() == "purged 2 dead letter(s)"
    assert await _cli_json(stack.broker, "dead", "list") == []


async def test_replaying_an_unknown_task_changes_nothing(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    await stack.start_worker(dispatcher, "w-x")
    await stack.wait_workers_known(1)
    kept = await _dead_letter(stack)
    code, _, err = await run_cli(
        "dead", "replay", kept, "0" * 32, "--prefix", stack.broker.prefix, env=_env(stack.broker)
    )
    assert code == 2
    assert err.strip().splitlines() == [f"sluicegate: no dead letter for task {'0' * 32}: nothing was replayed"]
    assert [letter["task_id"] for letter in await _cli_json(stack.broker, "dead", "list")] == [kept]


async def _exists(broker: BrokerSettings, queue: str) -> bool:
    connection = await aio_pika.connect_robust(broker.rabbitmq_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(queue, passive=True)
            return True
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False


async def test_cleanup_refuses_while_something_runs_then_removes_everything(stack: Stack) -> None:
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    worker = await stack.start_worker(dispatcher, "w-c")
    await stack.wait_workers_known(1)
    client = await stack.client()
    await client.submit("nobody-serves-this", b"")
    prefix = stack.broker.prefix
    code, _, err = await run_cli("cleanup", "--prefix", prefix, env=_env(stack.broker))
    assert code == 2, err
    assert "--force" in err
    assert await _exists(stack.broker, f"{prefix}.tasks")

    code, _, err = await run_cli("cleanup", env=_env(stack.broker, SLUICEGATE_PREFIX=prefix))
    assert code == 2
    assert "needs --prefix" in err

    # Stopped, everything goes: nothing declares it again.
    await worker.stop()
    await client.close()
    await dispatcher.close()
    assert stack.scheduler is not None
    await stack.scheduler.close()
    # A dispatcher that no longer runs is not heard: its inbox is named (or expires by itself).
    code, _out, err = await run_cli(
        "cleanup", "--prefix", prefix, "--dispatcher", dispatcher.id, env=_env(stack.broker)
    )
    assert code == 0, err
    for name in ("tasks", "requeue", "dead", "cancels", "intake.default", f"dispatcher.{dispatcher.id}"):
        assert not await _exists(stack.broker, f"{prefix}.{name}"), name


async def test_status_reads_task_counts_and_lane_waits_from_the_store(stack: Stack, store_url: str) -> None:
    store: StoreSettings = await migrate(store_url)
    await stack.start_scheduler()
    dispatcher = await stack.start_dispatcher()
    await stack.start_worker(dispatcher, "w-s")
    await stack.wait_workers_known(1)
    async with recorder(store, stack.broker):
        client = await stack.client()
        task_id = await client.submit("echo", b"x")
        waiting_id = await client.submit("nobody-serves-this", b"")
        await client.result(task_id, timeout=20)
        async with TaskStore(store) as records:

            async def recorded() -> bool:
                done, waiting = await records.get(task_id), await records.get(waiting_id)
                return bool(done and done.terminal and waiting and waiting.status.value == "waiting")

            for _ in range(200):
                if await recorded():
                    break
                await asyncio.sleep(0.05)
            assert await recorded()
        found = await _cli_json(stack.broker, "status", SLUICEGATE_STORE_URL=store_url)
    by_status = {t["status"]: t["tasks"] for t in found["tasks"]}
    assert by_status == {"completed": 1, "waiting": 1}
    (lane,) = [q for q in found["queues"] if q["kind"] == "lane"]
    assert lane["oldest_wait"].endswith("s (store)"), lane  # a lane's head cannot be peeked; the store knows
