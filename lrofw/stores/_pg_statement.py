"""The PostgreSQL store's hot statements, run through libpq directly.

psycopg's ``execute`` makes a cursor, adapts each parameter, converts the query and looks it up
in its prepared-statement cache on every call: about 60 µs of CPU per statement measured here,
against about 20 µs for the round trip itself through libpq's own calls. The statements a
create, a wait and a finish make (insert, get, finish, notify) are :class:`Statement` s:
prepared once on each connection with their parameter types declared, then run with binary
parameters and binary results that a few ``struct`` calls encode and decode. Everything else the
store does goes through psycopg as usual, on the same connections.

A statement runs the same way whoever waits for the answer (:meth:`Conn._plan` sends each
message and takes each answer): a thread, which waits in ``poll`` (:meth:`Conn.result`), or an
event loop, which watches the socket and goes on with other work meanwhile
(:meth:`Conn.result_async`): an asyncio server's creates and finishes then cost no hand-over to a
thread and back.
"""

from __future__ import annotations

import asyncio
import itertools
import select
import struct
from collections.abc import Callable, Generator, Sequence
from typing import Any, cast

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg.rows import RowFactory, tuple_row

_DOUBLE, _BIGINT, _SMALLINT, _INTEGER = (struct.Struct(f) for f in (">d", ">q", ">h", ">i"))

#: Per type letter: its PostgreSQL type oid, how a parameter of it is sent (binary format) and
#: how a result column of it is read (binary format).
_TYPES: dict[str, tuple[int, Callable[[Any], bytes], Callable[[bytes], Any]]] = {
    "t": (25, str.encode, bytes.decode),  # text (the connections' client encoding is UTF-8)
    "b": (17, bytes, bytes),  # bytea
    "f": (701, _DOUBLE.pack, lambda v: _DOUBLE.unpack(v)[0]),  # double precision
    "i": (20, _BIGINT.pack, lambda v: _BIGINT.unpack(v)[0]),  # bigint
    "h": (21, _SMALLINT.pack, lambda v: _SMALLINT.unpack(v)[0]),  # smallint
    "n": (23, _INTEGER.pack, lambda v: _INTEGER.unpack(v)[0]),  # integer
}

_OK = (int(pq.ExecStatus.COMMAND_OK), int(pq.ExecStatus.TUPLES_OK))
_SQLSTATE = pq.DiagnosticField.SQLSTATE
_NO_SUCH_STATEMENT = b"26000"  # invalid_sql_statement_name: no prepared statement of that name
_BINARY = int(pq.Format.BINARY)
_BAD = int(pq.ConnStatus.BAD)

_names = itertools.count()


def _ready(readable: asyncio.Future[None]) -> None:
    if not readable.done():
        readable.set_result(None)


def _read(pgconn: pq.abc.PGconn) -> None:
    """What the server sent so far, read without waiting. When the connection ends, libpq's
    next result says so (after whatever came before the end)."""
    try:
        pgconn.consume_input()
    except psycopg.OperationalError:
        if pgconn.status != _BAD:
            raise


def _waiting(pgconn: pq.abc.PGconn) -> bool:
    """Whether more of the answer is to come (a broken connection's never does: libpq then
    says it is busy, and its next result is the error)."""
    return bool(pgconn.is_busy()) and pgconn.status != _BAD


def _taken(results: list[pq.abc.PGresult]) -> pq.abc.PGresult:
    """The answer among the results that came before ReadyForQuery (or the connection's end).

    A statement's own result (CommandComplete) comes before its implicit transaction commits,
    at Sync: a backend ended in between (an administrator, a crash, a failover) sends an error
    after it, and the write never committed. So a later error is the answer, not the first
    result.
    """
    if not results:
        raise psycopg.OperationalError("the server sent no answer")
    for result in results[1:]:
        if result.status not in _OK:
            return result
    return results[0]


class Statement:
    """A statement prepared once on each connection that runs it, with binary parameters and
    results.

    Args:
        sql: the statement, its parameters written ``$1``, ``$2``, ...
        params: a type letter per parameter: ``t`` text, ``b`` bytea, ``f`` double precision,
            ``i`` bigint, ``h`` smallint, ``n`` integer.
        columns: a type letter per result column.

    Example:
        >>> get = Statement('SELECT data, create_time FROM "lrofw".ops WHERE name = $1', "t", "bf")
        >>> db.run(lambda conn: conn.one(get, ("operations/1",)), "read")
        (b'\\n\\x0coperations/1', 1700000000.0)
    """

    __slots__ = ("_decoders", "_encoders", "formats", "name", "sql", "types")

    def __init__(self, sql: str, params: str, columns: str = "") -> None:
        self.name = f"lrofw_{next(_names)}".encode()
        self.sql = sql.encode()
        self.types = [_TYPES[p][0] for p in params]
        self.formats = [_BINARY] * len(params)
        self._encoders = [_TYPES[p][1] for p in params]
        self._decoders = [_TYPES[c][2] for c in columns]

    def encode(self, args: Sequence[Any]) -> list[bytes | None]:
        """The parameters as libpq takes them (None is NULL)."""
        return [None if a is None else e(a) for e, a in zip(self._encoders, args, strict=True)]

    def row(self, result: pq.abc.PGresult, n: int) -> tuple[Any, ...]:
        """Row ``n`` of ``result``, decoded (NULL is None)."""
        value = result.get_value
        return tuple(
            [None if (v := value(n, i)) is None else d(v) for i, d in enumerate(self._decoders)]
        )


