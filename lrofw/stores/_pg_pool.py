"""The PostgreSQL store's connections: a small pool of its own for calls (each call one short
statement or transaction), new connections on demand (the listener's), dropped connections
replaced before use, a call whose connection broke under it repeated once where that is safe,
and backend errors translated to store errors at this boundary.

The pool is lrofw's own, not psycopg-pool's: taking and returning a connection is a lock, a list
pop and an append (psycopg-pool's context manager, checks and bookkeeping cost ~6 µs a call), and
a dropped connection is replaced by the call that finds it, without psycopg-pool's backoff
sleeps. Each connection is a :class:`._pg_statement.Conn`, which runs the hot statements.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq

from . import _pg_schema
from ._pg_statement import Conn
from .base import StoreCorrupted, StoreOpenError, StoreUnavailable

T = TypeVar("T")

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

#: Seconds a pooled connection serves before it is replaced (spread by up to 10% so a pool's
#: connections do not all go at once): a load balancer or a failover in front of the server
#: then reaches every replica's pool within the hour.
LIFETIME = 3600.0

#: Seconds an idle connection beyond ``min_connections`` is kept.
MAX_IDLE = 600.0

#: TCP keepalives (unless the connection string sets its own): a server that went silent (a
#: network cut) is found within about 11 s, also by a call waiting for its answer;
#: ``tcp_user_timeout`` bounds what was sent and never acknowledged the same way.
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 11_000,
}


_BAD = int(pq.ConnStatus.BAD)
_IDLE = int(pq.TransactionStatus.IDLE)


class _Timeout(Exception):
    """No connection was free within the connect timeout."""


def _dropped(conn: Conn) -> bool:
    """Whether the server dropped this idle pooled connection (a restart, a failover,
    ``pg_terminate_backend``).

    A look at its socket tells (no round trip): only a connection with something to read gets
    a round trip (an empty statement).
    """
    if conn.pgconn.status == _BAD:
        return True
    if not conn.readable():
        return False
    try:
        conn.execute("")
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
        >>> db.read(lambda conn: conn.execute("SELECT 1").fetchone())
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
        # The connection string's own keepalive settings, if any, win.
        self._keepalives = {k: v for k, v in KEEPALIVES.items() if k not in params}
        self._args: dict[str, Any] = {
            "connect_timeout": max(2, math.ceil(connect_timeout)),
            "application_name": name,
        }
        #: The application name of the listening connection (told apart in pg_stat_activity).
        self.listen_name = f"{name}-listen"
        self._settings = (
            f"{round(statement_timeout * 1000)}ms",
            f"{round(idle_in_transaction_timeout * 1000)}ms",
        )
        self._closed = False
        self._idle: list[Conn] = []  # last in, first out: the warm ones serve, the rest age out
        self._size = 0  # connections open or being opened
        self._lock = threading.Lock()
        self._free = threading.Condition(self._lock)  # a connection was given back or closed
        self._waiting = 0  # calls waiting on _free

    def connect(self, **options: Any) -> psycopg.Connection[tuple[Any, ...]]:
        """A new autocommit connection of the caller's own (not from the pool)."""
        return psycopg.connect(self._dsn, autocommit=True, **{**self._args, **options})

    def connect_listener(self) -> psycopg.Connection[tuple[Any, ...]]:
        """A new connection for the listener, named :attr:`listen_name`."""
        return self.connect(application_name=self.listen_name, **self._keepalives)

    def _connect_pooled(self) -> Conn:
        # Text travels as UTF-8 both ways (statements encode and decode it themselves).
        conn = Conn.connect(
            self._dsn, autocommit=True, client_encoding="utf8", **self._args, **self._keepalives
        )
        try:
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false),"
                " set_config('idle_in_transaction_session_timeout', %s, false)",
                self._settings,
            )
        except BaseException:
            conn.close()
            raise
        conn.expires = time.monotonic() + LIFETIME * random.uniform(0.9, 1.0)
        return conn

    def open(self) -> None:
        """Open ``min_connections`` connections.

        Raises:
            StoreOpenError: they cannot be opened.
        """
        try:
            for _ in range(self._min):
                with self._lock:
                    self._size += 1
                try:
                    conn = self._connect_pooled()
                except BaseException:
                    self._forget()
                    raise
                self._give(conn)
        except psycopg.Error as exc:
            self.close()
            raise _pg_schema.open_error(self._dsn, self._schema, exc) from exc

    def close(self) -> None:
        """Close the pool; later calls raise StoreUnavailable (connections in use close when
        their call ends)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._size -= len(idle)
            self._free.notify_all()
        for conn in idle:
            conn.close()

    def _take(self, *, fresh: bool = False) -> Conn:
        """A live connection: an idle one (the server may have dropped some: they are closed
        and the next taken), else a new one while there is room, else the first given back.
        ``fresh``: a new one (in place of an idle one when the pool is full)."""
        while True:
            conn = old = None
            with self._lock:
                self._wait_for_room()
                if self._idle and not fresh:
                    conn = self._idle.pop()
                elif self._size < self._max:
                    self._size += 1
                else:
                    old = self._idle.pop(0)  # the one idle longest makes room
            if old is not None:
                old.close()
            if conn is None:
                try:
                    return self._connect_pooled()
                except BaseException:
                    self._forget()
                    raise
            if not _dropped(conn):
                return conn
            conn.close()
            self._forget()

    def _wait_for_room(self) -> None:
        """With the lock held: wait until a connection is idle or one more may be opened."""
        deadline = None
        while True:
            if self._closed:
                raise StoreUnavailable("the operation store is closed")
            if self._idle or self._size < self._max:
                return
            if deadline is None:
                deadline = time.monotonic() + self._timeout
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Timeout
            self._waiting += 1
            try:
                self._free.wait(left)
            finally:
                self._waiting -= 1

    def _forget(self) -> None:
        """One connection less (closed, or never opened): a call waiting for one may open it."""
        with self._lock:
            self._size -= 1
            if self._waiting:
                self._free.notify()

    def _give(self, conn: Conn) -> None:
        """Give ``conn`` back to the pool; one that broke, was left in a transaction, or has
        served its lifetime is closed instead."""
        now = time.monotonic()
        pgconn = conn.pgconn
        if pgconn.status == _BAD or pgconn.transaction_status != _IDLE or now > conn.expires:
            conn.close()
            self._forget()
            return
        conn.idle_since = now
        stale = None
        with self._lock:
            idle = self._idle
            if self._closed:
                stale = conn
                self._size -= 1
            else:
                idle.append(conn)
                if len(idle) > self._min and idle[0].idle_since < now - MAX_IDLE:
                    stale = idle.pop(0)  # the longest idle: the pool needs fewer
                    self._size -= 1
                if self._waiting:
                    self._free.notify()
        if stale is not None:
            stale.close()

    def read(self, fn: Callable[[Conn], T]) -> T:
        """``fn``, which only reads, on a pooled connection: :meth:`run` with ``fn`` run again
        on a fresh connection when its connection broke under it."""
        return self.run(fn, "read", again=fn)

    def run(
        self,
        fn: Callable[[Conn], T],
        doing: str,
        *,
        again: Callable[[Conn], T] | None = None,
    ) -> T:
        """``fn`` on a pooled connection (autocommit: each statement its own transaction unless
        ``fn`` opens one); backend errors become store errors. ``doing`` ("read", "written")
        completes the messages.

        ``again``: when the connection broke during ``fn`` (the server restarted, or ended the
        backend), what to run once more on a fresh one: ``fn`` itself for a read; for a write,
        something that gives the right answer whether or not the broken attempt committed.
        Without it, the failure is the caller's (StoreUnavailable).
        """
        if self._closed:
            raise StoreUnavailable("the operation store is closed")
        try:
            conn = self._take()
            try:
                return fn(conn)
            except psycopg.OperationalError:
                if again is None or not conn.closed:
                    raise
            finally:
                self._give(conn)
            # Other idle connections may have been dropped in the same instant (a restart
            # ends every backend), and some not noticed yet: a new one is sure to be live.
            conn = self._take(fresh=True)
            try:
                return again(conn)
            finally:
                self._give(conn)
        except _Timeout as exc:
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
