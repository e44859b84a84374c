"""Benchmarks of the whole dispatch path against a real broker, side by side with Celery.

    python -m sluicegate.bench [--quick] [--tasks N] [--workers N] [--record] [--profile DIR]

`main` is the command-line entry; `add_arguments` and `run` let another command (such as
`sluicegate bench`) offer the same options. See BENCHMARKS.md for what is measured and how.
"""

from __future__ import annotations

import argparse
from collections.abc import Coroutine
from typing import Any

from sluicegate.bench.options import add_arguments

__all__ = ["add_arguments", "main", "run"]


async def run(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments (those `add_arguments` added); returns the exit code."""
    from sluicegate.bench.runner import run as run_bench

    return await run_bench(args)


def main(argv: list[str] | None = None) -> int:
    """`python -m sluicegate.bench`: parse, set up logging, run on uvloop."""
    import asyncio

    from sluicegate.logs import configure
    from sluicegate.settings import LogSettings, load

    parser = argparse.ArgumentParser(prog="python -m sluicegate.bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser, standalone=True)
    args = parser.parse_args(argv)
    configure(load(LogSettings, level=args.log_level or "WARNING"))
    coro: Coroutine[Any, Any, int] = run(args)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is absent on some platforms
        return asyncio.run(coro)
    try:
        return uvloop.run(coro)
    except KeyboardInterrupt:
        return 130
