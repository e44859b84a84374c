"""Container health check: succeed only if this process answers /healthz on its metrics port.

Docker's HEALTHCHECK runs this inside the container (the image has no curl or wget). It uses
http.client rather than urllib so that proxy variables set for the application never reroute a
request meant for 127.0.0.1. Exit status 0 means healthy, 1 unhealthy, as Docker expects.

The image runs one-shot commands too (`submit`, `demo`): they serve no /healthz, and a container
running one would turn unhealthy for no fault of its own. So the check first looks at which
`sluicegate` command runs in the container (the container's own processes, under /proc, or
under SLUICEGATE_HEALTHCHECK_PROC for tests) and probes only the long-running roles.
"""

from __future__ import annotations

import http.client
import os
import sys
from pathlib import Path

DEFAULT_PORT = 9100
TIMEOUT_S = 3.0
# The roles that serve /healthz for as long as they run; any other command is one-shot.
LONG_RUNNING = frozenset({"scheduler", "dispatcher", "worker", "recorder"})
# Options of `sluicegate` itself that take a value (they may come before the command).
VALUED_OPTIONS = frozenset({"--log-level", "--prefix"})


def command_of(argv: list[str]) -> str | None:
    """The `sluicegate` subcommand in a process's argv, or None if it is not a sluicegate process."""
    # SCRIPT args, python -m sluicegate args, or docker-init -- python SCRIPT args.
    for index, word in enumerate(argv[:4]):
        if Path(word).name == "sluicegate":
            rest = argv[index + 1 :]
            break
    else:
        return None
    skip = False
    for word in rest:
        if skip:
            skip = False
        elif word in VALUED_OPTIONS:
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def running_commands(proc: Path) -> list[str]:
    """The sluicegate commands the processes under `proc` run."""
    commands = []
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue  # ended while we looked
        command = command_of([a for a in argv if a])
        if command is not None:
            commands.append(command)
    return commands


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    commands = running_commands(Path(os.environ.get("SLUICEGATE_HEALTHCHECK_PROC") or "/proc"))
    if commands and not LONG_RUNNING.intersection(commands):
        print(f"healthcheck: `sluicegate {commands[0]}` is a one-shot command, nothing to probe")
        return 0
    raw_port = os.environ.get("SLUICEGATE_METRICS_PORT", "") or str(DEFAULT_PORT)
    try:
        port = int(raw_port)
    except ValueError:
        print(f"healthcheck: SLUICEGATE_METRICS_PORT is not a port number: {raw_port!r}", file=sys.stderr)
        return 1
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        conn.request("GET", path)
        status = conn.getresponse().status
    except OSError as exc:
        print(f"healthcheck: GET {path} on port {port} failed: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if 200 <= status < 300:
        return 0
    print(f"healthcheck: GET {path} on port {port} answered {status}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
