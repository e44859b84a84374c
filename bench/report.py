"""What the benchmark prints, records in BENCHMARKS.md, and writes as JSON."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.options import Options

Figures = dict[str, Any]

TARGETS = {
    "throughput": 5000.0,  # tasks/s end to end
    "celery": 10.0,  # Sluicegate / Celery, closed loop
    "dramatiq": 2.0,  # Sluicegate / Dramatiq, closed loop
    "receipt_p99_ms": 25.0,  # at half the capacity
    "stall_p99_factor": 2.0,  # healthy p99 under a stall / without
    "bytes_per_stream": 64 * 1024.0,
}

RESULTS_HEADING = "## Results"
COLUMNS = [
    "date (UTC)",
    "commit",
    "machine",
    "versions",
    "command",
    "e2e tasks/s",
    "Celery / Dramatiq tasks/s",
    "ratio to Celery / Dramatiq",
    "receipt p50/p99 ms (20 / many streams)",
    "stall: healthy p99 vs base; healthy tasks/s",
    "requeue→receipt p99 ms",
    "KiB per idle stream",
    "CPU µs/task sched / disp / workers / client / broker",
    "others' CPU",
]


def command_line() -> str:
    """The command as typed: `python -m bench ...`."""
    return " ".join(["python -m bench", *(shlex.quote(a) for a in sys.argv[1:])])


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return math.nan


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return "-"
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "-"


def _loadavg() -> list[str]:
    try:
        return Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return []


async def metadata(options: Options, command: str, broker: str) -> Figures:
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "commit": _git_commit(),
        "command": command,
        "quick": options.quick,
        "machine": {
            "nproc": os.cpu_count(),
            "memory_gib": round(_memory_gib(), 1),
            "cpu": _cpu_model(),
            "loadavg_at_start": _loadavg(),
        },
        "versions": {
            "python": platform.python_version(),
            "sluicegate": _version("sluicegate"),
            "aio-pika": _version("aio-pika"),
            "grpcio": _version("grpcio"),
            "protobuf": _version("protobuf"),
            "uvloop": _version("uvloop"),
            "celery": _version("celery"),
            "dramatiq": _version("dramatiq"),
            "broker": broker,
        },
        "sizes": {
            "tasks": options.tasks,
            "warmup": options.warmup,
            "workers": options.workers,
            "slots": options.slots,
            "many_workers": options.many_workers,
            "idle_streams": options.idle_streams,
            "duration_s": options.duration,
            "payload_bytes": options.payload_bytes,
            "rival_tasks": options.rival_tasks,
            "ack_timeout": options.ack_timeout,
        },
    }


# Formatting.


def _n(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "NOT MET")


def _dist(d: Figures | None) -> str:
    if not d or not d.get("count"):
        return "-"
    return f"{d['p50']:.1f} / {d['p90']:.1f} / {d['p99']:.1f} / {d['max']:.1f}"


CPU_ORDER = ("scheduler", "dispatcher", "workers", "client", "broker", "others")


def _cpu_names(figures: Figures) -> str:
    return " / ".join(n for n in CPU_ORDER if n in figures.get("cpu_util_pct", {}))


def _cpu_values(figures: Figures) -> str:
    cpu = figures.get("cpu_util_pct", {})
    return " / ".join(_n(cpu[n]) for n in CPU_ORDER if n in cpu)


def best_rival(figures: Figures, framework: str) -> Figures | None:
    """The fastest closed-loop run of one framework (celery or dramatiq)."""
    runs = [r for r in (figures.get("rivals") or {}).get("runs") or [] if r["rival"].startswith(framework)]
    return max(runs, key=lambda r: r["tasks_per_s"]) if runs else None


def ratio(figures: Figures, framework: str) -> float | None:
    best = best_rival(figures, framework)
    tp = figures.get("throughput")
    if not best or not tp or not best["tasks_per_s"]:
        return None
    return float(tp["tasks_per_s"]) / float(best["tasks_per_s"])


def table(figures: Figures) -> str:
    """The run as a table: measured figure, target, verdict."""
    meta = figures.get("meta", {})
    machine = meta.get("machine", {})
    versions = meta.get("versions", {})
    rows: list[tuple[str, str, str, str]] = []

    def row(label: str, value: str, target: str = "", verdict: str = "") -> None:
        rows.append((label, value, target, verdict))

    tp = figures.get("throughput")
    if tp:
        row(
            f"end-to-end throughput, {tp['workers']} workers x {tp['slots']} slots, "
            f"{tp['received']}/{tp['tasks']} tasks",
            f"{_n(tp['tasks_per_s'])} tasks/s",
            f">= {TARGETS['throughput']:,.0f}",
            _verdict(tp["tasks_per_s"] >= TARGETS["throughput"]),
        )
    rivals = figures.get("rivals") or {}
    for skipped in rivals.get("skipped", []):
        row("skipped", skipped)
    for run in rivals.get("runs", []):
        framework = run["rival"].split("-")[0]
        label = f"{run['label']} ({framework} {versions.get(framework, '')}), closed loop"
        row(label, f"{_n(run['tasks_per_s'])} tasks/s")
    for framework in ("celery", "dramatiq"):
        r = ratio(figures, framework)
        if r is not None:
            target = f">= {TARGETS[framework]:.0f}x"
            row(f"Sluicegate / {framework} (best)", f"{r:.2f}x", target, _verdict(r >= TARGETS[framework]))
    for lat in (figures.get("latency") or {}).values():
        where = f"{lat['offered_per_s']:.0f}/s open loop, {lat['streams']} streams"
        p99 = lat["receipt_ms"].get("p99")
        ok = None if p99 is None or math.isnan(p99) else p99 <= TARGETS["receipt_p99_ms"]
        lost = lat["submitted"] - lat["received"]
        notes = [f"{lost} missing"] if lost else []
        notes += [f"{lat['requeued']} requeued"] if lat.get("requeued") else []
        note = f" ({', '.join(notes)})" if notes else ""
        row(
            f"submit→receipt p50/p90/p99/max ms, {where}{note}",
            _dist(lat["receipt_ms"]),
            f"p99 <= {TARGETS['receipt_p99_ms']:.0f}",
            _verdict(ok),
        )
        row(f"submit→result  p50/p90/p99/max ms, {where}", _dist(lat["result_ms"]))
        row(f"  CPU % of a core during it ({_cpu_names(lat)})", _cpu_values(lat))
    for lat in figures.get("sweep") or []:
        where = f"{lat['offered_per_s']:.0f}/s open loop, {lat['streams']} streams"
        row(f"sweep: submit→receipt p50/p90/p99/max ms, {where}", _dist(lat["receipt_ms"]))
        row(f"sweep: submit→result  p50/p90/p99/max ms, {where}", _dist(lat["result_ms"]))
        row(f"  CPU % of a core during it ({_cpu_names(lat)})", _cpu_values(lat))
    stall = figures.get("stall") or {}
    for run in stall.get("open_loop", []):
        base = run.get("baseline_receipt_p99_ms")
        p99 = run["latency"]["receipt_ms"]["p99"]
        factor = p99 / base if base and not math.isnan(p99) and not math.isnan(base) else None
        where = f"{run['offered_per_s']:.0f}/s open loop"
        row(
            f"stall {stall['stalled']}/{stall['workers']} not reading, {where}: healthy receipt p99 vs no stall",
            f"{_n(p99, 1)} vs {_n(base, 1)} ms ({_n(factor, 2)}x)",
            f"<= {TARGETS['stall_p99_factor']:.0f}x",
            _verdict(None if factor is None else factor <= TARGETS["stall_p99_factor"]),
        )
        row(
            f"  healthy: submit→result p50/p90/p99/max ms (p99 without: {_n(run.get('baseline_result_p99_ms'), 1)})",
            _dist(run["latency"]["result_ms"]),
        )
        row("  every task: submit→result p50/p90/p99/max ms", _dist(run["latency_all"]["result_ms"]))
        rq = run["requeues"]
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(rq["reasons"].items())) or "none"
        row(
            f"  requeue→re-receipt p50/p90/p99/max ms ({rq['tasks']} requeued: {reasons})",
            _dist(rq["requeue_to_receipt_ms"]),
        )
    stp = stall.get("throughput")
    if stp:
        row(
            f"stall {stall['stalled']}/{stall['workers']}, closed loop: healthy workers' throughput vs no stall",
            f"{_n(stp['healthy_tasks_per_s'])} vs {_n(stp.get('baseline_tasks_per_s'))} tasks/s",
        )
        rq = stp["requeues"]
        row(
            f"  requeue→re-receipt p50/p90/p99/max ms ({rq['tasks']} requeued, behind the backlog)",
            _dist(rq["requeue_to_receipt_ms"]),
        )
    memory = figures.get("memory")
    if memory:
        row(
            f"dispatcher memory per idle stream ({memory['streams']} streams)",
            f"{_n(memory['bytes_per_stream'] / 1024, 1)} KiB",
            f"<= {TARGETS['bytes_per_stream'] / 1024:.0f} KiB",
            _verdict(memory["bytes_per_stream"] <= TARGETS["bytes_per_stream"]),
        )
        row(
            "dispatcher with those streams idle: RSS, CPU",
            f"{_n(memory['rss_after_bytes'] / 2**20, 1)} MiB, {_n(memory['idle_cpu_pct'])}% of a core",
        )
    if tp:
        cpu = tp["cpu_us_per_task"]
        names = [n for n in ("scheduler", "dispatcher", "workers", "client", "broker") if n in cpu]
        row(
            f"CPU µs per task: {' / '.join(names)}",
            " / ".join(_n(cpu[n]) for n in names),
        )
        util = tp["cpu_util_pct"]
        row(f"CPU % of a core during it: {' / '.join(names)}", " / ".join(_n(util[n]) for n in names))
        row("other processes on the machine during it", f"{_n(tp['other_processes_pct'])}% of a core")
    for run in rivals.get("runs", []):
        cpu = run["cpu_us_per_task"]
        row(f"{run['rival']}: CPU µs per task worker / client", " / ".join(_n(v) for v in cpu.values()))

    width = [max(len(r[i]) for r in rows) if rows else 0 for i in range(4)]
    header = (
        f"Sluicegate benchmark {meta.get('date', '')} UTC, commit {meta.get('commit', '-')}: "
        f"{machine.get('nproc')} cores, {machine.get('memory_gib')} GiB, {machine.get('cpu')}; "
        f"{versions.get('broker', '')}, Python {versions.get('python', '')}"
    )
    lines = [header, f"command: {meta.get('command', '')}", ""]
    for a, b, c, d in [("", "", "target", ""), *rows]:
        lines.append(f"{a:<{width[0]}}  {b:>{width[1]}}  {c:<{width[2]}}  {d}".rstrip())
    for profile in (figures.get("profile") or {}).values():
        lines += ["", f"Profile (py-spy, main thread), {profile['what']}; stacks in {profile['dir']}:"]
        for name, p in profile["processes"].items():
            hot = ", ".join(f"{f} {pct:.0f}%" for f, pct in p["inclusive"][:8])
            own = ", ".join(f"{f} {pct:.0f}%" for f, pct in p["self"][:5])
            lines.append(f"  {name} ({p['samples']} samples)")
            lines.append(f"    inclusive: {hot}")
            lines.append(f"    self:      {own}")
    errors = figures.get("errors") or {}
    if errors:
        lines.append("")
        lines += [f"FAILED {phase}: {message}" for phase, message in errors.items()]
    return "\n".join(lines)


def write_json(figures: Figures, path: Path) -> None:
    path.write_text(json.dumps(figures, indent=2, default=str) + "\n")


# BENCHMARKS.md


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rival_cell(run: Figures | None) -> str:
    return f"{_n(run['tasks_per_s'])} ({run['label']})" if run else "-"


def record_row(figures: Figures) -> str:
    meta = figures.get("meta", {})
    machine = meta.get("machine", {})
    v = meta.get("versions", {})
    tp = figures.get("throughput") or {}
    lat = figures.get("latency") or {}
    receipts = [lat[k]["receipt_ms"] for k in lat]
    stall = figures.get("stall") or {}
    memory = figures.get("memory") or {}
    cpu = tp.get("cpu_us_per_task") or {}
    parts = [
        f"{_n(r['latency']['receipt_ms']['p99'], 1)} vs {_n(r.get('baseline_receipt_p99_ms'), 1)} ms "
        f"@{r['offered_per_s']:.0f}/s"
        for r in stall.get("open_loop", [])
    ]
    if stall.get("throughput"):
        parts.append(f"{_n(stall['throughput']['healthy_tasks_per_s'])} vs {_n(tp.get('tasks_per_s'))}/s")
    stall_cell = "; ".join(parts) or "-"
    first = (stall.get("open_loop") or [{}])[0]
    requeue = (first.get("requeues") or {}).get("requeue_to_receipt_ms") or {}
    cells = [
        meta.get("date", ""),
        meta.get("commit", ""),
        f"{machine.get('nproc')} cores, {machine.get('memory_gib')} GiB, {machine.get('cpu')}",
        f"Python {v.get('python')}, sluicegate {v.get('sluicegate')}, aio-pika {v.get('aio-pika')}, "
        f"grpcio {v.get('grpcio')}, protobuf {v.get('protobuf')}, uvloop {v.get('uvloop')}, "
        f"celery {v.get('celery')}, dramatiq {v.get('dramatiq')}, {v.get('broker')}",
        f"`{meta.get('command', '')}`",
        _n(tp.get("tasks_per_s")),
        " / ".join(_rival_cell(best_rival(figures, f)) for f in ("celery", "dramatiq")),
        " / ".join("-" if (r := ratio(figures, f)) is None else f"{r:.2f}x" for f in ("celery", "dramatiq")),
        " / ".join(f"{_n(d.get('p50'), 1)}/{_n(d.get('p99'), 1)}" for d in receipts) or "-",
        stall_cell,
        _n(requeue.get("p99"), 0) if requeue.get("count") else "-",
        _n(memory["bytes_per_stream"] / 1024, 1) if memory else "-",
        " / ".join(_n(cpu.get(k)) for k in ("scheduler", "dispatcher", "workers", "client", "broker")) if cpu else "-",
        f"{_n(tp.get('other_processes_pct'))}%" if tp else "-",
    ]
    if figures.get("errors"):
        cells[4] += " (failed: " + ", ".join(figures["errors"]) + ")"
    return "| " + " | ".join(_cell(str(c)) for c in cells) + " |"


def _header() -> list[str]:
    return ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]


def record(figures: Figures, path: Path) -> Path:
    """Append the run as one row of the results table in `path` (created, with the table, if missing)."""
    row = record_row(figures)
    if not path.exists():
        path.write_text(f"# Benchmarks\n\n{RESULTS_HEADING}\n\n" + "\n".join([*_header(), row]) + "\n")
        return path
    lines = path.read_text().splitlines()
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
