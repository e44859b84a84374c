"""Run the chaos suite (tests/chaos) and write its Jepsen-style results table into RELIABILITY.md.

    .venv/bin/python scripts/chaos.py            # the full suite (>= 3,000 tasks per scenario)
    .venv/bin/python scripts/chaos.py --fast     # the fast subset CI runs
    .venv/bin/python scripts/chaos.py -k drain   # one scenario (extra arguments go to pytest)

The table replaces whatever is between the `chaos:results` markers of RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "RELIABILITY.md"
START, END = "<!-- chaos:results:start -->", "<!-- chaos:results:end -->"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def _rabbitmq_version() -> str:
    for path in Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*"):
        return path.name.removeprefix("rabbitmq_server-")
    return "?"


def _memory() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "?"


def _ms(spread: dict[str, float] | None) -> str:
    return "-" if not spread else f"{spread['p50']:.0f} / {spread['p99']:.0f} / {spread['max']:.0f}"


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | size | submitted | completed | failed | dead | lost | undelivered | duplicated "
        "| fenced (worker stale / dup dropped / dispatcher stale) | stale accepted | requeued (by reason) "
        "| requeue ms p50 / p99 / max | reassign ms p50 / p99 / max | latency ms p50 / p99 / max "
        "| rate /s | outcome |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|---|---|---:|---|\n"
    )
    lines = []
    for r in rows:
        fenced = " / ".join(str(v) for v in r["fenced"].values()) or "-"
        requeued = ", ".join(f"{k} {v}" for k, v in r["requeued"].items()) or "0"
        lines.append(
            f"| {r['scenario']} | {r['size']} | {r['submitted']} | {r['completed']} | {r['failed']} | {r['dead']} "
            f"| {r['lost']} | {_cell(r['undelivered_to_client'])} | {r['duplicated']} | {fenced} "
            f"| {r['stale_accepted']} | {requeued} | {_ms(r['time_to_requeue_ms'])} | {_ms(r['time_to_reassign_ms'])} "
            f"| {_ms(r['latency_ms'])} | {r['completion_rate_per_s']} | {r.get('outcome', '?')} |"
        )
    return head + "\n".join(lines) + "\n"


def extras(rows: list[dict[str, Any]]) -> str:
    standard = {
        "scenario", "size", "submitted", "confirmed", "completed", "failed", "dead", "rejected", "lost", "lost_ids",
        "undelivered_to_client", "duplicated", "duplicated_ids", "double_completed", "client_duplicates", "fenced",
        "stale_accepted", "stale_ids", "requeued", "requeue_copies", "time_to_requeue_ms", "time_to_reassign_ms",
        "latency_ms", "completion_rate_per_s", "faults", "outcome",
    }  # fmt: skip
    out = []
    for r in rows:
        rest = {k: v for k, v in r.items() if k not in standard}
        out.append(f"- **{r['scenario']}** ({r['size']}): " + ", ".join(f"{k} {v}" for k, v in rest.items()))
    return "\n".join(out) + "\n"


def outcomes(junit: Path) -> dict[str, str]:
    """scenario name -> passed / failed / xfailed (known bug), from pytest's junit report."""
    text = junit.read_text() if junit.exists() else ""
    result = {}
    for match in re.finditer(r'<testcase [^>]*name="test_(\w+)\[(\w+)\]"[^>]*?(/>|>(.*?)</testcase>)', text, re.S):
        name, body = match.group(1), match.group(4) or ""
        if "<failure" in body or "<error" in body:
            result[name] = "**failed**"
        elif ("<skipped" in body and "xfail" in body.lower()) or "KNOWN BUG" in body:
            result[name] = "xfail: known bug"
        elif "<skipped" in body:
            result[name] = "skipped"
        else:
            result[name] = "passed"
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="the fast subset instead of the full suite")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RELIABILITY.md alone")
    args, pytest_args = parser.parse_known_args()
    mode = "fast" if args.fast else "full"
    with tempfile.TemporaryDirectory() as tmp:
        results, junit = Path(tmp) / "results.json", Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "tests/chaos", "-p", "no:cacheprovider", "-q", *pytest_args]
        env = {**os.environ, "SLUICEGATE_CHAOS": mode, "SLUICEGATE_CHAOS_RESULTS": str(results)}
        started = datetime.datetime.now(datetime.UTC)
        code = subprocess.call([*command, f"--junitxml={junit}"], cwd=ROOT, env=env)
        rows = json.loads(results.read_text()) if results.exists() else []
        verdicts = outcomes(junit)
    for row in rows:
        row["outcome"] = verdicts.get(row["scenario"], "passed" if row["scenario"].endswith("baseline") else "?")
    shown = f"SLUICEGATE_CHAOS={mode} " + shlex.join(["python", *command[1:]])
    block = (
        f"{START}\n"
        f"Run {started:%Y-%m-%d %H:%M} UTC, pytest exit code {code}, on {platform.node() or 'this machine'}: "
        f"{os.cpu_count()} CPUs (`nproc`), {_memory()} memory, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, RabbitMQ {_rabbitmq_version()}, aio-pika {_version('aio-pika')}, "
        f"aiormq {_version('aiormq')}, grpcio {_version('grpcio')}, uvloop {_version('uvloop')}.\n\n"
        f"Command: `python scripts/chaos.py{' --fast' if args.fast else ''}`, which runs `{shown}`.\n\n"
        + table(rows)
        + "\nOther figures per scenario:\n\n"
        + extras(rows)
        + f"{END}"
    )
    print(block)
    if not args.no_write and rows:
        text = REPORT.read_text() if REPORT.exists() else f"# Reliability\n\n{START}\n{END}\n"
        if START not in text:
            text += f"\n{START}\n{END}\n"
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
        REPORT.write_text(text)
        print(f"wrote {REPORT}")
    return code


if __name__ == "__main__":
    sys.exit(main())
