"""A fleet of N Sluicegate workers in one process, serving the benchmark's no-op action.

    python -m bench.fleet --dispatchers 127.0.0.1:50051 --workers 20 --slots 10

Prints `ready N` on stdout once every worker has registered. Signals: SIGUSR1 makes the first
`--stall-count` workers stop reading their streams (`Worker.stop_reading`), SIGUSR2 resumes them,
SIGTERM or SIGINT stops the fleet. Worker ids are `<name>-0000`, `<name>-0001`, ... so the
benchmark knows which ones it stalled.

Each worker gets its own TCP connection by default, as separate worker processes would; gRPC
would otherwise multiplex every channel of this process over one shared connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import signal
import struct
import sys
import time
from typing import Any

import grpc
import uvloop

from sluicegate.worker import TaskContext, Worker, WorkerSettings

NOOP_ACTION = "bench.noop"
PAYLOAD_BYTES = 512
STAMP = struct.Struct("<d")
RAMP_PAUSE = 0.2  # seconds between two groups of workers connecting
OUTPUT = struct.Struct("<dd")  # (send time carried by the payload, handler start time)


def make_payload(send_time: float, size: int = PAYLOAD_BYTES) -> bytes:
    """A payload of `size` bytes (at least 8) that starts with the scheduled send time."""
    stamp = STAMP.pack(send_time)
    return stamp + bytes(max(0, size - len(stamp)))


def read_output(output: bytes) -> tuple[float, float] | None:
    """(send time, handler start time) from a no-op result, or None if it is not one."""
    if len(output) != OUTPUT.size:
        return None
    sent, started = OUTPUT.unpack(output)
    return sent, started


async def noop(ctx: TaskContext) -> bytes:
    """The benchmark's task: note when the handler started, echo the send time, do nothing else."""
    started = time.time()
    sent = STAMP.unpack_from(ctx.payload)[0] if len(ctx.payload) >= STAMP.size else 0.0
    return OUTPUT.pack(sent, started)


def worker_id(name: str, index: int) -> str:
    return f"{name}-{index:04d}"


def _own_connections() -> None:
    """Give every gRPC channel of this process its own connection (a local subchannel pool)."""
    original = grpc.aio.insecure_channel

    @functools.wraps(original)
    def insecure_channel(target: str, options: Any = None, *args: Any, **kwargs: Any) -> Any:
        merged = [*(options or ()), ("grpc.use_local_subchannel_pool", 1)]
        return original(target, merged, *args, **kwargs)

    grpc.aio.insecure_channel = insecure_channel


async def run_fleet(args: argparse.Namespace) -> int:
    settings = WorkerSettings(dispatchers=args.dispatchers, slots=args.slots)
    fleet = []
    for i in range(args.workers):
        worker = Worker(settings=settings, worker_id=worker_id(args.name, i))
        worker.register(NOOP_ACTION, noop)
        fleet.append(worker)
    stalled = fleet[: args.stall_count]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def stall() -> None:
        for w in stalled:
            w.stop_reading()
        print(f"stalled {','.join(w.worker_id for w in stalled)}", flush=True)

    def resume() -> None:
        for w in stalled:
            w.resume_reading()
        print("resumed", flush=True)

    loop.add_signal_handler(signal.SIGUSR1, stall)
    loop.add_signal_handler(signal.SIGUSR2, resume)
    async with contextlib.AsyncExitStack() as stack:
        for start in range(0, len(fleet), args.ramp or len(fleet)):
            group = fleet[start : start + (args.ramp or len(fleet))]
            for worker in group:
                await stack.enter_async_context(worker)
            if args.ramp and start + len(group) < len(fleet):
                # Connect the next group only once this one has registered (and a moment to open its streams).
                await asyncio.wait_for(asyncio.gather(*(w.registered.wait() for w in group)), args.ready_timeout)
                await asyncio.sleep(RAMP_PAUSE)
        waiting: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*(w.registered.wait() for w in fleet)))
        stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiting, stopped], timeout=args.ready_timeout, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            waiting.cancel()
            if not stop.is_set():
                registered = sum(w.registered.is_set() for w in fleet)
                print(f"failed {registered}/{len(fleet)} registered", flush=True)
                return 1
        else:
            print(f"ready {len(fleet)}", flush=True)
        await stopped
        # All at once (stop() also resumes a stalled worker); the exit stack's stops are then no-ops.
        await asyncio.gather(*(w.stop() for w in fleet))
    completed = sum(w.stats.completed for w in fleet)
    registrations = sum(w.stats.registrations for w in fleet)
    print(f"stopped completed={completed} registrations={registrations}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    parser.add_argument("--dispatchers", required=True, help="comma-separated host:port list")
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--slots", type=int, default=10)
    parser.add_argument("--name", default="bench")
    parser.add_argument("--stall-count", type=int, default=0, help="workers that SIGUSR1 stalls")
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    parser.add_argument("--ramp", type=int, default=0, help="connect this many workers at a time (0: all at once)")
    parser.add_argument("--log-level", default="WARNING")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _own_connections()
    return uvloop.run(run_fleet(args))


if __name__ == "__main__":
    sys.exit(main())
