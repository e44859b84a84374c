"""Versioned schema migrations of the task store: .sql files shipped in this package, applied in order."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from sluicegate.errors import SchemaBehind

SCHEMA_TABLE = "sluicegate_schema"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Two migrations started at once (two jobs, a rollout) take turns on this advisory lock.
_LOCK_KEY = 0x5C_75_1C_E6

if TYPE_CHECKING:
    from sluicegate.store.db import Connection


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration of this release, oldest first."""
    found = []
    for entry in resources.files("sluicegate.store").joinpath("migrations").iterdir():
        match = _FILE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1, 2, 3... without gaps, found {versions}")
    return found


def latest_version() -> int:
    return len(migrations())


async def current_version(connection: Connection) -> int:
    """The version the store's schema is at (0 for an empty database)."""
    if not await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", SCHEMA_TABLE):
        return 0
    return int(await connection.fetchval(f"SELECT coalesce(max(version), 0) FROM {SCHEMA_TABLE}"))


async def migrate(connection: Connection) -> list[Migration]:
    """Apply every migration the store lacks, all in one transaction; returns those applied."""
    applied = []
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await connection.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} ("
            " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        current = await current_version(connection)
        for migration in migrations():
            if migration.version > current:
                await connection.execute(migration.sql)
                await connection.execute(
                    f"INSERT INTO {SCHEMA_TABLE} (version, name) VALUES ($1, $2)", migration.version, migration.name
                )
                applied.append(migration)
    return applied


async def check(connection: Connection) -> int:
    """Raise SchemaBehind unless the schema has every migration of this release; returns its version."""
    current = await current_version(connection)
    latest = latest_version()
    if current < latest:
        raise SchemaBehind(
            f"the task store's schema is at version {current}, this release needs {latest}: run `sluicegate migrate`"
        )
    return current
