"""Write a RabbitMQ definitions file: one broker user per Sluicegate role, with what that role may touch.

    python scripts/broker_definitions.py definitions.json --passwords passwords.json

Passwords are read from the JSON object in `--passwords` (user -> password); a user missing there
gets a random one, written back to that file (mode 600). The definitions file holds only salted
hashes (RabbitMQ's rabbit_password_hashing_sha256), never a password. `--demo` uses the compose
demo's passwords instead (`<user>-dev`, the administrator's equal to its name): that is how
deploy/rabbitmq/definitions.json is made. Definitions imported when a node boots replace its
default user, so the administrator (the operator's default user on Kubernetes) is in the file too.

What each role may do, under the prefix (default `sluicegate`):
- scheduler, dispatcher: everything under the prefix (their queues and exchanges); a dispatcher
  publishes to `<prefix>.events` only state, result and lifecycle messages;
- recorder (and `sluicegate migrate`): the lifecycle queue, bound to `<prefix>.events`;
- client: declare the exchanges and the tasks queue it needs (each scheduler partition's), publish
  tasks and cancellations, declare, bind and read its own results queue
  (`<prefix>.results.<32 hex>`); on `<prefix>.events` it may bind only `result.<32 hex>` and
  publish nothing.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any

CLIENT_ID = r"[0-9a-f]{32}"
PART = r"(p[0-9]+\.)?"  # a scheduler partition's own names (none for partition 0)
ROLE_USERS = ("scheduler", "dispatcher", "recorder", "client")


def user_of(role: str) -> str:
    return f"sluicegate-{role}"


def hash_password(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's salted SHA-256 password hash: base64(salt + sha256(salt + password))."""
    salt = salt if salt is not None else os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def password_matches(password: str, password_hash: str) -> bool:
    raw = base64.b64decode(password_hash)
    return hash_password(password, raw[:4]) == password_hash


def permissions(prefix: str) -> dict[str, tuple[str, str, str]]:
    """(configure, write, read) per role user."""
    p = re.escape(prefix)
    everything = (rf"^{p}\..*", rf"^({p}\..*|amq\.default)$", rf"^{p}\..*")
    return {
        user_of("scheduler"): everything,
        user_of("dispatcher"): everything,
        user_of("recorder"): (rf"^{p}\.(events|lifecycle)$", rf"^{p}\.lifecycle$", rf"^{p}\.(events|lifecycle)$"),
        # A scheduler partition N > 0 has its own tasks, tasks.unrouted and requeue under <prefix>.pN.
        user_of("client"): (
            rf"^{p}\.({PART}(tasks|tasks\.unrouted|requeue)|assign|events|dead|control|cancels|results\.{CLIENT_ID})$",
            rf"^({p}\.({PART}tasks|cancels|results\.{CLIENT_ID})|amq\.default)$",
            # No read on tasks.unrouted: binding there would show it other tenants' first tasks.
            rf"^{p}\.(events|results\.{CLIENT_ID})$",
        ),
    }


def topic_permissions(prefix: str) -> dict[str, tuple[str, str]]:
    """(write, read) routing-key patterns on the events exchange."""
    return {
        user_of("dispatcher"): (r"^(state|result|lifecycle)\..*", r"^$"),
        user_of("recorder"): (r"^$", r"^lifecycle\.#$"),
        user_of("client"): (r"^$", rf"^result\.{CLIENT_ID}$"),
    }


def definitions(passwords: dict[str, str], *, prefix: str = "sluicegate", admin: str = "sluicegate") -> dict[str, Any]:
    users = [admin, *(user_of(r) for r in ROLE_USERS)]
    grants = {admin: (".*", ".*", ".*"), **permissions(prefix)}
    return {
        "users": [
            {
                "name": name,
                "password_hash": hash_password(passwords[name]),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": ["administrator"] if name == admin else [],
            }
            for name in users
        ],
        "vhosts": [{"name": "/"}],
        "permissions": [
            {"user": name, "vhost": "/", "configure": c, "write": w, "read": r} for name, (c, w, r) in grants.items()
        ],
        "topic_permissions": [
            {"user": name, "vhost": "/", "exchange": f"{prefix}.events", "write": w, "read": r}
            for name, (w, r) in topic_permissions(prefix).items()
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="definitions file to write")
    parser.add_argument("--passwords", type=Path, help="JSON object user -> password (missing ones are made)")
    parser.add_argument("--demo", action="store_true", help="the compose demo's passwords")
    parser.add_argument("--prefix", default="sluicegate")
    parser.add_argument("--admin", default="sluicegate", help="the administrator (the operator's default user)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", args.prefix):
        print("broker_definitions: --prefix must be a valid Sluicegate prefix", file=sys.stderr)
        return 2
    users = [args.admin, *(user_of(r) for r in ROLE_USERS)]
    if args.demo:
        passwords = {u: (u if u == args.admin else f"{u}-dev") for u in users}
    elif args.passwords is None:
        print("broker_definitions: give --passwords FILE (or --demo)", file=sys.stderr)
        return 2
    else:
        passwords = json.loads(args.passwords.read_text()) if args.passwords.exists() else {}
        made = {u: secrets.token_hex(24) for u in users if u not in passwords}
        if made:
            passwords.update(made)
            fd = os.open(args.passwords, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(passwords, out, indent=2)
    args.out.write_text(json.dumps(definitions(passwords, prefix=args.prefix, admin=args.admin), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
