"""What every `sluicegate` command shares: settings, signals, metrics and traces, help that shows defaults."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import timedelta
from typing import Any, NoReturn

from prometheus_client import CollectorRegistry

from sluicegate.durations import parse_duration
from sluicegate.errors import InvalidInput
from sluicegate.metrics import MetricsServer, MetricsSettings
from sluicegate.settings import BrokerSettings, load
from sluicegate.setup_checks import check_free
from sluicegate.telemetry import setup_tracing, shutdown_tracing

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, unless the help already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default is None:
            return text
        if action.default is False or action.nargs == 0:
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Bad usage is one line naming the command and what is wrong, and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def add_parser(commands: argparse._SubParsersAction[Any], name: str, description: str) -> argparse.ArgumentParser:
    """A subcommand with its one-line description, shown in `sluicegate --help` and its own `--help`."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=description, description=description, formatter_class=HelpFormatter
    )
    return parser


def add_common(parser: argparse.ArgumentParser, *, at_top: bool) -> None:
    """The options every command takes, before its name or after it (after it wins)."""
    default = None if at_top else argparse.SUPPRESS
    group = parser.add_argument_group("common options (before or after the command)") if not at_top else parser
    group.add_argument(
        "--prefix",
        default=default,
        help="prefix of every exchange and queue (default: SLUICEGATE_PREFIX, else sluicegate)",
    )
    group.add_argument(
        "--log-level", default=default, choices=LOG_LEVELS, help="(default: SLUICEGATE_LOG_LEVEL, else INFO)"
    )
    group.add_argument(
        "--log-json",
        action="store_true",
        default=default,
        help="log one JSON object per line (default: SLUICEGATE_LOG_JSON, else off)",
    )


def add_common_everywhere(parser: argparse.ArgumentParser) -> None:
    """Add the common options to every subcommand, however deeply nested."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any("--prefix" in a.option_strings for a in sub._actions):
                    add_common(sub, at_top=False)
                add_common_everywhere(sub)


def stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def broker(args: argparse.Namespace) -> BrokerSettings:
    return load(BrokerSettings, prefix=args.prefix)


def check_metrics() -> None:
    """A bad or taken SLUICEGATE_METRICS_PORT is a setup error found before anything connects."""
    settings = load(MetricsSettings)
    if settings.port:
        check_free(settings.host, settings.port, "the metrics port")


@contextlib.asynccontextmanager
async def observed(registry: CollectorRegistry, ready: Callable[[], bool]) -> AsyncIterator[None]:
    """Serve /metrics, /healthz and /readyz when SLUICEGATE_METRICS_PORT is set."""
    settings = load(MetricsSettings)
    if settings.port is None:
        yield
        return
    try:
        server = MetricsServer(registry, host=settings.host, port=settings.port, ready=ready)
        await server.__aenter__()
    except OSError as err:  # taken since check_metrics looked
        raise InvalidInput(
            f"cannot listen on the metrics port {settings.host}:{settings.port}: {err.strerror}"
        ) from err
    try:
        yield
    finally:
        await server.__aexit__(None, None, None)


def traced(role: str) -> Callable[[Command], Command]:
    """Export traces over OTLP for the command's lifetime when an endpoint is configured."""

    def wrap(command: Command) -> Command:
        async def run(args: argparse.Namespace) -> int:
            provider = setup_tracing(role)
            try:
                return await command(args)
            finally:
                shutdown_tracing(provider)

        return run

    return wrap


def duration(value: str | None, flag: str) -> timedelta | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as err:
        raise InvalidInput(f"{flag}: {err}") from err


def number(text: str | None, flag: str, kind: type[int] | type[float]) -> float | None:
    """A flag's number, parsed here (not by argparse) so that a bad one is one line and exit 2."""
    if text is None:
        return None
    try:
        return kind(text)
    except ValueError as err:
        raise InvalidInput(f"{flag} must be a {'whole ' if kind is int else ''}number") from err
