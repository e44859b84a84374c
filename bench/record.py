"""A run as one row of the results table in BENCHMARKS.md (`--record`)."""

from __future__ import annotations

from pathlib import Path

from bench.report import Figures, best_rival, cpu_line, main_throughput, n, ratio

RESULTS_HEADING = "## Results"
COLUMNS = [
    "date (UTC)",
    "commit",
    "machine",
    "versions",
    "command",
    "closed loop tasks/s (each fleet)",
    "Celery / Dramatiq tasks/s",
    "ratio to Celery / Dramatiq",
    "open loop submit→start p99 ms by rate (each system)",
    "stall: healthy p99 vs base",
    "KiB per idle stream",
    "CPU µs/task closed loop sched / disp / workers / client / broker = all",
    "others' CPU",
]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _curves(figures: Figures) -> str:
    parts = []
    for key, points in (figures.get("curves") or {}).items():
        values = ", ".join(f"{n(p['offered_per_s'])}: {n(p['receipt_ms']['p99'], 1)}" for p in points)
        parts.append(f"{key} {values}")
    return "; ".join(parts) or "-"


def record_row(figures: Figures) -> str:
    meta = figures.get("meta", {})
    machine = meta.get("machine", {})
    v = meta.get("versions", {})
    throughput = figures.get("throughput") or {}
    stall = (figures.get("stall") or {}).get("open_loop") or {}
    memory = figures.get("memory") or {}
    main = main_throughput(figures)
    rivals = [best_rival(figures, f) for f in ("celery", "dramatiq")]
    ratios = [ratio(figures, f) for f in ("celery", "dramatiq")]
    cells = [
        meta.get("date", ""),
        meta.get("commit", ""),
        f"{machine.get('nproc')} cores, {machine.get('memory_gib')} GiB, {machine.get('cpu')}",
        f"Python {v.get('python')}, aio-pika {v.get('aio-pika')}, grpcio {v.get('grpcio')}, "
        f"uvloop {v.get('uvloop')}, celery {v.get('celery')}, dramatiq {v.get('dramatiq')}, {v.get('broker')}",
        f"`{meta.get('command', '')}`",
        " / ".join(f"{n(tp['tasks_per_s'])} ({tp['workers']} workers)" for tp in throughput.values()) or "-",
        " / ".join("-" if r is None else f"{n(r['tasks_per_s'])} ({r['label']})" for r in rivals),
        " / ".join("-" if r is None else f"{r:.2f}x" for r in ratios),
        _curves(figures),
        f"{n(stall['healthy_receipt_ms']['p99'], 1)} vs {n(stall.get('baseline_receipt_p99_ms'), 1)} ms "
        f"@{n(stall['offered_per_s'])}/s"
        if stall
        else "-",
        n(memory["bytes_per_stream"] / 1024, 1) if memory else "-",
        cpu_line(main["cpu_us_per_task"]) if main else "-",
        f"{n(main['other_processes_pct'])}%" if main else "-",
    ]
    if figures.get("errors"):
        cells[4] += " (failed: " + ", ".join(figures["errors"]) + ")"
    return "| " + " | ".join(_cell(str(c)) for c in cells) + " |"


def _header() -> list[str]:
    return ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]


def record(figures: Figures, path: Path) -> Path:
    """Append the run as one row of the results table in `path` (the heading and table made if missing)."""
    row = record_row(figures)
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmarks"]
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == RESULTS_HEADING)
    except StopIteration:
        lines += ["", RESULTS_HEADING, "", *_header(), row]
        path.write_text("\n".join(lines) + "\n")
        return path
    table_start = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("|")), None)
    if table_start is None:
        lines[start + 1 : start + 1] = ["", *_header(), row]
    else:
        end = table_start
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        lines.insert(end, row)
    path.write_text("\n".join(lines) + "\n")
    return path
