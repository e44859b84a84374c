"""`sluicegate token`: issue signed tokens for workers, clients and operators, and add signing keys."""

from __future__ import annotations

import argparse
import os
import time
import uuid
from pathlib import Path
from typing import Any

from sluicegate import auth
from sluicegate.cli_base import add_parser
from sluicegate.durations import parse_duration
from sluicegate.errors import InvalidInput

KEYS_VARIABLES = ("SLUICEGATE_AUTH_KEYS", "SLUICEGATE_DISPATCHER_AUTH_KEYS")


def _keys_path(given: str | None) -> Path:
    for value in (given, *(os.environ.get(v) for v in KEYS_VARIABLES)):
        if value:
            return Path(value)
    raise InvalidInput("--keys (or SLUICEGATE_AUTH_KEYS) must name the key set file")


async def cmd_issue(args: argparse.Namespace) -> int:
    try:
        ttl = parse_duration(args.ttl, longest=3650 * 86400)
    except ValueError as err:
        raise InvalidInput(f"--ttl: {err}") from None
    keys = auth.KeyFile(_keys_path(args.keys)).keys
    principal = args.principal or f"{args.role}-{uuid.uuid4().hex[:12]}"
    tenants = args.tenant or (["*"] if args.role == "operator" else [])
    print(auth.issue(keys, principal=principal, role=args.role, tenants=tenants, ttl=ttl, now=time.time()))
    return 0


async def cmd_new_key(args: argparse.Namespace) -> int:
    path = _keys_path(args.keys)
    current = auth.KeyFile(path).keys if path.exists() else None
    kid = args.kid or time.strftime("k%Y%m%d%H%M%S")
    if current is not None and kid in current.keys:
        raise InvalidInput(f"the key set already has a key {kid!r}")
    fresh = current.with_new_key(kid) if current else auth.KeySet(keys={}, issue="").with_new_key(kid)
    auth.write_keys(path, fresh)
    print(kid)
    return 0


def add_commands(commands: Any) -> None:
    p = add_parser(commands, "token", "issue tokens for workers, clients and operators; manage the keys that sign them")
    sub = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")

    issue = add_parser(sub, "issue", "print a signed token (one line)")
    issue.add_argument("--role", required=True, choices=auth.ROLES, help="what it may do (required, no default)")
    issue.add_argument(
        "--tenant", action="append", help="a tenant it may act for, repeatable (default: none; operators: all)"
    )
    issue.add_argument("--ttl", default="30d", help="lifetime, e.g. 12h or 30d")
    issue.add_argument("--principal", help="who it names (default: the role and a random suffix)")
    issue.add_argument("--keys", help="key set file (default: SLUICEGATE_AUTH_KEYS)")
    issue.set_defaults(run=cmd_issue)

    new_key = add_parser(sub, "new-key", "add a random key to the key set (created if absent); new tokens use it")
    new_key.add_argument("--kid", help="its id (default: k and the time)")
    new_key.add_argument("--keys", help="key set file (default: SLUICEGATE_AUTH_KEYS)")
    new_key.set_defaults(run=cmd_new_key)
