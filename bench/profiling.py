"""Sampling profiles of the benchmark's processes with py-spy, and what they say in a few lines.

py-spy (`pip install py-spy`) attaches to a running process by pid, so the processes under test
need no change. It records Python stacks of threads that are running, not idle ones: the shares
below are of the process's busy samples. Native frames (gRPC's C core, protobuf's upb) are
attributed to the Python call that entered them.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Child, Processes

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy_path() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


# Frames that only say "the event loop ran something": left out of the inclusive ranking.
WRAPPERS = (
    "runpy:",
    "<module>",
    "cli:main",
    "cli:_run",
    "uvloop/__init__:run",
    "asyncio/runners:",
    "fleet:main",
    "bench/__init__:",
    "bench/runner:",
)


@dataclass(slots=True)
class Profile:
    name: str
    samples: int = 0
    self_counts: Counter[str] = field(default_factory=Counter)
    total_counts: Counter[str] = field(default_factory=Counter)

    def top_self(self, n: int = 8) -> list[tuple[str, float]]:
        return [(f, 100.0 * c / self.samples) for f, c in self.self_counts.most_common(n)] if self.samples else []

    def top_total(self, n: int = 8, *, skip: tuple[str, ...] = WRAPPERS) -> list[tuple[str, float]]:
        if not self.samples:
            return []
        # Frames on (nearly) every stack are the trunk (the event loop, or native start-up frames).
        trunk = 0.97 * self.samples
        rows = [(f, c) for f, c in self.total_counts.most_common() if c < trunk and not any(s in f for s in skip)]
        return [(f, 100.0 * c / self.samples) for f, c in rows[:n]]


def _short(frame: str) -> str:
    """`func (path/to/pkg/module.py:12)` -> `module.func` (the package dirs dropped)."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    file = match["file"].removeprefix("<frozen ").removesuffix(">")
    module = Path(file).stem
    parent = Path(file).parent.name
    where = f"{parent}/{module}" if parent and parent not in ("", ".") else module
    return f"{where}:{match['func']}"


def parse_collapsed(name: str, text: str) -> Profile:
    """Read py-spy's `--format raw --threads` output (collapsed stacks, one `a;b;c count` per line).

    Only the main thread is kept: it runs the event loop, where all of the process's Python
    work happens. gRPC's completion-queue poller thread sits in native code and would be
    counted busy by py-spy although /proc shows it nearly idle.
    """
    per_thread: dict[str, list[tuple[list[str], int]]] = {}
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        raw = [f for f in stack.split(";") if f]
        thread = next((f for f in raw if f.startswith("thread ")), "thread (?)")
        frames = [_short(f) for f in raw if not f.startswith(("process ", "thread "))]
        if frames:
            per_thread.setdefault(thread, []).append((frames, int(count_text)))
    main = [s for s in per_thread.values() if any(f.startswith("runpy:") for frames, _ in s for f in frames)]
    stacks = max(main or list(per_thread.values()) or [[]], key=lambda s: sum(c for _, c in s))
    profile = Profile(name)
    for frames, count in stacks:
        profile.samples += count
        profile.self_counts[frames[-1]] += count
        for frame in set(frames):
            profile.total_counts[frame] += count
    return profile


class Recorder:
    """py-spy record on several processes at once, stopped with SIGINT so that it writes its output."""

    def __init__(self, procs: Processes, out_dir: Path, rate: int = 100, *, native: bool = False) -> None:
        self.procs = procs
        self.out_dir = out_dir
        self.rate = rate
        self.native = native
        self.running: dict[str, tuple[Child, Path]] = {}

    def start(self, targets: dict[str, int]) -> None:
        exe = py_spy_path()
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in targets.items():
            out = self.out_dir / f"{name.replace(' ', '-')}.collapsed.txt"
            argv = [exe, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw", "--threads"]
            argv += ["--output", str(out), *(["--native"] if self.native else [])]
            self.running[name] = (self.procs.start(f"py-spy-{name.replace(' ', '-')}", argv), out)

    async def stop(self) -> dict[str, Profile]:
        for child, _ in self.running.values():
            child.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        await asyncio.gather(*(child.stop(grace=30.0, sig=None) for child, _ in self.running.values()))
        profiles: dict[str, Profile] = {}
        for name, (_, out) in self.running.items():
            if out.exists():
                profiles[name] = parse_collapsed(name, out.read_text(errors="replace"))
        self.running.clear()
        return profiles
