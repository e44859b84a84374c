"""`python -m bench`: parse, set up logging, run on uvloop."""

from __future__ import annotations

import argparse
import sys

import uvloop

from bench.options import add_arguments
from bench.runner import run
from sluicegate.logs import configure
from sluicegate.settings import LogSettings, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure(load(LogSettings, level=args.log_level or "WARNING"))
    try:
        return uvloop.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
