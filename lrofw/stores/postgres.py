"""The PostgreSQL store: operations in a database schema, shared by replicas on many machines.

Needs the ``postgres`` extra (psycopg 3); ``lrofw.stores.PostgresStore`` imports
this module only when it is first used.
"""

from __future__ import annotations

import builtins
import logging
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import psycopg
from google.protobuf import any_pb2
from google.rpc import status_pb2

from .. import _check, _core
from ..listing import Node
from . import _pg_list, _pg_notify, _pg_pool, _pg_schema
from ._pg_statement import Conn, Statement
from .base import (
    DuplicateRequest,
    NewOperation,
    Operation,
    Orphan,
    Record,
    StoreOpenError,
    normalize_method,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Rows one expiry transaction removes.
_EXPIRY_CHUNK = 500

#: Names one ``states`` query asks about.
_STATES_CHUNK = 1000


def _has_nul(*texts: str | None) -> bool:
    """PostgreSQL text cannot hold NUL: a name with one is never stored, so never found."""
    return any(t is not None and "\x00" in t for t in texts)


def _row(row: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    return row


def _stored_text(what: str, value: str | None) -> None:
    if value is not None and "\x00" in value:
        raise ValueError(
            f"{what} {value[:80]!r} has a NUL character, which PostgreSQL cannot store"
        )


class PostgresStore:
    """Operations in a PostgreSQL schema, shared by every replica that opens it: leases and
    rescue across machines, request-id idempotency, and wake-ups between replicas by
    LISTEN/NOTIFY.

    Args:
        dsn: a libpq connection string or URL (``postgresql://user@host:5432/db``).
        schema: the schema that holds the store's tables, created (with them) if missing.
        min_connections: connections the pool keeps open.
        max_connections: connections the pool opens at most (besides the one that listens).
        connect_timeout: seconds a call waits for a connection (and a new connection for the
            server) before it fails with :class:`StoreUnavailable`.
        statement_timeout: seconds a statement may run before the server cancels it.
        idle_in_transaction_timeout: seconds a connection may sit in an open transaction before
            the server ends it (the store never leaves one open between statements).
        resync_interval: seconds between the safety ticks that make the manager re-read what
            it waits on and runs, in case a notification was lost.

    Raises:
        StoreOpenError: the server cannot be reached, refuses the user or the database, or the
            schema is newer than this lrofw knows.
        TypeError, ValueError: an argument of the wrong type or out of range.

    Example:
        >>> store = PostgresStore("postgresql://app@db.internal:5432/app", schema="lrofw")
        >>> manager = lrofw.Manager(store=store)
    """

    shared = True
    blocking = True

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "lrofw",
        min_connections: int = 1,
        max_connections: int = 10,
        connect_timeout: float = 5.0,
        statement_timeout: float = 30.0,
        idle_in_transaction_timeout: float = 60.0,
        resync_interval: float = 1.0,
    ) -> None:
        dsn = _check.text("dsn", dsn)
        self.schema = _pg_schema.check_schema(schema)
        min_connections = _check.count("min_connections", min_connections, 0)
        max_connections = _check.count("max_connections", max_connections, 1)
        if max_connections < min_connections:
            raise ValueError(
                f"max_connections ({max_connections}) must be at least min_connections"
                f" ({min_connections})"
            )
        connect_timeout = _check.positive_seconds("connect_timeout", connect_timeout)
        statement_timeout = _check.positive_seconds("statement_timeout", statement_timeout)
        idle_in_transaction_timeout = _check.positive_seconds(
            "idle_in_transaction_timeout", idle_in_transaction_timeout
        )
        self._resync = _check.positive_seconds("resync_interval", resync_interval)
        self._closed = False
        self._s = s = _pg_schema.quoted(self.schema)
        self._channel = _pg_schema.channel(self.schema)
        self._db = _pg_pool.Connections(
            dsn,
            schema=self.schema,
            min_connections=min_connections,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            statement_timeout=statement_timeout,
            idle_in_transaction_timeout=idle_in_transaction_timeout,
        )
        try:
            with self._db.connect() as conn:
                self._key = _pg_schema.migrate(conn, self.schema)
        except StoreOpenError:
            raise
        except psycopg.Error as exc:
            raise _pg_schema.open_error(dsn, self.schema, exc) from exc
        self._db.open()
        me = uuid.uuid4().hex  # this store's notifications name it: its own listener skips them
        self._listener = _pg_notify.Listener(
            self._db.connect_listener, self._channel, resync=self._resync, me=me
        )
        # Notifications only while another replica listens (see _pg_notify).
        self._notifier = _pg_notify.Notifier(self._send, me, self._listener.audience)
        # The statements every operation makes, prepared on each connection (the schema in
        # place once). Type letters: see _pg_statement.Statement; RECORD's are "btffit".
        self._insert = Statement(
            f"INSERT INTO {s}.ops(name, method, create_time, owner, request, request_key,"
            " request_hash, principal, data) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            " ON CONFLICT DO NOTHING RETURNING position",
            "ttftbbbtb",
            "i",
        )
        self._get = Statement(
            f"SELECT {_pg_list.RECORD} FROM {s}.ops WHERE name = $1", "t", "btffit"
        )
        self._finish = Statement(
            f"UPDATE {s}.ops SET done = 1, error_code = $1, done_time = $2, data = data || $3,"
            " owner = NULL, request = NULL WHERE name = $4 AND done = 0"
            " AND ($5::text IS NULL OR owner = $5)"
            " RETURNING data, method, create_time, position, principal",
            "ifbtt",
            "btfit",
        )
        self._finished_row = Statement(
            f"SELECT data, method, create_time, position, principal, done_time FROM {s}.ops"
            " WHERE name = $1 AND done = 1",
            "t",
            "btfitf",
        )
        self._delete = Statement(f"DELETE FROM {s}.ops WHERE name = $1", "t")
        self._notify = Statement("SELECT pg_notify($1, $2)", "tt")

    def _send(self, payloads: list[str]) -> None:
        def send(conn: Conn) -> None:
            for payload in payloads:  # one, unless the names fill more than 7,900 bytes
                conn.count(self._notify, (self._channel, payload))

        self._db.run(send, "notified", again=send)  # a notification twice is harmless

    # --- operations -----------------------------------------------------------------------------

    def insert(self, operation: Operation, now: float, new: NewOperation) -> Record:
        call = self._inserting(operation, now, new)
        return self._db.run(call.run, "written", again=call.again)

    async def insert_async(self, operation: Operation, now: float, new: NewOperation) -> Record:
        """:meth:`insert` for a coroutine: the statement runs on the event loop (see
        ``_pg_pool.Connections.run_async``), which goes on with other work meanwhile.

        Example:
            >>> record = await store.insert_async(Operation(name="operations/1"), now, new)
        """
        return await self._db.run_async(self._inserting(operation, now, new), "written")

    def _inserting(
        self, operation: Operation, now: float, new: NewOperation
    ) -> _pg_pool.Call[Record]:
        """The insert as a call: its statement, what its row means, and the whole of it."""
        name = operation.name
        method = normalize_method(new.method)
        _stored_text("operation name", name)
        _stored_text("method", method)
        _stored_text("principal", new.principal)
        key = None if new.request_key is None else new.request_key.encode("utf-8", "surrogatepass")
        args = (
            name,
            method,
            now,
            new.owner,
            new.request,
            key,
            new.request_hash,
            new.principal,
            operation.SerializeToString(),
        )
        s = self._s

        def made(row: tuple[Any, ...]) -> Record:
            return Record(_core.copy(operation), method, now, None, row[0], new.principal)

        def inserted(row: tuple[Any, ...] | None) -> Record | _pg_pool.Full:
            return _pg_pool.FULL if row is None else made(row)  # None: a conflict (see run)

        def run(conn: Conn, *, retried: bool = False) -> Record:
            while True:
                row = conn.one(self._insert, args)
                if row is not None:
                    return made(row)
                # A conflict: the request key (checked first, as every store does) or the name.
                # Run again after a broken attempt, the conflict may be with that attempt's own
                # row (it committed): a row with this name, method and create time is that one.
                if key is not None:
                    seen = conn.execute(
                        f"SELECT {_pg_list.RECORD}, request_hash FROM {s}.ops"
                        " WHERE request_key = %s",
                        (key,),
                    ).fetchone()
                    if seen is not None:
                        record = _pg_list.record(seen)
                        if retried and record.operation.name == name and record.create_time == now:
                            return record
                        digest = None if seen[6] is None else bytes(seen[6])
                        raise DuplicateRequest(record, digest)
                row = conn.one(self._get, (name,))
                if row is not None:
                    if retried and row[1] == method and row[2] == now:
                        return _pg_list.record(row)
                    raise KeyError(name)
                # The operation it conflicted with was deleted meanwhile: try again.

        def again(conn: Conn) -> Record:
            return run(conn, retried=True)

        return _pg_pool.Call(self._insert, args, inserted, run, again)

    def get(self, name: str) -> Record | None:
        if _has_nul(name):
            return None
        row = self._db.read(lambda conn: conn.one(self._get, (name,)))
        return None if row is None else _pg_list.record(row)

    def _change(
        self,
        name: str,
        owner: str | None,
        change: Callable[[tuple[Any, ...]], tuple[str, tuple[Any, ...], T]],
    ) -> T | None:
        """Read-modify-write of unfinished ``name`` without a transaction held across the two:
        the update applies only to the row version read (``xmin``), else it reads again. None
        when ``name`` is missing, done, or (with ``owner``) owned by another (or none)."""
        s = self._s

        def run(conn: Conn) -> T | None:
            while True:
                row = conn.execute(
                    f"SELECT data, method, create_time, position, principal, owner, xmin::text"
                    f" FROM {s}.ops WHERE name = %s AND done = 0",
                    (name,),
                ).fetchone()
                if row is None or (owner is not None and row[5] != owner):
                    return None
                assignments, values, result = change(row)
                updated = conn.execute(
                    f"UPDATE {s}.ops SET {assignments} WHERE name = %s AND done = 0"
                    " AND xmin = %s::xid",
                    (*values, name, row[6]),
                )
                if updated.rowcount == 1:
                    return result

        if _has_nul(name):
            return None
        # Safe to run again: after a broken attempt that committed, it reads the changed row.
        return self._db.run(run, "written", again=run)

    def set_metadata(self, name: str, metadata: any_pb2.Any, *, owner: str | None = None) -> bool:
        def change(row: tuple[Any, ...]) -> tuple[str, tuple[Any, ...], bool]:
            op = _core.with_metadata(Operation.FromString(row[0]), metadata)
            return "data = %s", (op.SerializeToString(),), True

        return bool(self._change(name, owner, change))

    def finish(
        self,
        name: str,
        now: float,
        *,
        response: any_pb2.Any | None = None,
        error: status_pb2.Status | None = None,
        owner: str | None = None,
    ) -> Record | None:
        call = self._finishing(name, now, response, error, owner)
        if call is None:
            return None
        return self._finished(name, now, self._db.run(call.run, "written", again=call.again))

    async def finish_async(
        self,
        name: str,
        now: float,
        *,
        response: any_pb2.Any | None = None,
        error: status_pb2.Status | None = None,
        owner: str | None = None,
    ) -> Record | None:
        """:meth:`finish` for a coroutine: the statement runs on the event loop (see
        ``_pg_pool.Connections.run_async``), which goes on with other work meanwhile.

        Example:
            >>> record = await store.finish_async(name, now, response=packed, owner=owner)
        """
        call = self._finishing(name, now, response, error, owner)
        if call is None:
            return None
        return self._finished(name, now, await self._db.run_async(call, "written"))

    def _finishing(
        self,
        name: str,
        now: float,
        response: any_pb2.Any | None,
        error: status_pb2.Status | None,
        owner: str | None,
    ) -> _pg_pool.Call[tuple[Any, ...] | None] | None:
        """The finish as a call (None: nothing to finish): the changed row, or None."""
        if (response is None) == (error is None):
            raise ValueError("an operation finishes with exactly one of response or error")
        if _has_nul(name):
            return None
        # One statement: a serialized message followed by more fields is that message with
        # them set, so the stored operation plus ``done`` and its response (or error) is the
        # finished one, made where it lies. The request is dropped with the same write (the
        # idempotency hash stays while the operation does).
        tail = Operation(done=True, response=response, error=error).SerializeToString()
        args = (0 if error is None else error.code, now, tail, name, owner)

        def run(conn: Conn) -> tuple[Any, ...] | None:
            return conn.one(self._finish, args)

        def again(conn: Conn) -> tuple[Any, ...] | None:
            row = conn.one(self._finish, args)
            if row is None:
                # The broken attempt may have committed: then the operation is done at this
                # very time, with this outcome last in its data.
                done = conn.one(self._finished_row, (name,))
                if done is not None and done[5] == now and done[0].endswith(tail):
                    return done[:5]
            return row

        return _pg_pool.Call(self._finish, args, _row, run, again)

    def _finished(self, name: str, now: float, row: tuple[Any, ...] | None) -> Record | None:
        if row is None:
            return None
        self._notifier.post([name])  # committed: waiters and handlers elsewhere learn of it
        return Record(Operation.FromString(row[0]), row[1], row[2], now, row[3], row[4])

    def delete(self, name: str) -> bool:
        if _has_nul(name):
            return False
        deleted = self._db.run(lambda c: c.count(self._delete, (name,)) == 1, "written")
        if deleted:
            self._notifier.post([name])
        return deleted

    def list(
        self,
        where: Node,
        before: int | None,
        limit: int,
        *,
        principal: str | None = None,
        max_scan: int | None = None,
        max_bytes: int | None = None,
    ) -> tuple[builtins.list[Record], int | None]:
        read = _pg_list.reader(
            self._s,
            where,
            before,
            limit,
            principal=principal,
            max_scan=max_scan,
            max_bytes=max_bytes,
        )
        return ([], None) if read is None else self._db.read(read)

    def expire(self, cutoff: float, limit: int) -> builtins.list[str]:
        s = self._s

        def chunk(conn: Conn, size: int) -> builtins.list[str] | None:
            with conn.transaction():
                # One replica expires at a time; the others find the lock taken and leave it.
                got = conn.execute(
                    "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))",
                    (_pg_schema.LOCK_SPACE, _pg_schema.lock_key(self.schema, "expire")),
                ).fetchone()
                if not got or not got[0]:
                    return None
                rows = conn.execute(
                    f"DELETE FROM {s}.ops WHERE position IN (SELECT position FROM {s}.ops"
                    " WHERE done = 1 AND done_time <= %s ORDER BY done_time, position LIMIT %s"
                    " FOR UPDATE SKIP LOCKED) RETURNING done_time, position, name",
                    (cutoff, size),
                ).fetchall()
            return [r[2] for r in sorted(rows)]

        removed: builtins.list[str] = []
        while len(removed) < limit:
            size = min(_EXPIRY_CHUNK, limit - len(removed))
            names = self._db.run(lambda c, size=size: chunk(c, size), "written")  # type: ignore[misc]
            if names is None:
                break
            removed.extend(names)
            if len(names) < size:
                break
        return removed

    # --- ownership ------------------------------------------------------------------------------

    def renew(self, owner: str, lease_until: float) -> None:
        # One row per replica (a heartbeat), not a write per running operation. Owners that
        # died an hour ago (or more) are orphans whether or not their row stays: their rows go.
        def write(conn: Conn) -> None:
            conn.execute(
                f"WITH gone AS (DELETE FROM {self._s}.owners WHERE lease_until < %s"
                " AND owner <> %s)"
                f" INSERT INTO {self._s}.owners(owner, lease_until) VALUES (%s, %s)"
                " ON CONFLICT (owner) DO UPDATE SET lease_until = EXCLUDED.lease_until",
                (lease_until - 3600, owner, owner, lease_until),
            )

        self._db.run(write, "written", again=write)  # twice is once

    def release(self, owner: str) -> None:
        def write(conn: Conn) -> None:
            conn.execute(f"DELETE FROM {self._s}.owners WHERE owner = %s", (owner,))

        self._db.run(write, "written", again=write)  # twice is once
        self._notifier.post([""])  # its operations are orphans now: peers may take them at once

    def orphans(self, now: float, limit: int) -> builtins.list[Orphan]:
        s = self._s
        # SKIP LOCKED: rows another replica is claiming (or finishing) this instant are left to
        # it; the claim itself is compare-and-set, so two rescuers never take one operation.
        rows = self._db.read(
            lambda c: c.execute(
                f"SELECT name, method, owner, request, lost FROM {s}.ops AS o WHERE done = 0"
                f" AND (owner IS NULL OR NOT EXISTS (SELECT 1 FROM {s}.owners AS w"
                " WHERE w.owner = o.owner AND w.lease_until > %s))"
                " LIMIT %s FOR UPDATE OF o SKIP LOCKED",
                (now, limit),
            ).fetchall()
        )
        return [Orphan(r[0], r[1], r[2], None if r[3] is None else bytes(r[3]), r[4]) for r in rows]

    def claim(self, name: str, old_owner: str | None, new_owner: str) -> bool:
        if _has_nul(name):
            return False
        # Each claim moves the operation's epoch on; taking over from a lost owner counts a
        # loss, from none (handed over, or never owned) does not.
        return self._db.run(
            lambda c: (
                c.execute(
                    f"UPDATE {self._s}.ops SET owner = %s, epoch = epoch + 1, lost = lost + %s"
                    " WHERE name = %s AND done = 0 AND owner IS NOT DISTINCT FROM %s",
                    (new_owner, 0 if old_owner is None else 1, name, old_owner),
                ).rowcount
                == 1
            ),
            "written",
        )

    def hand_over(self, name: str, owner: str) -> bool:
        if _has_nul(name):
            return False
        handed = self._db.run(
            lambda c: (
                c.execute(
                    f"UPDATE {self._s}.ops SET owner = NULL WHERE name = %s AND done = 0"
                    " AND owner = %s",
                    (name, owner),
                ).rowcount
                == 1
            ),
            "written",
        )
        if handed:
            self._notifier.post([name])  # a peer resumes it now, not at its next recovery pass
        return handed

    # --- change detection -----------------------------------------------------------------------

    def version(self) -> int:
        # No round trip: the listener's count of notifications, reconnects and safety ticks.
        return self._listener.version

    def on_change(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` (quickly, from the listening thread) whenever :meth:`version`
        moves: a manager's watcher then looks at once, not at its next poll."""
        self._listener.on_change(callback)

    def states(self, names: Iterable[str]) -> dict[str, bool]:
        wanted = [n for n in names if not _has_nul(n)]
        out: dict[str, bool] = {}
        for i in range(0, len(wanted), _STATES_CHUNK):
            chunk = wanted[i : i + _STATES_CHUNK]
            rows = self._db.read(
                lambda c, chunk=chunk: c.execute(  # type: ignore[misc]
                    f"SELECT name, done FROM {self._s}.ops WHERE name = ANY(%s)", (chunk,)
                ).fetchall()
            )
            out.update((r[0], bool(r[1])) for r in rows)
        return out

    def token_key(self) -> bytes:
        return self._key

    def close(self) -> None:
        if self._closed:
            return
        self._notifier.close()  # what finished just before is still told to the peers
        self._closed = True
        self._listener.close()
        self._db.close()
