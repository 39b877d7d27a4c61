"""The PostgreSQL store's connections: psycopg-pool's ``ConnectionPool`` for calls (each call one
short statement or transaction), new connections on demand (the listener's), dropped connections
replaced before use, a call whose connection broke under it repeated once where that is safe,
and backend errors translated to store errors at this boundary.

Each pooled connection is a :class:`Pooled`, a :class:`._pg_statement.Conn` (which runs the hot
statements) that the pool opens (``connection_class``) and sets up (``configure``). Before use, a
connection gets a look at its socket, not psycopg-pool's ``check``: a connection that fails
``check`` makes psycopg-pool sleep before the next (a second, then two, ...), so a restart of the
server would stall calls for seconds; here a dropped one is closed (the pool replaces it) and
the next taken at once.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from . import _pg_schema
from ._pg_statement import Conn, Statement
from .base import StoreCorrupted, StoreError, StoreOpenError, StoreUnavailable

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

#: Seconds a pooled connection serves before the pool replaces it (psycopg-pool takes up to 5%
#: off each, so a pool's connections do not all go at once): a load balancer or a failover in
#: front of the server then reaches every replica's pool within the hour.
LIFETIME = 3600.0

#: Seconds after which psycopg-pool closes a connection beyond ``min_connections`` that the
#: calls did not need (one per period).
MAX_IDLE = 600.0

#: Seconds psycopg-pool keeps trying to open a connection that failed to open (again after about
#: a second) before it gives up on it; the next call that finds no connection free asks for a
#: new one. Short, so that once the server is back the pool reconnects within about a second
#: (psycopg-pool's own default, 5 minutes with doubling pauses, could wait a minute or more).
RECONNECT = 1.0

#: Seconds a call waits for a free connection before it looks again at how the pool's last
#: attempt to open one went: when that failed within the last :data:`RECONNECT` seconds because
#: the server is down or out of reach, a call that finds no connection free fails after this
#: long, not after ``connect_timeout``. (An older failure may be stale: the server may be back.)
GLANCE = 0.05

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

#: Seconds a call on an event loop waits for a free connection before a thread takes it over.
NOW = 0.0005

_BAD = int(pq.ConnStatus.BAD)


class _NoConnection(Exception):
    """No pooled connection within the connect timeout, or the server is down (the cause: the
    pool's failed attempt to connect, if any)."""


def _unreachable(exc: psycopg.Error) -> bool:
    """Whether a failed attempt to connect says the server is down or out of reach (refused,
    timed out, starting up or shutting down), rather than busy (too many clients, when a
    connection given back serves) or refusing this user."""
    state = exc.sqlstate
    return state is None or state.startswith(("08", "57P"))


def _opened_after(moment: float, conn: Pooled) -> bool:
    """Whether ``conn`` was opened after ``moment`` (``time.monotonic()``) and looks usable."""
    return conn.opened > moment and _live(conn)


def _live(conn: Conn) -> bool:
    """Whether this idle pooled connection is still there: the server drops connections on a
    restart, a failover, ``pg_terminate_backend``.

    A look at its socket tells (no round trip): an idle connection receives nothing unless the
    server hung up (it sends a last error, then closes), so only one with something to read gets
    a round trip (an empty statement).
    """
    if conn.pgconn.status == _BAD:
        return False
    if not conn.readable():
        return True
    try:
        conn.execute("")
    except psycopg.Error:
        return False
    return True


class Pooled(Conn):
    """A pooled connection: a :class:`Conn` that knows when the pool opened it."""

    opened = 0.0  # time.monotonic(), once the pool has configured it


_C = TypeVar("_C", bound=Pooled)


def _reporting(seen: Callable[[psycopg.Error | None], None]) -> type[Pooled]:
    """A :class:`Pooled` class whose ``connect`` (the pool's way to open one) tells ``seen`` how
    it went: the error, or None."""

    class Reporting(Pooled):
        @classmethod
        def connect(cls: type[_C], *args: Any, **kwargs: Any) -> _C:
            try:
                conn = super().connect(*args, **kwargs)
            except psycopg.Error as exc:
                seen(exc)
                raise
            seen(None)
            return conn

    return Reporting


class Connections:
    """The way to the server for one store.

    Args:
        dsn: the libpq connection string or URL.
        schema: the store's schema (for messages).
        min_connections, max_connections: the pool's bounds.
        connect_timeout: seconds a call waits for a free connection, and a new connection for
            the server (libpq's is whole seconds, >= 2).
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
        # When and why the pool's last attempt to connect failed (None: it succeeded).
        self._failure: tuple[float, psycopg.Error] | None = None
        self._pool: ConnectionPool[Pooled] = ConnectionPool(
            dsn,
            connection_class=_reporting(self._connected),
            # Text travels as UTF-8 both ways (statements encode and decode it themselves).
            kwargs={
                "autocommit": True,
                "client_encoding": "utf8",
                **self._args,
                **self._keepalives,
            },
            min_size=min_connections,
            max_size=max_connections,
            open=False,
            configure=self._configure,
            timeout=GLANCE,
            max_lifetime=LIFETIME,
            max_idle=MAX_IDLE,
            reconnect_timeout=RECONNECT,
            name=f"lrofw-{schema}",
        )

    def connect(self, **options: Any) -> psycopg.Connection[tuple[Any, ...]]:
        """A new autocommit connection of the caller's own (not from the pool)."""
        return psycopg.connect(self._dsn, autocommit=True, **{**self._args, **options})

    def connect_listener(self) -> psycopg.Connection[tuple[Any, ...]]:
        """A new connection for the listener, named :attr:`listen_name`."""
        return self.connect(application_name=self.listen_name, **self._keepalives)

    def _connected(self, failure: psycopg.Error | None) -> None:
        self._failure = None if failure is None else (time.monotonic(), failure)

    def _configure(self, conn: Pooled) -> None:
        """Each new pooled connection's settings (psycopg-pool's ``configure``)."""
        try:
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false),"
                " set_config('idle_in_transaction_session_timeout', %s, false)",
                self._settings,
            )
        except BaseException:
            conn.close()  # psycopg-pool leaves a connection that fails here open
            raise
        conn.opened = time.monotonic()

    def open(self) -> None:
        """Open the pool (``min_connections`` connections).

        Raises:
            StoreOpenError: they cannot be opened within ``connect_timeout``.
        """
        try:
            self._pool.open(wait=self._min > 0, timeout=self._timeout)
        except PoolTimeout as exc:
            self._pool.close()
            failed = self._failure
            why = exc if failed is None else failed[1]
            raise _pg_schema.open_error(self._dsn, self._schema, why) from exc

    def close(self) -> None:
        """Close the pool; later calls raise StoreUnavailable (connections in use close when
        their call ends)."""
        self._closed = True
        self._pool.close()

    def _take(self, usable: Callable[[Pooled], bool]) -> Pooled:
        """A pooled connection that passes ``usable`` (one that fails is closed: the pool
        replaces it, and the next is taken).

        Raises:
            _NoConnection: none within ``connect_timeout``; or, within :data:`GLANCE`, none free
                and the server down (the pool failed to connect to it a moment ago).
        """
        started = time.monotonic()
        deadline = started + self._timeout
        while True:
            try:
                conn = self._pool.getconn()  # waits GLANCE at most
            except PoolTimeout as exc:
                failed = self._failure
                cause = exc if failed is None else failed[1]
                down = failed is not None and failed[0] > started - RECONNECT
                if (down and _unreachable(cause)) or time.monotonic() >= deadline:
                    raise _NoConnection from cause
                continue
            if usable(conn):
                return conn
            conn.close()
            self._pool.putconn(conn)
            if time.monotonic() >= deadline:
                raise _NoConnection

    def read(self, fn: Callable[[Conn], T]) -> T:
        """``fn``, which only reads, on a pooled connection: :meth:`run` with ``fn`` run again
        on another connection when its connection broke under it."""
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
        backend), what to run once more on another: ``fn`` itself for a read; for a write,
        something that gives the right answer whether or not the broken attempt committed.
        Without it, the failure is the caller's (StoreUnavailable).
        """
        result: T = self._translated(doing, self._run, fn, again)
        return result

    async def run_async(self, call: Call[T], doing: str) -> T:
        """:meth:`run` of ``call`` for a coroutine: its statement runs on the event loop when a
        connection is free at once (none is waited for), and the rest on a thread: the whole
        call when no connection is free or the statement's row needs more (``call.done``
        returns :data:`FULL`), ``call.again`` when the connection broke under the statement.

        Example:
            >>> row = await db.run_async(Call(get, (name,), lambda row: row, read, read), "read")
        """
        conn = self._translated(doing, self._take_now)
        if conn is None:
            return await asyncio.to_thread(self.run, call.run, doing, again=call.again)
        broke = 0.0
        try:
            row = await conn.one_async(call.statement, call.args)
        except psycopg.OperationalError as exc:
            if call.again is None or not conn.closed:
                self._raise(exc, doing)
            broke = time.monotonic()
        except psycopg.Error as exc:
            self._raise(exc, doing)
        except BaseException:
            conn.close()  # cancelled with the statement in flight: the pool replaces it
            raise
        finally:
            self._pool.putconn(conn)
        if broke:
            again = call.again
            assert again is not None
            return await asyncio.to_thread(self._translated, doing, self._again, again, broke)
        value = call.done(row)
        if isinstance(value, Full):
            return await asyncio.to_thread(self.run, call.run, doing, again=call.again)
        return value

    def _run(self, fn: Callable[[Conn], T], again: Callable[[Conn], T] | None) -> T:
        conn = self._take(_live)
        try:
            return fn(conn)
        except psycopg.OperationalError:
            if again is None or not conn.closed:
                raise
            broke = time.monotonic()
        finally:
            self._pool.putconn(conn)
        return self._again(again, broke)

    def _again(self, again: Callable[[Conn], T], broke: float) -> T:
        """``again`` after a connection broke at ``broke`` (``time.monotonic()``).

        The server may be ending the other connections too (a restart, a failover, an
        administrator ending this service's backends one by one), some not yet: the retry runs
        on a connection opened since. Older idle ones it meets on the way are closed, and the
        pool replaces them. Should that one break as well, ``again`` (safe to run any number of
        times) runs once more on a newer one, for up to ``connect_timeout`` after the first
        break.
        """
        until = broke + self._timeout
        while True:
            conn = self._take(functools.partial(_opened_after, broke))
            try:
                return again(conn)
            except psycopg.OperationalError:
                if not conn.closed or time.monotonic() >= until:
                    raise
                broke = time.monotonic()
            finally:
                self._pool.putconn(conn)

    def _take_now(self) -> Pooled | None:
        """A pooled connection free now and with nothing unasked on its socket, or None (then
        the thread that takes the call over looks closer)."""
        try:
            conn = self._pool.getconn(NOW)
        except PoolTimeout:
            return None
        if conn.pgconn.status == _BAD or conn.readable():
            self._pool.putconn(conn)
            return None
        return conn

    def _translated(self, doing: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, its backend errors as store errors (see :meth:`_error`)."""
        if self._closed:
            raise StoreUnavailable("the operation store is closed")
        try:
            return fn(*args)
        except (PoolClosed, _NoConnection, psycopg.Error) as exc:
            self._raise(exc, doing)

    def _raise(self, exc: Exception, doing: str) -> NoReturn:
        """Raise the store error for ``exc`` (see :meth:`_error`), or ``exc`` itself."""
        error = self._error(exc, doing)
        if error is None:
            raise exc
        raise error from exc

    def _error(self, exc: Exception, doing: str) -> StoreError | None:
        """The store error for a backend error met while ``doing``; None for other errors (a
        bug, a constraint the caller handles), which stay as they are."""
        if isinstance(exc, PoolClosed):
            return StoreUnavailable("the operation store is closed")
        if isinstance(exc, _NoConnection):
            cause = exc.__cause__
            if isinstance(cause, psycopg.Error) and not isinstance(cause, PoolTimeout):
                why = str(cause).strip()
            else:
                why = f"no connection to PostgreSQL {self._shown!r} within {self._timeout:g}s"
            return StoreUnavailable(f"the operation store cannot be {doing}: {why}")
        if isinstance(exc, (pg_errors.DataCorrupted, pg_errors.IndexCorrupted)):
            return StoreCorrupted(
                f"the PostgreSQL store {self._shown!r} (schema {self._schema!r}) reports damaged"
                f" data ({exc}) (found while {doing}); restore it from a backup"
            )
        if isinstance(exc, _UNAVAILABLE):
            return StoreUnavailable(f"the operation store cannot be {doing}: {str(exc).strip()}")
        return None


class Full:
    """The type of :data:`FULL`."""


#: :meth:`Call.done`'s answer when the statement's row is not the call's answer: the whole call
#: runs on a thread.
FULL = Full()


@dataclass(frozen=True)
class Call(Generic[T]):
    """A store call that one statement usually answers, for :meth:`Connections.run_async`.

    Args:
        statement, args: the statement and its arguments.
        done: the call's answer from the statement's first row (None: no row), or :data:`FULL`.
        run: the whole call on a connection (what :meth:`Connections.run` runs).
        again: what :meth:`Connections.run` runs again after a broken connection, if anything.

    Example:
        >>> call = Call(get, (name,), lambda row: row, read, read)
    """

    statement: Statement
    args: Sequence[Any]
    done: Callable[[tuple[Any, ...] | None], T | Full]
    run: Callable[[Conn], T]
    again: Callable[[Conn], T] | None = None
