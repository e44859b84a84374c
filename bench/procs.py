"""Child processes of the benchmark: start them in their own process group, measure them, always stop them.

Every child is started with `start_new_session=True` (its process group id is its pid, so stopping
it reaches its own children, such as Celery's pool processes, and nothing else) and with a
parent-death signal, so that even a benchmark killed with SIGKILL takes its children with it.
`Processes.stop_all` runs on every exit path; an `atexit` hook is the last resort.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_PR_SET_PDEATHSIG = 1
RUN_ENV = "SLUICEGATE_BENCH_RUN"  # every child carries the run id, so leftovers can be found
ROOT = Path(__file__).resolve().parents[1]  # the repository: children import `bench` from it


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def merged(values: dict[str, float]) -> dict[str, float]:
    """Per-process figures with numbered processes of one role summed: `workers0` + `workers1` -> `workers`."""
    out: dict[str, float] = {}
    for name, value in values.items():
        role = name.rstrip("0123456789")
        out[role] = out.get(role, 0.0) + value
    return out


def system_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine so far (all cores, idle and iowait excluded)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


async def wait_until_quiet(limit: float, *, busy_below: float = 0.15, window: float = 3.0) -> bool:
    """Wait (at most `limit` seconds) until the machine has been nearly idle for three windows in a row."""
    cores = os.cpu_count() or 1
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    quiet = 0
    while loop.time() < deadline:
        before = system_busy_seconds()
        await asyncio.sleep(window)
        share = (system_busy_seconds() - before) / (window * cores)
        quiet = quiet + 1 if share < busy_below else 0
        if quiet >= 3:
            return True
    return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (0.0 once it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # Fields after the name start at field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children_of(pid: int) -> list[int]:
    """Every live descendant of `pid`."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its live descendants."""
    return cpu_seconds(pid) + sum(cpu_seconds(child) for child in children_of(pid))


def rss_bytes(pid: int) -> int:
    """Resident set size of one process, in bytes (0 once it is gone)."""
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * PAGE_SIZE


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on `port` (any address)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    found.add(fields[9])
    return found


def find_broker_pid(port: int = 5672) -> int | None:
    """The local RabbitMQ node listening on `port` (a beam.smp process), if it runs here; read-only.

    Other RabbitMQ nodes may run on the machine (private ones of other tests): the one that holds
    the listening socket is the broker the benchmark uses.
    """
    sockets = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(entry, "comm").read_text().strip() != "beam.smp":
                continue
            if any(os.readlink(fd) in sockets for fd in Path(entry, "fd").iterdir()):
                return int(entry.name)
        except OSError:
            continue
    return None


class Child:
    """One child process: its command, its log file and how to stop it."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log_path: Path, log_file: IO[bytes]) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path
        self._log_file = log_file

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def send_signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill_group(self) -> None:
        """SIGKILL the child's own process group (its pid): the child and whatever it started."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.popen.wait(timeout=5)
        self._close_log()

    def _close_log(self) -> None:
        with contextlib.suppress(Exception):
            self._log_file.close()
        for pipe in (self.popen.stdout, self.popen.stdin):
            if pipe is not None:
                with contextlib.suppress(Exception):
                    pipe.close()

    async def stop(self, grace: float = 10.0, sig: int | None = signal.SIGTERM) -> int | None:
        """Send `sig`, wait up to `grace` seconds, then SIGKILL the group; returns the exit code."""
        if sig is not None:
            self.send_signal(sig)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.alive() and loop.time() < deadline:  # noqa: ASYNC110 - polling a child's exit
            await asyncio.sleep(0.05)
        code = self.popen.poll()
        self.kill_group()  # also reaps anything the child left behind in its group
        return code

    def write_line(self, line: str) -> None:
        """Send one line to the child's stdin (started with `stdin=True`)."""
        if self.popen.stdin is None:
            raise RuntimeError(f"{self.name} has no stdin pipe")
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()

    async def read_line(self, timeout: float) -> str:
        """The next line the child prints on stdout (started with `stdout=True`)."""
        if self.popen.stdout is None:
            raise RuntimeError(f"{self.name} has no stdout pipe")
        line = await asyncio.wait_for(asyncio.to_thread(self.popen.stdout.readline), timeout)
        if not line:
            raise RuntimeError(f"{self.name} exited before it was ready:\n{self.log_tail()}")
        return line.decode(errors="replace").strip()


class Processes:
    """Every child the benchmark started; `stop_all` ends those still running."""

    def __init__(self, log_dir: Path, run_id: str = "") -> None:
        self.log_dir = log_dir
        self.run_id = run_id
        self.children: list[Child] = []
        atexit.register(self._kill_all_now)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stdout: bool = False,
        stdin: bool = False,
    ) -> Child:
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("ab")
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout else log_file,
            stderr=log_file,
            env={**os.environ, RUN_ENV: self.run_id, "PYTHONPATH": path, **(env or {})},
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        child = Child(name, popen, log_path, log_file)
        self.children.append(child)
        return child

    async def stop(self, children: Iterable[Child], grace: float = 10.0) -> None:
        await asyncio.gather(*(child.stop(grace) for child in children))

    async def stop_all(self, grace: float = 10.0) -> None:
        await self.stop([c for c in self.children if c.alive()], grace)
        self._kill_all_now()

    def _kill_all_now(self) -> None:
        for child in self.children:
            if child.alive():
                child.kill_group()
            else:
                child._close_log()


def python_module(module: str, *args: str) -> list[str]:
    """argv that runs `python -m module args` with this interpreter."""
    return [sys.executable, "-m", module, *args]


async def wait_for_port(child: Child, port: int, timeout: float = 30.0) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:`port`; fail early if `child` died."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited (code {child.popen.poll()}):\n{child.log_tail()}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > deadline:
                raise RuntimeError(f"{child.name} did not listen on port {port} within {timeout:.0f}s") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return


class CpuMeter:
    """CPU seconds of named processes between `start` and `stop`."""

    def __init__(self, pids: dict[str, int], *, trees: frozenset[str] = frozenset()) -> None:
        self.pids = pids
        self.trees = trees
        self._before: dict[str, float] = {}
        self.used: dict[str, float] = {}
        self.wall = 0.0
        self._started = 0.0

    def _read(self, name: str) -> float:
        pid = self.pids[name]
        return tree_cpu_seconds(pid) if name in self.trees else cpu_seconds(pid)

    def start(self) -> None:
        self._before = {name: self._read(name) for name in self.pids}
        self._started = time.monotonic()

    def stop(self) -> dict[str, float]:
        self.wall = time.monotonic() - self._started
        self.used = {name: self._read(name) - before for name, before in self._before.items()}
        return self.used
