"""Connecting to the task store, and what its failures mean to the rest of Sluicegate.

Every asyncpg failure is turned into one of our errors here, once, with a message that names the
problem without the URL, the password or the server's internals.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

from sluicegate.errors import SchemaBehind, SluicegateError, StoreUnavailable
from sluicegate.store.settings import StoreSettings

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    # A connection of its own or one borrowed from a pool (generic only in the type stubs).
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

# What talking to PostgreSQL can raise: the network, timeouts, the server, the driver.
STORE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)
COMMAND_TIMEOUT = 60.0  # seconds; a hung server must not hang a recorder or a lookup forever
_REFUSED = (
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)


def translate(err: BaseException) -> SluicegateError:
    """The Sluicegate error for a failure of the store (one line, no secrets)."""
    if isinstance(err, asyncpg.UndefinedTableError):
        return SchemaBehind("the task store has no schema yet: run `sluicegate migrate`")
    if isinstance(err, asyncpg.InvalidCatalogNameError):
        return StoreUnavailable("the task store's database does not exist")
    if isinstance(err, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError):
        return StoreUnavailable("the task store refused the credentials in SLUICEGATE_STORE_URL")
    if isinstance(err, OSError | TimeoutError | asyncpg.InterfaceError):
        return StoreUnavailable("cannot reach the task store")
    if isinstance(err, asyncpg.PostgresError):
        return StoreUnavailable(f"the task store failed ({err.sqlstate}: {type(err).__name__})")
    return StoreUnavailable("the task store failed")


def refuses_for_good(err: BaseException) -> bool:
    """A failure that retrying cannot fix: wrong credentials, no such database, no schema."""
    return isinstance(err, (*_REFUSED, asyncpg.UndefinedTableError))


def is_bad_data(err: BaseException) -> bool:
    """The server refused what was written (not the connection): retrying the same rows cannot help."""
    return isinstance(
        err,
        asyncpg.DataError | asyncpg.IntegrityConstraintViolationError | asyncpg.ProgramLimitExceededError,
    )


async def create_pool(settings: StoreSettings, *, max_size: int = 4) -> asyncpg.Pool[asyncpg.Record]:
    """A pool that connects on first use (so creating it never fails for a store that is down)."""
    return await asyncpg.create_pool(
        settings.dsn,
        min_size=0,
        max_size=max_size,
        timeout=settings.connect_timeout.total_seconds(),
        command_timeout=COMMAND_TIMEOUT,
    )


async def wait_until_reachable(pool: asyncpg.Pool[asyncpg.Record], settings: StoreSettings) -> None:
    """Retry a first query until the store answers or `connect_deadline` passes.

    Wrong credentials and a missing database are reported at once: waiting cannot fix them.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + settings.connect_deadline.total_seconds()
    delay = 0.1
    while True:
        try:
            await pool.fetchval("SELECT 1")
            return
        except STORE_ERRORS as err:
            if refuses_for_good(err) or loop.time() + delay > give_up:
                raise translate(err) from err
            log.warning("task store not reachable yet (%s); retrying in %.1fs", translate(err), delay)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)
