"""The benchmark's pure parts: timetables, sample rows, the curve's verdicts, the results row, option errors."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import astuple
from pathlib import Path

import pytest

from bench.procs import merged
from bench.producer import Timetable
from bench.record import RESULTS_HEADING, record
from bench.report import curve_table, kept_up, open_capacity
from bench.runs import Sample

ROOT = Path(__file__).resolve().parents[2]


def test_producers_share_one_steady_timetable() -> None:
    tables = [Timetable("r", 1000.0, 200.0, 50, i, 4) for i in range(4)]
    slots = sorted((due, task_id) for t in tables for task_id, due in t.slots)
    assert [task_id for _, task_id in slots] == [f"r-{k}" for k in range(50)]
    assert [due for due, _ in slots] == pytest.approx([1000.0 + k / 200.0 for k in range(50)])
    # Each producer sends every fourth task: the rate seen from each is a quarter of the whole.
    assert [len(t.slots) for t in tables] == [13, 13, 12, 12]


def test_a_sample_survives_its_json_row() -> None:
    sample = Sample("t-1", 1.5, 1.6, 1.7, "w-0001", 2, 1.55, ("receipt-timeout",), True)
    assert Sample.from_row(list(astuple(sample))) == sample


def test_numbered_processes_of_one_role_are_summed() -> None:
    assert merged({"workers0": 1.0, "workers1": 2.0, "client0": 0.5, "dispatcher": 3.0}) == {
        "workers": 3.0,
        "client": 0.5,
        "dispatcher": 3.0,
    }


def _point(rate: float, started: int, started_per_s: float, p99: float = 10.0) -> dict[str, object]:
    return {
        "offered_per_s": rate,
        "producers": 4,
        "submitted": int(rate * 2),
        "started": started,
        "started_per_s": started_per_s,
        "receipt_ms": {"p50": 1.0, "p99": p99},
        "cpu_us_per_task": {"workers": 100.0, "client": 50.0},
    }


def test_capacity_is_the_highest_rate_kept_up_with() -> None:
    points = [_point(100, 200, 99.0), _point(200, 400, 195.0), _point(400, 800, 300.0), _point(800, 700, 500.0)]
    assert [kept_up(p) for p in points] == [True, True, False, False]
    assert open_capacity(points) == 200
    assert open_capacity([_point(100, 150, 75.0)]) is None


def test_the_curves_are_printed_side_by_side() -> None:
    figures = {
        "curves": {
            "sluicegate 20 workers": [_point(100, 200, 99.0, 30.0), _point(200, 400, 150.0, 900.0)],
            "dramatiq x": [_point(100, 200, 100.0, 4.0)],
        }
    }
    lines = curve_table(figures)
    header = next(line for line in lines if "rate/s" in line)
    assert header.split() == ["rate/s", "sluicegate", "20", "workers", "dramatiq", "x"]
    row_100 = next(line for line in lines if line.strip().startswith("100 "))
    assert "1.0 / 30.0" in row_100
    assert "1.0 / 4.0" in row_100
    row_200 = next(line for line in lines if line.strip().startswith("200 "))
    assert "kept up 150/s" in row_200
    assert row_200.rstrip().endswith("-")
    assert any("sluicegate 20 workers: kept up with 100/s" in line and "NOT MET" in line for line in lines)
    assert any(line.strip().startswith("dramatiq x @ 100/s: - / - / 100 / 50 / - = 150") for line in lines)


def test_a_run_is_appended_to_the_results_table(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nintro\n")
    figures = {"meta": {"date": "2026-12-02 03:00", "command": "python -m bench --quick"}, "errors": {}}
    record(figures, path)
    record(figures, path)
    lines = path.read_text().splitlines()
    assert lines.count(RESULTS_HEADING) == 1
    rows = [line for line in lines if line.startswith("| 2026-12-02 03:00")]
    assert len(rows) == 2
    assert "`python -m bench --quick`" in rows[0]
    table = [line for line in lines if line.startswith("|")]
    assert len({line.count(" | ") for line in table if not line.startswith("|-")}) == 1, "every row has every column"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rivals", "huey"], "unknown rival 'huey'"),
        (["--rates", "fast"], "--rates must be numbers"),
        (["--producers", "0"], "--producers must be between 1 and 32"),
        (["--skip", "lock"], "unknown phase 'lock'"),
    ],
)
def test_bad_options_fail_with_one_line_and_exit_2(args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"bench: {message}" + done.stderr.strip().split(message, 1)[1]]
    assert done.stdout == ""
