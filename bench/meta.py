"""What a run records about itself: the command, the machine, the versions and the sizes."""

from __future__ import annotations

import datetime
import importlib.metadata
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


def metadata(options: Options, command: str, broker: str) -> Figures:
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
            "rates": options.rates,
            "producers": options.producers,
            "ack_timeout": options.ack_timeout,
        },
    }