class Conn(psycopg.Connection[tuple[Any, ...]]):
    """A pooled connection: psycopg's own (``execute``, ``transaction`` and the rest as ever)
    that also runs :class:`Statement` s.

    Example:
        >>> conn = Conn.connect(dsn, autocommit=True, client_encoding="utf8")
        >>> conn.one(get, ("operations/1",))
        (b'\\n\\x0coperations/1', 1700000000.0)
    """

    def __init__(
        self, pgconn: pq.abc.PGconn, row_factory: RowFactory[tuple[Any, ...]] = tuple_row
    ) -> None:
        super().__init__(pgconn, row_factory)
        self._statements: set[bytes] = set()  # the names of those prepared on it
        self._poll = select.poll()
        self._poll.register(pgconn.socket, select.POLLIN)

    def readable(self) -> bool:
        """Whether something came from the server unasked (no round trip: a look at the
        socket). An idle connection receives nothing unless the server hung up (it sends a last
        error, then closes)."""
        return bool(self._poll.poll(0))

    def result(self, statement: Statement, args: Sequence[Any]) -> pq.abc.PGresult:
        """Run ``statement`` with ``args`` (prepared first if it is new here), waiting for the
        answer (in ``poll``: the GIL is let go once per round trip).

        Raises:
            psycopg.Error: what psycopg's ``execute`` would raise; OperationalError when the
                connection broke.
        """
        plan = self._plan(statement, statement.encode(args))
        answer = None
        try:
            while True:
                plan.send(answer)
                answer = self._answer()
        except StopIteration as done:
            return cast(pq.abc.PGresult, done.value)

    async def result_async(self, statement: Statement, args: Sequence[Any]) -> pq.abc.PGresult:
        """:meth:`result` on an event loop, which goes on with other work while the server
        answers (the loop watches the connection's socket; no thread is involved).

        The connection must be the caller's alone until this returns. Cancelled while the
        server is answering, the connection is left with a statement in flight: close it.

        Example:
            >>> row = statement.row(await conn.result_async(get, ("operations/1",)), 0)
        """
        plan = self._plan(statement, statement.encode(args))
        answer = None
        try:
            while True:
                plan.send(answer)
                answer = await self._answer_async()
        except StopIteration as done:
            return cast(pq.abc.PGresult, done.value)

    def _answer(self) -> pq.abc.PGresult:
        """The answer to the statement just sent, waited for (see :func:`_taken`)."""
        pgconn = self.pgconn
        results: list[pq.abc.PGresult] = []
        _read(pgconn)
        while True:
            while _waiting(pgconn):
                self._poll.poll()
                _read(pgconn)
            result = pgconn.get_result()
            if result is None:
                return _taken(results)
            results.append(result)

    async def _answer_async(self) -> pq.abc.PGresult:
        """The answer to the statement just sent, awaited (the loop runs other work meanwhile)."""
        pgconn = self.pgconn
        # One turn of the loop first: on a busy server the other work ready to run takes about
        # as long as the round trip, and the answer is then read without watching the socket.
        await asyncio.sleep(0)
        results: list[pq.abc.PGresult] = []
        _read(pgconn)
        while True:
            if _waiting(pgconn):
                loop = asyncio.get_running_loop()
                fd = pgconn.socket
                while True:
                    readable = loop.create_future()
                    loop.add_reader(fd, _ready, readable)
                    try:
                        await readable
                    finally:
                        loop.remove_reader(fd)
                    _read(pgconn)
                    if not _waiting(pgconn):
                        break
            result = pgconn.get_result()
            if result is None:
                return _taken(results)
            results.append(result)

    def _plan(
        self, statement: Statement, values: list[bytes | None]
    ) -> Generator[None, pq.abc.PGresult | None, pq.abc.PGresult]:
        """Running ``statement`` whoever waits for the server: sends each message (a
        blocking-mode connection sends all of a small one at once), then yields for its answer,
        which the driver sends in."""
        pgconn = self.pgconn
        for _ in range(2):
            if statement.name not in self._statements:
                pgconn.send_prepare(statement.name, statement.sql, statement.types)
                self._checked(cast(pq.abc.PGresult, (yield)))
                self._statements.add(statement.name)
            pgconn.send_query_prepared(
                statement.name,
                values,  # libpq takes None as NULL
                statement.formats,
                _BINARY,
            )
            result = cast(pq.abc.PGresult, (yield))
            if result.error_field(_SQLSTATE) != _NO_SUCH_STATEMENT:
                break
            # Deallocated under us (DISCARD ALL, a pooler's reset): prepared again, run again
            # (it did not run).
            self._statements.clear()
        return self._checked(result)

    def one(self, statement: Statement, args: Sequence[Any]) -> tuple[Any, ...] | None:
        """The first row ``statement`` returns, or None."""
        result = self.result(statement, args)
        return statement.row(result, 0) if result.ntuples else None

    async def one_async(self, statement: Statement, args: Sequence[Any]) -> tuple[Any, ...] | None:
        """:meth:`one` on an event loop (see :meth:`result_async`)."""
        result = await self.result_async(statement, args)
        return statement.row(result, 0) if result.ntuples else None

    def count(self, statement: Statement, args: Sequence[Any]) -> int:
        """How many rows ``statement`` changed."""
        return self.result(statement, args).command_tuples or 0

    def _checked(self, result: pq.abc.PGresult) -> pq.abc.PGresult:
        if result.status in _OK:
            return result
        error = pg_errors.error_from_result(result, encoding="utf-8")
        if self.closed and not isinstance(error, psycopg.OperationalError):
            # libpq's own report that the server went away (no SQLSTATE): as psycopg says it.
            raise psycopg.OperationalError(str(error)) from error
        raise error
