"""The PostgreSQL the tests get (postgres_url): a real server, version 15 or newer, on which a test can make its own database."""

from __future__ import annotations

import uuid

import asyncpg


async def test_a_test_can_create_use_and_drop_its_own_database(postgres_url: str) -> None:
    admin = await asyncpg.connect(postgres_url, timeout=10)
    name = f"sluicegate_t_{uuid.uuid4().hex[:10]}"
    try:
        assert await admin.fetchval("SELECT current_setting('server_version_num')::int") >= 150000
        await admin.execute(f'CREATE DATABASE "{name}"')
        own = await asyncpg.connect(postgres_url.rsplit("/", 1)[0] + f"/{name}", timeout=10)
        try:
            await own.execute("CREATE TABLE t (id int PRIMARY KEY, note text)")
            await own.execute("INSERT INTO t VALUES (1, 'one'), (2, 'two')")
            assert await own.fetchval("SELECT string_agg(note, ',' ORDER BY id) FROM t") == "one,two"
        finally:
            await own.close()
        await admin.execute(f'DROP DATABASE "{name}"')
        assert await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name) == 0
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.close()
