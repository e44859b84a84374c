"""The benchmark end to end with tiny numbers: it runs, cleans up after itself, and its figures are sane.

Runs `python -m bench --quick` as a subprocess against the test broker (the Celery part
only when Celery is installed) and checks the JSON it writes, not the speeds themselves.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import aio_pika
import pytest

pytestmark = pytest.mark.timeout(180)

HAS_CELERY = importlib.util.find_spec("celery") is not None
HAS_DRAMATIQ = importlib.util.find_spec("dramatiq") is not None


def _processes_of_run(run_id: str) -> list[int]:
    """Live processes the benchmark run started (each carries SLUICEGATE_BENCH_RUN=<run id>)."""
    marker = f"SLUICEGATE_BENCH_RUN={run_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def _existing_queues(url: str, names: list[str]) -> list[str]:
    """Those of `names` the broker has (a passive declare of a missing queue closes the channel)."""
    found = []
    async with await aio_pika.connect(url) as connection:
        for name in names:
            channel = await connection.channel()
            try:
                await channel.declare_queue(name, passive=True)
                found.append(name)
            except aio_pika.exceptions.ChannelClosed:
                continue
    return found


def test_quick_benchmark_runs_and_reports_sane_figures(rabbitmq_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    record = tmp_path / "BENCHMARKS.md"
    argv = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--tasks",
        "300",
        "--many-workers",
        "30",
        "--idle-streams",
        "50",
        "--rates",
        "40",
        "--duration",
        "1.5",
        "--rival-tasks",
        "200",
        "--json",
        str(out),
        "--record",
        str(record),
        "--log-dir",
        str(tmp_path / "logs"),
    ]
    started = time.monotonic()
    done = subprocess.run(
        argv,
        env={**os.environ, "RABBITMQ_URL": rabbitmq_url},
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert elapsed < 150, f"the quick benchmark took {elapsed:.0f} s"

    figures = json.loads(out.read_text())
    assert figures["errors"] == {}

    for workers in ("20", "30"):
        tp = figures["throughput"][workers]
        assert tp["received"] == tp["tasks"] == 300
        assert tp["failed"] == 0
        assert 10 < tp["tasks_per_s"] < 1_000_000
        assert set(tp["cpu_us_per_task"]) >= {"scheduler", "dispatcher", "workers", "client"}
        assert all(0 < v < 1_000_000 for k, v in tp["cpu_us_per_task"].items() if k != "broker")

    rivals = {"celery-threads": "celery threads x20", "dramatiq": "dramatiq 2 processes x 10 threads"}
    installed = {name for name, ok in (("celery-threads", HAS_CELERY), ("dramatiq", HAS_DRAMATIQ)) if ok}
    curves = figures["curves"]
    assert set(curves) == {"sluicegate 20 workers", "sluicegate 30 workers", *(rivals[r] for r in installed)}
    for key, points in curves.items():
        (point,) = points
        # 40/s for 1.5 s from 4 producer processes: 60 tasks, each submitted on its own.
        assert point["offered_per_s"] == 40
        assert point["producers"] == 4
        assert point["started"] == point["submitted"] == 60, key
        receipt = point["receipt_ms"]
        assert 0 < receipt["p50"] <= receipt["p90"] <= receipt["p99"] <= receipt["max"] < 60_000, key
        assert {"workers", "client"} <= set(point["cpu_us_per_task"]), key
        if key.startswith("sluicegate"):
            assert {"scheduler", "dispatcher"} <= set(point["cpu_us_per_task"])
            assert receipt["p50"] < point["result_ms"]["p50"], "a result comes back after the handler started"

    stall = figures["stall"]
    assert stall["stalled"] == 2
    open_loop = stall["open_loop"]
    assert open_loop["received"] > 0
    assert not math.isnan(open_loop["healthy_receipt_ms"]["p99"])
    assert open_loop["baseline_receipt_p99_ms"] == curves["sluicegate 20 workers"][0]["receipt_ms"]["p99"]
    # The stalled workers held tasks until the receipt deadline: those were requeued and ran elsewhere.
    assert open_loop["requeues"]["tasks"] > 0

    memory = figures["memory"]
    assert memory["streams"] == 50
    assert memory["rss_after_bytes"] > memory["rss_before_bytes"] > 0

    runs = {run["rival"]: run for run in figures["rivals"]["runs"]}
    assert set(runs) == installed
    assert len(figures["rivals"]["skipped"]) == 2 - len(runs)
    for run in runs.values():
        assert run["received"] == run["tasks"] == 200
        assert run["tasks_per_s"] > 0
        assert 0 < run["cpu_us_per_task"]["workers"] < 1_000_000

    assert "closed loop, 20 workers" in done.stdout
    assert "Open loop, one task per submit from 4 producer processes" in done.stdout
    rows = [line for line in record.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 1, "one row recorded"

    # Every process it started is gone, and so is every queue the rivals declared.
    run_id = figures["meta"]["run_id"]
    assert _processes_of_run(run_id) == []
    base = f"sluicegate-bench-{run_id}"
    names = [f"{base}-celery-threads", f"{base}-dramatiq", f"{base}-dramatiq.DQ", f"{base}-dramatiq.XQ"]
    names += [f"{base}-dramatiq.reply-{r}" for r in ("warm", "tp", "p0", "p1", "p2", "p3")]
    assert asyncio.run(_existing_queues(rabbitmq_url, names)) == []
