"""What the benchmark prints: closed loop, the open-loop curves side by side, CPU per task per process."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

Figures = dict[str, Any]

TARGETS = {
    "throughput": 5000.0,  # tasks/s, closed loop
    "celery": 10.0,  # Sluicegate / Celery, closed loop
    "dramatiq": 2.0,  # Sluicegate / Dramatiq, closed loop
    "many_workers": 0.8,  # throughput of the many-worker fleet / of the main one
    "receipt_p99_ms": 25.0,  # open loop, at every rate up to half the open-loop capacity
    "open_capacity": 2000.0,  # tasks/s the open loop keeps up with
    "stall_p99_factor": 2.0,  # healthy p99 under a stall / without
    "bytes_per_stream": 64 * 1024.0,
    "connect_s": 30.0,  # the idle streams' workers, started at once, all registered and streaming
}
PROCESSES = ("scheduler", "dispatcher", "workers", "client", "broker")


def n(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "NOT MET")


def best_rival(figures: Figures, framework: str) -> Figures | None:
    """The fastest closed-loop run of one framework (celery or dramatiq)."""
    runs = [r for r in (figures.get("rivals") or {}).get("runs") or [] if r["rival"].startswith(framework)]
    return max(runs, key=lambda r: r["tasks_per_s"]) if runs else None


def main_throughput(figures: Figures) -> Figures | None:
    """The closed loop of the main fleet (the first one measured)."""
    runs = list((figures.get("throughput") or {}).values())
    return runs[0] if runs else None


def ratio(figures: Figures, framework: str) -> float | None:
    best = best_rival(figures, framework)
    tp = main_throughput(figures)
    if not best or not tp or not best["tasks_per_s"]:
        return None
    return float(tp["tasks_per_s"]) / float(best["tasks_per_s"])


def kept_up(point: Figures) -> bool:
    """Whether a curve point kept up with its rate: every task started, at 90 % of the offered rate or more."""
    return bool(point["started"] == point["submitted"] and point["started_per_s"] >= 0.9 * point["offered_per_s"])


def open_capacity(points: list[Figures]) -> float | None:
    """The highest offered rate the system kept up with (None if it kept up with none)."""
    rates = [p["offered_per_s"] for p in points if kept_up(p)]
    return max(rates) if rates else None


def cpu_line(cpu: Figures) -> str:
    """Every process role in PROCESSES order ("-" where a system has none), then the sum."""
    return " / ".join(n(cpu.get(k)) for k in PROCESSES) + f" = {n(sum(cpu.get(k, 0.0) for k in PROCESSES))}"


def _cell(point: Figures | None) -> str:
    if point is None:
        return "-"
    d = point["receipt_ms"]
    late = "" if kept_up(point) else f", kept up {n(point['started_per_s'])}/s"
    return f"{n(d['p50'], 1)} / {n(d['p99'], 1)}{late}"


def curve_table(figures: Figures) -> list[str]:
    """The open-loop curves side by side: rate → submit→start p50 / p99 per system."""
    curves: dict[str, list[Figures]] = figures.get("curves") or {}
    if not curves:
        return []
    rates = sorted({p["offered_per_s"] for points in curves.values() for p in points})
    by_rate = {key: {p["offered_per_s"]: p for p in points} for key, points in curves.items()}
    header = ["rate/s", *curves]
    body = [[n(rate), *(_cell(by_rate[key].get(rate)) for key in curves)] for rate in rates]
    width = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    producers = next(iter(curves.values()))[0]["producers"] if next(iter(curves.values())) else 0
    lines = [
        f"Open loop, one task per submit from {producers} producer processes: submit→handler start p50 / p99 ms",
        f"(target: p99 <= {TARGETS['receipt_p99_ms']:.0f} ms at every rate up to half the open-loop capacity, "
        f"capacity >= {TARGETS['open_capacity']:,.0f}/s)",
    ]
    lines += ["  " + "  ".join(c.ljust(width[i]) for i, c in enumerate(row)).rstrip() for row in [header, *body]]
    for key, points in curves.items():
        capacity = open_capacity(points)
        half = [p for p in points if capacity is not None and p["offered_per_s"] <= capacity / 2]
        ok = None if not half else all(p["receipt_ms"]["p99"] <= TARGETS["receipt_p99_ms"] for p in half)
        if key.startswith("sluicegate"):
            met = False if capacity is None or capacity < TARGETS["open_capacity"] else ok
            lines.append(f"  {key}: kept up with {n(capacity)}/s of the rates tried; target {_verdict(met)}")
    lines += ["", f"CPU µs per task per process, open loop ({' / '.join(PROCESSES)} = all):"]
    for key, points in curves.items():
        for p in points:
            lines.append(f"  {key} @ {n(p['offered_per_s'])}/s: {cpu_line(p['cpu_us_per_task'])}")
    return lines


def table(figures: Figures) -> str:
    """The run as text: measured figure, target, verdict; then the curves."""
    meta = figures.get("meta", {})
    machine = meta.get("machine", {})
    versions = meta.get("versions", {})
    rows: list[tuple[str, str, str, str]] = []

    def row(label: str, value: str, target: str = "", verdict: str = "") -> None:
        rows.append((label, value, target, verdict))

    throughput = figures.get("throughput") or {}
    main = main_throughput(figures)
    for tp in throughput.values():
        target, verdict = f">= {TARGETS['throughput']:,.0f}", _verdict(tp["tasks_per_s"] >= TARGETS["throughput"])
        if main is not None and tp is not main:
            share = tp["tasks_per_s"] / main["tasks_per_s"] if main["tasks_per_s"] else math.nan
            target = f">= {TARGETS['many_workers']:.0%} of {main['workers']} workers"
            verdict = f"{share:.0%}, " + _verdict(share >= TARGETS["many_workers"])
        row(
            f"closed loop, {tp['workers']} workers x {tp['slots']} slots, {tp['received']}/{tp['tasks']} tasks",
            f"{n(tp['tasks_per_s'])} tasks/s",
            target,
            verdict,
        )
    rivals = figures.get("rivals") or {}
    for skipped in rivals.get("skipped", []):
        row("skipped", skipped)
    for run in rivals.get("runs", []):
        framework = run["rival"].split("-")[0]
        label = f"closed loop, {run['label']} ({framework} {versions.get(framework, '')})"
        row(label, f"{n(run['tasks_per_s'])} tasks/s")
    for framework in ("celery", "dramatiq"):
        r = ratio(figures, framework)
        if r is not None:
            target = f">= {TARGETS[framework]:.0f}x"
            row(f"Sluicegate / {framework} (best), closed loop", f"{r:.2f}x", target, _verdict(r >= TARGETS[framework]))
    stall = figures.get("stall") or {}
    if ol := stall.get("open_loop"):
        p99, base = ol["healthy_receipt_ms"]["p99"], ol.get("baseline_receipt_p99_ms")
        factor = p99 / base if base and not math.isnan(p99) else None
        row(
            f"stall {stall['stalled']}/{stall['workers']} not reading, {n(ol['offered_per_s'])}/s open loop: "
            "healthy submit→start p99 vs no stall",
            f"{n(p99, 1)} vs {n(base, 1)} ms",
            f"<= {TARGETS['stall_p99_factor']:.0f}x",
            _verdict(None if factor is None else factor <= TARGETS["stall_p99_factor"]),
        )
        rq = ol["requeues"]
        row(f"  requeued {rq['tasks']}: requeue→re-start p99 ms", n(rq["requeue_to_receipt_ms"]["p99"], 1))
    if memory := figures.get("memory"):
        row(
            f"dispatcher memory per idle stream ({memory['streams']} streams)",
            f"{n(memory['bytes_per_stream'] / 1024, 1)} KiB",
            f"<= {TARGETS['bytes_per_stream'] / 1024:.0f} KiB",
            _verdict(memory["bytes_per_stream"] <= TARGETS["bytes_per_stream"]),
        )
        row(
            f"  {memory['streams']} workers started at once, all streaming",
            f"{n(memory['connect_s'], 1)} s",
            f"<= {TARGETS['connect_s']:.0f} s",
            _verdict(memory["connect_s"] <= TARGETS["connect_s"]),
        )
        row("  dispatcher CPU with them idle", f"{n(memory['idle_cpu_pct'])}% of a core")
    for tp in throughput.values():
        row(
            f"CPU µs per task, closed loop, {tp['workers']} workers ({' / '.join(PROCESSES)} = all)",
            cpu_line(tp["cpu_us_per_task"]),
        )
        row("  other processes on the machine during it", f"{n(tp['other_processes_pct'])}% of a core")
    for run in rivals.get("runs", []):
        row(f"CPU µs per task, closed loop, {run['label']}", cpu_line(run["cpu_us_per_task"]))

    width = [max((len(r[i]) for r in rows), default=0) for i in range(4)]
    lines = [
        f"Sluicegate benchmark {meta.get('date', '')} UTC, commit {meta.get('commit', '-')}: "
        f"{machine.get('nproc')} cores, {machine.get('memory_gib')} GiB, {machine.get('cpu')}; "
        f"{versions.get('broker', '')}, Python {versions.get('python', '')}",
        f"command: {meta.get('command', '')}",
        "",
    ]
    for a, b, c, d in [("", "", "target", ""), *rows]:
        lines.append(f"{a:<{width[0]}}  {b:>{width[1]}}  {c:<{width[2]}}  {d}".rstrip())
    lines += ["", *curve_table(figures)]
    if profile := figures.get("profile"):
        lines += ["", f"Profile (py-spy, main thread), {profile['what']}; stacks in {profile['dir']}:"]
        for name, p in profile["processes"].items():
            lines.append(f"  {name} ({p['samples']} samples)")
            lines.append("    inclusive: " + ", ".join(f"{f} {pct:.0f}%" for f, pct in p["inclusive"][:8]))
            lines.append("    self:      " + ", ".join(f"{f} {pct:.0f}%" for f, pct in p["self"][:5]))
    errors = figures.get("errors") or {}
    lines += ["", *(f"FAILED {phase}: {message}" for phase, message in errors.items())] if errors else []
    return "\n".join(lines)


def write_json(figures: Figures, path: Path) -> None:
    path.write_text(json.dumps(figures, indent=2, default=str) + "\n")
