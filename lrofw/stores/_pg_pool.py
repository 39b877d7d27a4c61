"""The PostgreSQL store's connections: a pool for calls (each call one short statement or
transaction), new connections on demand (the listener's), dropped connections replaced before
use, and backend errors translated to store errors at this boundary.
"""

from __future__ import annotations

import math
import select
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool, PoolTimeout

from . import _pg_schema
from .base import StoreCorrupted, StoreOpenError, StoreUnavailable

T = TypeVar("T")
Connection = psycopg.Connection[tuple[Any, ...]]

#: Errors that mean "not now" (the server, the network, a timeout, a failover to a read-only
#: standby, the schema dropped under the store) rather than a bug: clients see UNAVAILABLE.
_UNAVAILABLE = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.InternalError,
    pg_errors.UndefinedTable,
    pg_errors.InvalidSchemaName,
    pg_errors.InsufficientPrivilege,
)


def _dropped(conn: Connection) -> bool:
    """Whether the server dropped this idle pooled connection (a restart, a failover,
    ``pg_terminate_backend``).

    An idle connection receives nothing unless the server hung up (it sends a last error, then
    closes), so a look at its socket (no round trip) tells; only a connection with something to
    read gets ``ConnectionPool.check_connection``'s round trip.
    """
    if conn.closed:
        return True
    readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    if not readable:
        return False
    try:
        ConnectionPool.check_connection(conn)
    except psycopg.Error:
        return True
    return False


class Connections:
    """The way to the server for one store.

    Args:
        dsn: the libpq connection string or URL.
        schema: the store's schema (for messages).
        min_connections, max_connections: the pool's bounds.
        connect_timeout: seconds to wait for a connection (libpq's is whole seconds, >= 2).
        statement_timeout, idle_in_transaction_timeout: set on each pooled connection.

    Example:
        >>> db = Connections(dsn, schema="lrofw", min_connections=1, max_connections=10,
        ...                  connect_timeout=5.0, statement_timeout=30.0,
        ...                  idle_in_transaction_timeout=60.0)
        >>> db.open()
        >>> db.run(lambda conn: conn.execute("SELECT 1").fetchone(), "read")
        (1,)
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str,
        min_connections: int,
        max_connections: int,
        connect_timeout: float,
        statement_timeout: float,
        idle_in_transaction_timeout: float,
    ) -> None:
        self._dsn = dsn
        self._schema = schema
        self._shown = _pg_schema.shown(dsn)
        self._timeout = connect_timeout
        self._min = min_connections
        self._max = max_connections
        try:
            params = psycopg.conninfo.conninfo_to_dict(dsn)
        except psycopg.Error as exc:
            raise StoreOpenError(
                f"cannot open PostgreSQL store: bad connection string: {exc}"
            ) from exc
        name = params.get("application_name") or "lrofw"
        self._args: dict[str, Any] = {
            "connect_timeout": max(2, math.ceil(connect_timeout)),
            "application_name": name,
        }
        #: The application name of the listening connection (told apart in pg_stat_activity).
        self.listen_name = f"{name}-listen"
        settings = (
            f"{round(statement_timeout * 1000)}ms",
            f"{round(idle_in_transaction_timeout * 1000)}ms",
        )

        def configure(conn: Connection) -> None:
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false),"
                " set_config('idle_in_transaction_session_timeout', %s, false)",
                settings,
            )

        self._closed = False
        self._pool: ConnectionPool[Connection] = ConnectionPool(
            dsn,
            kwargs={"autocommit": True, **self._args},
            min_size=min_connections,
            max_size=max_connections,
            open=False,
            configure=configure,
            # No check= here: psycopg-pool sleeps a backoff second after each connection that
            # fails its check, so a restart would stall the next call for seconds. ``run``
            # checks (and replaces) them itself.
            timeout=connect_timeout,
            name=f"lrofw-{schema}",
        )

    def connect(self, **options: Any) -> Connection:
        """A new autocommit connection of the caller's own (not from the pool)."""
        return psycopg.connect(self._dsn, autocommit=True, **{**self._args, **options})

    def connect_listener(self) -> Connection:
        """A new connection for the listener, named :attr:`listen_name`. TCP keepalives find a
        silently lost server (a network cut) within about 10 s, so the listener reconnects."""
        return self.connect(
            application_name=self.listen_name,
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
        )

    def open(self) -> None:
        """Open the pool (its ``min_connections``).

        Raises:
            StoreOpenError: they cannot be opened within ``connect_timeout``.
        """
        try:
            self._pool.open(wait=self._min > 0, timeout=self._timeout)
        except PoolTimeout as exc:
            self._pool.close()
            raise _pg_schema.open_error(self._dsn, self._schema, exc) from exc

    def close(self) -> None:
        """Close the pool; later calls raise StoreUnavailable."""
        self._closed = True
        self._pool.close()

    def run(self, fn: Callable[[Connection], T], doing: str) -> T:
        """``fn`` on a pooled connection (autocommit: each statement its own transaction unless
        ``fn`` opens one); backend errors become store errors. ``doing`` ("read", "written")
        completes the messages; a read is repeated once its connection was dropped."""
        if self._closed:
            raise StoreUnavailable("the operation store is closed")
        try:
            # A connection the server dropped is closed (the pool replaces it) and the next
            # one taken: once the server is back, no call fails that a retry would not fix.
            for _ in range(self._max + 1):
                with self._pool.connection() as conn:
                    if _dropped(conn):
                        conn.close()
                        continue
                    try:
                        return fn(conn)
                    except psycopg.OperationalError:
                        # A read on a connection dropped just as it was taken is safe to repeat
                        # on another (a write is not: whether it committed is unknown).
                        if doing != "read" or not conn.closed:
                            raise
            raise StoreUnavailable(
                f"the operation store cannot be {doing}: every connection to PostgreSQL"
                f" {self._shown!r} was dropped"
            )
        except PoolTimeout as exc:
            raise StoreUnavailable(
                f"the operation store cannot be {doing}: no connection to PostgreSQL"
                f" {self._shown!r} within {self._timeout:g}s"
            ) from exc
        except (pg_errors.DataCorrupted, pg_errors.IndexCorrupted) as exc:
            raise StoreCorrupted(
                f"the PostgreSQL store {self._shown!r} (schema {self._schema!r}) reports damaged"
                f" data ({exc}) (found while {doing}); restore it from a backup"
            ) from exc
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(
                f"the operation store cannot be {doing}: {str(exc).strip()}"
            ) from exc
