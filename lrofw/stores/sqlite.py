"""The SQLite store: one file, durable across restarts, shared by processes on one machine."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar, cast

from google.protobuf import any_pb2
from google.rpc import status_pb2

from .. import _check, _core
from ..listing import And, Comparison, Node, Or
from . import _sql, _sqlite_schema
from .base import (
    DuplicateRequest,
    NewOperation,
    Operation,
    Orphan,
    Record,
    StoreCorrupted,
    StoreError,
    StoreOpenError,
    StoreUnavailable,
    normalize_method,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Rows one expiry transaction removes (about a millisecond of work).
_EXPIRY_CHUNK = 16

#: Seconds between passive WAL checkpoints by the store's own thread.
_CHECKPOINT_INTERVAL = 0.2

#: WAL size (bytes of pages) past which a checkpoint makes the WAL start again.
_WAL_RESTART_BYTES = 64 * 1024 * 1024

#: Passive checkpoints run back to back before a rewind, each copying what was written during the
#: one before, until one finds at most ``_CAUGHT_UP_FRAMES`` new frames or no fewer than the one
#: before (see _restart_wal).
_CATCH_UP_PASSES = 4
_CAUGHT_UP_FRAMES = 64

#: How long (ms) rewinding the WAL may wait for readers and for other processes' writer before it
#: gives up (the next checkpoint tries again).
_WAL_RESTART_WAIT_MS = 5

#: The WAL file is cut back to this size (bytes) when it starts again.
_WAL_SIZE_LIMIT = 64 * 1024 * 1024

#: Seconds a write may wait in the queue before its group's wait for a foreign lock is shortened
#: by as much (below it, the busy timeout is left alone: setting it costs a statement).
_SHORTEN_AFTER = 0.1

#: Writes one group commit takes in at most, as they queue while it runs (see _commit).
_GROUP_MAX = 256

#: Page cache of each read connection, in KiB.
_READ_CACHE_KIB = 16384

#: Read connections at most (opened as reads overlap), and how many of them scans (listing) may
#: hold at once: the rest stay for point reads, so a Get never queues behind the lists.
_READERS, _SCANNERS = 4, 1

#: Each scan is owed a pause of ``_SCAN_PAUSE`` times as long as it took (at most
#: ``_SCAN_PAUSE_MAX`` seconds), and a scan waits only once the pauses owed exceed
#: ``_SCAN_BURST`` seconds (see :class:`_ScanPacer`): listing, however many clients do it at
#: once, takes at most about a third of one core, point reads keep the rest, and a client that
#: lists now and then never waits.
_SCAN_PAUSE, _SCAN_PAUSE_MAX, _SCAN_BURST = 2.0, 0.05, 0.05

#: SQLite's primary result codes that mean the file is damaged: SQLITE_CORRUPT, SQLITE_NOTADB.
_CORRUPTION_CODES = (11, 26)

#: Seconds a look at the file (see ``SQLiteStore._attached``) holds for the writes after it. One
#: look per write cost a sync server about a tenth of its create-then-wait throughput (each
#: ``stat`` lets go of the GIL, and getting it back waits behind the other threads); within this
#: window writes trust the last look.
_FILE_LOOK = 0.01

#: The clock of those looks (tests set a fake one).
_clock = time.monotonic

#: What a client is told (with "; retry later") once the store's file is gone.
_GONE = (
    "the operation store cannot be used: its file was removed or replaced while the server was"
    " running"
)

#: The schema this code writes (see ``_sqlite_schema``). A file with a newer one is refused;
#: older ones are migrated.
SCHEMA_VERSION = _sqlite_schema.SCHEMA_VERSION

_RECORD = "data, method, create_time, done_time, position, principal"


def _expire_chunk(conn: sqlite3.Connection, cutoff: float, size: int) -> list[str]:
    """Delete up to ``size`` expired operations, oldest finish first; their names in that
    order."""
    rows = conn.execute(
        "SELECT position, name FROM ops WHERE done = 1 AND done_time <= ?"
        " ORDER BY done_time LIMIT ?",
        (cutoff, size),
    ).fetchall()
    if rows:
        # The gap mark first: then the schema's trigger finds it risen for every row.
        conn.execute(_sqlite_schema.RAISE_FLOOR, (max(r[0] for r in rows),))
        marks = ", ".join("?" * len(rows))
        conn.execute(f"DELETE FROM ops WHERE position IN ({marks})", [r[0] for r in rows])
    return [r[1] for r in rows]


def _failed_only(node: Node) -> bool:
    """Whether ``node`` matches only failed operations (``error.code = 5``, alone or ANDed with
    more): those the ``ops_error`` index holds. SQLite uses a partial index only for a query
    that states the index's condition, so the store adds it to such a query."""
    if isinstance(node, Comparison):
        return node.field == "error.code" and node.op == "=" and node.value != 0
    if isinstance(node, And):
        return any(_failed_only(term) for term in node.terms)
    if isinstance(node, Or):
        return bool(node.terms) and all(_failed_only(term) for term in node.terms)
    return False


def _is_corruption(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite finding the file damaged (not busy, full or read-only)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in _CORRUPTION_CODES
    return any(text in str(exc) for text in ("malformed", "not a database"))


def _in_doubt(exc: BaseException) -> bool:
    """Whether ``exc`` puts a whole transaction in doubt (rather than being one write's own)."""
    return isinstance(exc, (sqlite3.OperationalError, StoreUnavailable)) or _is_corruption(exc)


def _identity(path: str) -> tuple[int, int] | None:
    """The file at ``path`` (device, inode), or None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _create_private(path: str) -> None:
    """Creates a missing store file with mode 0600 (SQLite gives its -wal and -shm files the
    same mode); a file that exists is left as it is."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return  # it exists, or cannot be made: then SQLite says why when it opens it
    os.close(fd)


def _record(row: tuple[bytes, str, float, float | None, int, str | None]) -> Record:
    return Record(Operation.FromString(row[0]), row[1], row[2], row[3], row[4], row[5])


def _page(
    rows: Iterable[tuple[bytes, str, float, float | None, int, str | None]],
    limit: int,
    max_bytes: int | None,
) -> tuple[builtins.list[Record], bool]:
    """Up to ``limit`` records of ``rows`` within about ``max_bytes`` (at least one), read one
    row at a time so that a page of large operations is never fetched whole; and whether rows
    were left over."""
    out: builtins.list[Record] = []
    size = 0
    for row in rows:
        if len(out) == limit or (max_bytes is not None and out and size + len(row[0]) > max_bytes):
            return out, True
        out.append(_record(row))
        size += len(row[0])
    return out, False


class _ScanPacer:
    """Spaces scans so that they take at most their share of the time.

    Each scan uses its own duration and owes a pause ``pause`` times as long (at most
    ``pause_max``): scans that follow each other closely get one third of the time at
    ``pause`` 2. A scan starts at once while what is owed is within ``burst`` seconds, so a
    client that lists now and then, or at a pace the share allows give or take some jitter,
    never waits. (The generic cell rate algorithm: ``_due`` is when the scans so far would
    have ended, their pauses included, had each started as soon as it could.)

    Not thread-safe: the store calls it holding the scans' semaphore.

    Example:
        >>> pacer = _ScanPacer(pause=2.0, pause_max=0.05, burst=0.05)
        >>> pacer.paced(lambda: "page")  # starts at once, then owes twice as long as it took
        'page'
    """

    def __init__(
        self,
        *,
        pause: float,
        pause_max: float,
        burst: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self._pause, self._pause_max, self._burst = pause, pause_max, burst
        self._clock, self._sleep = clock, sleep
        self._due = -math.inf

    def paced(self, scan: Callable[[], T]) -> T:
        """Run ``scan`` once its turn has come; what it returns."""
        wait = self._due - self._burst - self._clock()
        if wait > 0:
            self._sleep(wait)
        started = self._clock()
        try:
            return scan()
        finally:
            took = max(0.0, self._clock() - started)
            owed = min(self._pause * took, self._pause_max)
            self._due = max(self._due, started) + took + owed


def _snapshot(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """``fn`` in one read transaction: all its statements see the file as it was at one time."""
    conn.execute("BEGIN")
    try:
        return fn(conn)
    finally:
        if conn.in_transaction:  # a failed statement may have ended it already
            conn.execute("ROLLBACK")  # it only read: nothing to keep


#: Makes several writes of one kind in one statement (see ``SQLiteStore._commit``): sets each
#: job's result to what its ``fn`` would have returned. It may raise ``_Apart`` (or a constraint
#: error, having changed nothing) for writes that must be made one by one.
_Bulk = Callable[[sqlite3.Connection, "builtins.list[_Job]"], None]


class _Apart(Exception):
    """These writes cannot be made in one statement (two of them name one operation)."""


def _distinct(jobs: builtins.list[_Job]) -> None:
    if len({job.args[0] for job in jobs}) < len(jobs):
        raise _Apart


def _insert_many(conn: sqlite3.Connection, jobs: builtins.list[_Job]) -> None:
    _distinct(jobs)
    params = [value for i, job in enumerate(jobs) for value in (i, *job.args)]
    positions = dict(conn.execute(_sqlite_schema.insert_many(len(jobs)), params).fetchall())
    for job in jobs:
        job.result = positions[job.args[0]]


def _finish_many(conn: sqlite3.Connection, jobs: builtins.list[_Job]) -> None:
    _distinct(jobs)
    params = [value for job in jobs for value in job.args]
    rows = conn.execute(_sqlite_schema.finish_many(len(jobs)), params).fetchall()
    done = {row[0]: row[1:] for row in rows}
    for job in jobs:
        row = done.get(job.args[0])
        job.result = [] if row is None else [row]


def _finishing(
    name: str,
    now: float,
    response: any_pb2.Any | None,
    error: status_pb2.Status | None,
    owner: str | None,
) -> _Job:
    """The finish of ``name`` as a write (see ``SQLiteStore.finish``); its result is the
    statement's rows (see :func:`_finished`)."""
    if (response is None) == (error is None):
        raise ValueError("an operation finishes with exactly one of response or error")
    tail = Operation(done=True, response=response, error=error).SerializeToString()
    code = 0 if error is None else error.code
    params = (code, now, tail, name, owner, owner)
    return _Job(
        lambda c: c.execute(_sqlite_schema.FINISH, params).fetchall(),
        True,
        _finish_many,
        (name, code, now, tail, owner),
    )


def _finished(now: float, rows: builtins.list[Any]) -> Record | None:
    """The record a finish made, of its rows; None if it changed nothing (the operation is
    missing, done, or with an owner given, not owned by it)."""
    if not rows:
        return None
    data, method, create_time, position, principal = rows[0]
    return Record(Operation.FromString(data), method, create_time, now, position, principal)


class _Job:
    """One write waiting for (or done by) a group commit; see :meth:`SQLiteStore._write`."""

    __slots__ = (
        "args",
        "bulk",
        "error",
        "finished",
        "fn",
        "future",
        "gate",
        "queued_at",
        "result",
        "single",
    )

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        single: bool,
        bulk: _Bulk | None,
        args: tuple[Any, ...],
    ) -> None:
        self.fn = fn
        self.single = single  # fn runs exactly one statement (see _write)
        self.bulk = bulk  # how a group commit makes many such writes in one statement
        self.args = args  # this write's row for bulk
        self.queued_at = time.monotonic()
        #: Held until the job is done or should lead; None for a write that leads at once, and
        #: for a coroutine's write (``future``).
        self.gate: threading.Lock | None = None
        #: A coroutine's write: the future it awaits, settled on its loop once the write is
        #: done. Such a write never leads: the store's writer thread leads for it.
        self.future: asyncio.Future[Any] | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = False


def _settle_futures(jobs: builtins.list[_Job]) -> None:
    """On a loop: settle the futures of ``jobs`` (done writes) that are still awaited."""
    for job in jobs:
        future = job.future
        assert future is not None
        if future.done():  # the awaiting coroutine was cancelled meanwhile
            continue
        if job.error is not None:
            future.set_exception(job.error)
        else:
            future.set_result(job.result)


class SQLiteStore:
    """Operations in one SQLite file (WAL, synchronous=NORMAL): they survive a crash of the
    process (``kill -9``), and several processes on one machine can share the file.

    Args:
        path: the database file; created (with its schema) if missing.
        busy_timeout: seconds a call waits for another process's write before it fails with
            :class:`StoreUnavailable`.
        check: read the whole file at open (``PRAGMA quick_check``) and refuse a damaged one.
            It costs about 2 ms per 1,000 operations stored; False skips it (damage is then
            found only when a call reads the damaged pages: :class:`StoreCorrupted`).

    A file it creates is private to its user (mode 0600, and so are its ``-wal`` and ``-shm``
    files): it holds the page-token key and stored requests. A file that exists keeps its mode.

    If the file is removed or replaced while the store has it open, every call fails with
    :class:`StoreUnavailable` (and an ERROR log says what to do) from the store's next look at
    the file (at most 10 ms later), so that no later write is acknowledged that is not in the
    file at ``path``.

    Raises:
        StoreOpenError: the file cannot be opened or created, is not a SQLite database, is
            damaged, or has a schema newer than this code knows.
        TypeError, ValueError: an argument of the wrong type or out of range.

    Example:
        >>> store = SQLiteStore("ops.db")
        >>> manager = lrofw.Manager(store=store)
    """

    shared = True
    blocking = True

    def __init__(
        self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0, check: bool = True
    ) -> None:
        path = os.fspath(path) if isinstance(path, os.PathLike) else path
        self.path = _check.text("path", path)
        busy_timeout = _check.non_negative_seconds("busy_timeout", busy_timeout)
        _check.flag("check", check)
        # Every connection opens (and the file check stats) the same absolute path: a later
        # os.chdir must not point a relative one at another file.
        self._abspath = os.path.abspath(self.path)
        self._lock = threading.Lock()  # the write connection; held by a group commit
        self._queue_lock = threading.Lock()
        self._queue: builtins.list[_Job] = []  # writes waiting for the next group commit
        self._leading = False  # a write is committing a group (or about to)
        self._version_due = False  # version() found the write connection busy (see version)
        # Leads group commits for coroutines' writes (see _run_async); started on first use.
        self._writer: threading.Thread | None = None
        # Released: the writer thread is to lead (see _wake_writer). A lock, not a Semaphore
        # (a Condition in Python, several times the cost per wake-up): one lead at a time.
        self._writer_due = threading.Lock()
        self._writer_due.acquire()
        self._writer_leads = False  # under _queue_lock: the lead was handed to the writer thread
        if os.path.isdir(self.path):
            raise StoreOpenError(
                f"cannot open SQLite store {self.path!r}: it is a directory; name a file in it"
            )
        self._busy_timeout = busy_timeout
        _create_private(self._abspath)
        self._conn = self._connect()  # writes, under _lock
        try:
            if check:
                self._quick_check()
            self._open()
            # Reads get connections of their own: in WAL mode they run beside a write instead
            # of queueing behind it (an expiry pass, a checkpoint), and beside each other.
            first_reader = self._new_reader()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise StoreOpenError(
                f"cannot use {self.path!r} as an lrofw SQLite store: {exc}"
            ) from exc
        except StoreOpenError:
            self._conn.close()
            raise
        self._readers = [first_reader]  # idle read connections
        self._reader_count = 1  # idle and in use
        self._readers_free = threading.Condition()
        self._scans = threading.Semaphore(_SCANNERS)
        self._pacer = _ScanPacer(pause=_SCAN_PAUSE, pause_max=_SCAN_PAUSE_MAX, burst=_SCAN_BURST)
        # The file SQLite opened; see _attached. None: it cannot be told (nothing is checked).
        self._file = _identity(self._abspath)
        self._looked_until = _clock() + _FILE_LOOK  # see _attached
        self._file_lock = threading.Lock()  # orders the ERROR log with the state it reports
        self._detached = False  # the file at the path was not the one open, when last checked
        # Checkpoints copy the WAL back into the database file and fsync it: done inside a
        # commit (SQLite's default) they stall whichever request commits. A thread of the
        # store's own does them instead.
        self._conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
        self._closed = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="lrofw-sqlite-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _connect(self) -> sqlite3.Connection:
        try:
            return sqlite3.connect(
                self._abspath,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreOpenError(
                f"cannot open SQLite store {self.path!r}: {exc} "
                "(does the folder exist, and may this process write there?)"
            ) from exc

    def _checkpoint_loop(self) -> None:
        try:
            conn = self._connect()
        except StoreOpenError:
            logger.exception("the checkpoint thread cannot open %s", self.path)
            return
        try:
            page_size = self._page_size
            while not self._closed.wait(_CHECKPOINT_INTERVAL):
                try:
                    _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if frames * page_size >= _WAL_RESTART_BYTES:
                        self._restart_wal(conn, frames)
                except sqlite3.Error as exc:
                    logger.debug("checkpoint of %s skipped: %s", self.path, exc)
        finally:
            conn.close()

    def _restart_wal(self, conn: sqlite3.Connection, frames: int) -> int:
        """Under steady writes a passive checkpoint never catches up, and SQLite rewinds the WAL
        only once one has: it would grow without end. So once it is long (``frames``, all but
        what was written since copied back), a checkpoint on ``conn`` with the write lock held
        (so that the writes cannot starve it) copies the rest and lets the next write start the
        WAL again from its beginning (cut back to ``_WAL_SIZE_LIMIT`` bytes). Returns the WAL's
        frames if it did, else -1."""
        # The writes queue behind that copy and its syncs: first copy, without the lock, what
        # was written while the last checkpoint ran, for as long as that leaves less each time.
        written = -1
        for _ in range(_CATCH_UP_PASSES):
            _, after, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            since, frames = after - frames, after
            if since <= _CAUGHT_UP_FRAMES or 0 <= written <= since:  # caught up, or never will
                break
            written = since
        # It waits for readers (other processes' too) and other processes' writer: briefly, so
        # that the writes queued behind it are never held long; if it cannot finish now, a
        # later one will.
        conn.execute(f"PRAGMA busy_timeout = {_WAL_RESTART_WAIT_MS}")
        try:
            with self._lock:
                busy, frames, _ = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        return -1 if busy else int(frames)

    def _quick_check(self) -> None:
        """Refuses a damaged file before anything is written to it."""
        self._conn.execute("PRAGMA schema_version").fetchone()  # a non-database fails as such
        try:
            rows = self._conn.execute("PRAGMA quick_check(3)").fetchall()
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            problems = [str(exc)]
        else:
            problems = [str(row[0]) for row in rows if row[0] != "ok"]
        if problems:
            raise StoreOpenError(
                f"{self.path!r} is corrupt (PRAGMA quick_check: {'; '.join(problems)}); restore "
                "it from a backup, or move it aside (with its -wal and -shm files) to start with "
                "an empty store"
            )

    def _wal_mode(self) -> None:
        """Puts the file in WAL mode (it stays so). A file not yet in it (new, or made by other
        means) needs a moment alone for that: SQLite answers "locked" at once, without waiting,
        while another process opens it too; so this waits up to busy_timeout for it."""
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode=WAL").fetchone()
                return
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
                busy = code & 0xFF == 5 if code is not None else "locked" in str(exc)  # BUSY
                if not busy or time.monotonic() >= deadline:
                    raise
            time.sleep(0.005)  # another process's lock: nothing to wait on but time

    def _open(self) -> None:
        conn = self._conn
        conn.execute("PRAGMA schema_version").fetchone()  # fails at once on a non-database
        self._wal_mode()
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            _sqlite_schema.migrate(conn, self.path)
            conn.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('token_key', ?)", (os.urandom(32),)
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._key = bytes(
            conn.execute("SELECT value FROM meta WHERE key = 'token_key'").fetchone()[0]
        )
        self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        self._version = self._data_version()  # what version() answers (see there)

    # --- the file under the store --------------------------------------------------------------

    def _attached(self) -> bool:
        """Whether the file at the configured path is still the one this store has open.

        SQLite keeps writing to the file it opened, removed or not: a store whose file was
        removed (or replaced by a restored copy) would acknowledge writes that no later process
        will ever see. One stat tells; it is made at most once per ``_FILE_LOOK`` while the
        file is in place (the writes in between trust the last look: those in the first 10 ms
        after a removal go where the writes just before it went), and at every call once it is
        not. The watcher's tick looks too (``version``): a removal is noticed
        with no write at all.
        """
        if self._file is None:
            return True
        if not self._detached and _clock() < self._looked_until:
            return True
        now = _identity(self._abspath)
        attached = now == self._file
        if attached:
            self._looked_until = _clock() + _FILE_LOOK
            if not self._detached:
                return True  # as it was: nothing to log
        with self._file_lock:
            if attached == (not self._detached):
                return attached
            self._detached = not attached
            if attached:
                logger.warning("the SQLite store file %s is back in place; in use again", self.path)
            else:
                logger.error(
                    "the SQLite store file %s was %s while this process had it open: every store"
                    " call now fails (clients see UNAVAILABLE) until it is back. Stop this server,"
                    " put the file back at that path (or restore it from a backup), and start the"
                    " server again. While this process (pid %d) runs, the file it had open can"
                    " still be copied from /proc/%d/fd (Linux).",
                    self.path,
                    "removed" if now is None else "replaced by another file",
                    os.getpid(),
                    os.getpid(),
                )
        return attached

    def _check_file(self) -> None:
        """Raises StoreUnavailable unless the file at the path is the one this store has open."""
        if not self._attached():
            raise StoreUnavailable(_GONE)

    def _failure(self, exc: BaseException, doing: str) -> StoreError:
        """The store error for ``exc``, a failure of the store itself while ``doing``."""
        error: StoreError
        if _is_corruption(exc):
            error = StoreCorrupted(
                f"the operation store {self.path!r} is corrupt ({exc}) (found while {doing});"
                " stop every server using it and restore it from a backup, or salvage what is"
                f" readable with: sqlite3 {self.path} .recover"
            )
        elif isinstance(exc, StoreUnavailable):
            error = StoreUnavailable(str(exc))  # each writer raises an exception of its own
        else:
            error = StoreUnavailable(f"the operation store cannot be {doing}: {exc}")
        error.__cause__ = exc
        return error

    # --- the two ways in: reads and write transactions ----------------------------------------

    def _new_reader(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.execute("PRAGMA query_only = ON")
        conn.execute(f"PRAGMA cache_size = -{_READ_CACHE_KIB}")
        return conn

    def _take_reader(self) -> sqlite3.Connection:
        """An idle read connection; a new one while fewer than ``_READERS`` are open."""
        with self._readers_free:
            while not self._readers:
                if self._closed.is_set():
                    raise StoreUnavailable("the operation store is closed")
                if self._reader_count < _READERS:
                    self._reader_count += 1
                    break
                self._readers_free.wait()
            else:
                return self._readers.pop()
        try:
            return self._new_reader()
        except BaseException:
            with self._readers_free:
                self._reader_count -= 1
                self._readers_free.notify()
            raise

    def _give_reader(self, conn: sqlite3.Connection) -> None:
        with self._readers_free:
            self._readers.append(conn)
            self._readers_free.notify_all()  # a read waiting for one, or close waiting for all

    def _read(self, fn: Callable[[sqlite3.Connection], T], *, scan: bool = False) -> T:
        """Run ``fn`` on a read connection; ``scan`` (listing) holds one of the few connections
        scans may use, so point reads always find one."""
        if scan:
            with self._scans:
                # Scans keep their distance (see _ScanPacer): many listing at once share
                # about a third of a core; a client listing now and then never waits.
                return self._pacer.paced(lambda: self._read(fn))
        conn = self._take_reader()
        try:
            if self._detached:  # known gone: look again (it may be back), else refuse
                self._check_file()
            try:
                return fn(conn)
            except sqlite3.DatabaseError as exc:
                if not _in_doubt(exc):
                    raise
                raise self._failure(exc, "read") from exc
        finally:
            self._give_reader(conn)

    def _write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        single: bool = False,
        bulk: _Bulk | None = None,
        args: tuple[Any, ...] = (),
    ) -> T:
        """Run ``fn`` in a write transaction and commit it; raises what ``fn`` raised.

        ``single``: ``fn`` runs exactly one statement (and reads or writes nothing else), whose
        rows it reads to the end. Alone, such a write is that statement on its own (SQLite
        makes it a transaction: it takes the write lock at its start, as ``BEGIN IMMEDIATE``
        does), with no ``BEGIN`` and ``COMMIT`` round trips; in a group it needs no savepoint,
        since SQLite undoes a failed statement by itself.

        Group commit: a write joins the queue. With no write in progress it leads: it runs every
        queued write in one transaction, each in a savepoint of its own (so one write's failure
        undoes only its own changes), commits once, wakes the writers it served, and hands the
        lead to the first write that queued meanwhile. Writes that queue while a commit is in
        progress wait for the next one. Under load, one commit (one write of each changed page
        to the WAL) serves many. Writes of one kind (``bulk``: creates, finishes) are made in
        one statement for the whole group, from each one's ``args``; should that statement
        fail (a repeated name), each is made on its own.
        """
        return cast(T, self._run(_Job(fn, single, bulk, args)))

    def _run(self, job: _Job) -> Any:
        """Make the write ``job`` (see :meth:`_write`); its result, or raise its error."""
        with self._queue_lock:
            lead = not self._leading
            if lead:
                self._leading = True  # nobody writes: no gate, no hand-off
            else:
                job.gate = threading.Lock()
                job.gate.acquire()
            self._queue.append(job)
        if not lead:
            assert job.gate is not None
            job.gate.acquire()  # released once its group committed, or to make it the leader
        if not job.finished:
            self._lead(job, handed=not lead)
        if job.error is not None:
            raise job.error
        return job.result

    async def _run_async(self, job: _Job) -> Any:
        """:meth:`_run` for a coroutine, which waits without blocking its event loop: the write
        joins the same queue, and the store's writer thread (started on first use) leads the
        group commit whenever no thread is leading one. Every write of a group is settled on
        its loop with one call per loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        job.future = future
        with self._queue_lock:
            if self._closed.is_set():
                raise StoreUnavailable("the operation store is closed")
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._writer_loop, name="lrofw-sqlite-writer", daemon=True
                )
                self._writer.start()
            lead = not self._leading
            if lead:
                self._leading = self._writer_leads = True
            self._queue.append(job)
        if lead:
            self._wake_writer()  # the writer thread leads for it
        return await future

    def _writer_loop(self) -> None:
        """The writer thread: leads a group commit each time the lead is handed to it (a
        coroutine's write queued with no group in progress, or first in line after one). Once
        the store is closed it goes on until every coroutine's write queued before is made (no
        more can queue), then ends. What it acts on is ``_writer_leads`` and ``_closed``, set
        before each wake-up: a wake-up that finds the lock released already is lost, but one
        that released it is still to come, and looks."""
        while True:
            self._writer_due.acquire()
            while True:
                with self._queue_lock:
                    leads, self._writer_leads = self._writer_leads, False
                    if not leads:
                        if self._closed.is_set() and not any(
                            job.future is not None for job in self._queue
                        ):
                            return  # (a thread's write still queued is led by a thread)
                        break  # to wait for the lead
                try:
                    self._lead(None, handed=True)
                except Exception:  # a bug: the group was settled; the thread must go on leading
                    logger.exception("the writer thread of %s met an unexpected error", self.path)

    def _lead(self, job: _Job | None, *, handed: bool) -> None:
        """Commit every queued write (``job`` among them; None: the writer thread leads), wake
        the writers served, and hand the lead on. ``handed``: the lead was handed over while
        ``job`` waited in the queue."""
        batch = [] if job is None else [job]
        try:
            with self._lock:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                # Once writes queue up, more will come: the group takes in those that queue
                # while it runs, and commits when none is left.
                self._commit(batch, grow=(handed and job is not None) or len(batch) > 1)
                if self._version_due:  # asked for while this group held the connection
                    self._version_due = False
                    with contextlib.suppress(StoreError):
                        self._version = self._data_version()
        finally:
            for other in batch:
                if not other.finished:  # only if _commit itself broke
                    other.error = StoreUnavailable("the operation store cannot be written")
                    other.finished = True
            self._settle(batch, job)
            with self._queue_lock:  # hand over to the first write that queued meanwhile
                following = self._queue[0] if self._queue else None
                self._leading = following is not None
                if following is not None and following.gate is None:
                    self._writer_leads = True
            if following is not None:
                if following.gate is not None:
                    following.gate.release()
                else:  # a coroutine's write: the writer thread leads for it
                    self._wake_writer()
            if self._closed.is_set() and self._writer is not None:
                self._wake_writer()  # it looks again: it ends once no coroutine's write is left

    def _wake_writer(self) -> None:
        """Have the writer thread look: lead, if the lead was handed to it (``_writer_leads``),
        or, once closed, end. Only one lead is handed over at a time, so the lock is released
        already only when close() released it too: the writer then wakes once, and leads first
        if the lead is its own."""
        with contextlib.suppress(RuntimeError):
            self._writer_due.release()

    @staticmethod
    def _settle(batch: builtins.list[_Job], leader: _Job | None) -> None:
        """Wake the writers of ``batch`` (but ``leader``): a thread's by its gate, a coroutine's
        by its future, settled on its loop (one call per loop for the whole batch)."""
        loops: dict[asyncio.AbstractEventLoop, builtins.list[_Job]] = {}
        for job in batch:
            if job.future is not None:
                loops.setdefault(job.future.get_loop(), []).append(job)
            elif job is not leader:
                assert job.gate is not None
                job.gate.release()
        for loop, jobs in loops.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits them
                loop.call_soon_threadsafe(_settle_futures, jobs)

    def _commit(self, batch: builtins.list[_Job], *, grow: bool = False) -> None:
        """Run ``batch`` in one transaction (under ``_lock``); every job ends finished. ``grow``:
        writes that queue meanwhile join it (added to ``batch``), up to ``_GROUP_MAX``."""
        conn = self._conn
        alone = len(batch) == 1 and not grow
        # Each write waits for a foreign lock at most busy_timeout from when it queued, not from
        # when its group began: a write queued behind a group that waited gets only what is left.
        waited = time.monotonic() - batch[0].queued_at  # the queue's first is its oldest
        shortened = waited > _SHORTEN_AFTER
        try:
            if self._detached:  # known gone: refuse before taking the (orphaned) file's lock
                self._check_file()
            if shortened:
                left = max(0, int((self._busy_timeout - waited) * 1000))
                conn.execute(f"PRAGMA busy_timeout = {left}")
            try:
                if alone and batch[0].single:
                    # Nothing is acknowledged unless it is in the file at the configured path
                    # (as of the last look, see _attached): checked before the statement, so a
                    # refused write is not made at all (and StoreUnavailable keeps meaning
                    # "nothing was written", even if the file is put back).
                    self._check_file()
                    batch[0].result = batch[0].fn(conn)
                    return
                conn.execute("BEGIN IMMEDIATE")
            finally:
                if shortened:
                    conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            try:
                if alone:
                    batch[0].result = batch[0].fn(conn)
                else:
                    self._run_group(batch, grow)
                # Checked inside the transaction: a refused batch is rolled back.
                self._check_file()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except BaseException as exc:
            if alone and not _in_doubt(exc):
                batch[0].error = exc  # raised by the job itself: nothing was written
            else:
                # Disk full, read-only, locked past busy_timeout, I/O error, a damaged page, the
                # file gone (or a shared transaction that failed): none of them was written.
                for job in batch:
                    job.error = self._failure(exc, "written")
                    job.result = None
        finally:
            for job in batch:
                job.finished = True

    def _bulk(self, batch: builtins.list[_Job]) -> builtins.list[_Job]:
        """Make the writes of ``batch`` that have a ``bulk`` kind, several in one statement (in
        the group's transaction); return the writes left to make one by one."""
        kinds: dict[_Bulk, builtins.list[_Job]] = {}
        rest: builtins.list[_Job] = []
        for job in batch:
            if job.bulk is None:
                rest.append(job)
            else:
                kinds.setdefault(job.bulk, []).append(job)
        for bulk, jobs in kinds.items():
            for i in range(0, len(jobs), _sqlite_schema.MANY):
                chunk = jobs[i : i + _sqlite_schema.MANY]
                if len(chunk) == 1:
                    rest.extend(chunk)
                    continue
                try:
                    bulk(self._conn, chunk)
                except BaseException as exc:
                    if _in_doubt(exc):
                        raise
                    # A rule broken (a repeated name): SQLite undid the statement.
                    rest.extend(chunk)
        return rest

    def _run_group(self, batch: builtins.list[_Job], grow: bool) -> None:
        """Make ``batch``'s writes in the open transaction, each failing alone; with ``grow``,
        then those that queued meanwhile (added to ``batch``), until none is left."""
        conn = self._conn
        done = 0
        while done < len(batch):
            pending, done = batch[done:], len(batch)
            for job in self._bulk(pending):
                if job.single:
                    try:
                        job.result = job.fn(conn)
                    except BaseException as exc:
                        if _in_doubt(exc):
                            raise  # the whole transaction is in doubt: every job fails
                        job.error = exc  # SQLite undid the statement; the rest stands
                    continue
                conn.execute("SAVEPOINT write")
                try:
                    job.result = job.fn(conn)
                except BaseException as exc:
                    if _in_doubt(exc):
                        raise
                    conn.execute("ROLLBACK TO write")
                    job.error = exc
                conn.execute("RELEASE write")
            if grow and len(batch) < _GROUP_MAX:
                with self._queue_lock:
                    batch.extend(self._queue)
                    self._queue.clear()

    # --- operations -----------------------------------------------------------------------------

    def insert(self, operation: Operation, now: float, new: NewOperation) -> Record:
        job, record = self._inserting(operation, now, new)
        return record(self._run(job))

    async def insert_async(self, operation: Operation, now: float, new: NewOperation) -> Record:
        """:meth:`insert` for a coroutine: the write is made by the store's writer thread (in
        a group commit with the writes that meet it there), and the event loop goes on with
        other work meanwhile.

        Example:
            >>> record = await store.insert_async(Operation(name="operations/1"), now, new)
        """
        job, record = self._inserting(operation, now, new)
        return record(await self._run_async(job))

    def _inserting(
        self, operation: Operation, now: float, new: NewOperation
    ) -> tuple[_Job, Callable[[int], Record]]:
        """The insert as a write, and what makes its record of the position it returns."""
        data = operation.SerializeToString()
        method = normalize_method(new.method)
        params = (
            operation.name,
            method,
            now,
            new.owner,
            new.request,
            new.request_key,
            new.request_hash,
            new.principal,
            data,
        )

        def run(conn: sqlite3.Connection) -> int:
            if new.request_key is not None:
                row = conn.execute(
                    f"SELECT {_RECORD}, request_hash FROM ops WHERE request_key = ?",
                    (new.request_key,),
                ).fetchone()
                if row is not None:
                    raise DuplicateRequest(_record(row[:6]), row[6])
            try:
                cursor = conn.execute(_sqlite_schema.INSERT, params)
            except sqlite3.IntegrityError as exc:
                raise KeyError(operation.name) from exc
            assert cursor.lastrowid is not None
            return cursor.lastrowid

        def record(position: int) -> Record:
            return Record(_core.copy(operation), method, now, None, position, new.principal)

        if new.request_key is None:
            return _Job(run, True, _insert_many, params), record
        return _Job(run, False, None, ()), record  # the look-up and the insert: one transaction

    def get(self, name: str) -> Record | None:
        row = self._read(
            lambda c: c.execute(f"SELECT {_RECORD} FROM ops WHERE name = ?", (name,)).fetchone()
        )
        return None if row is None else _record(row)

    def set_metadata(self, name: str, metadata: any_pb2.Any, *, owner: str | None = None) -> bool:
        # A whole rewrite: merging an Any into the stored one would keep the old value where the
        # new one is empty.
        def run(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT data, owner FROM ops WHERE name = ? AND done = 0", (name,)
            ).fetchone()
            if row is None or (owner is not None and row[1] != owner):
                return False
            op = _core.with_metadata(Operation.FromString(row[0]), metadata)
            conn.execute("UPDATE ops SET data = ? WHERE name = ?", (op.SerializeToString(), name))
            return True

        return self._write(run)

    def finish(
        self,
        name: str,
        now: float,
        *,
        response: any_pb2.Any | None = None,
        error: status_pb2.Status | None = None,
        owner: str | None = None,
    ) -> Record | None:
        return _finished(now, self._run(_finishing(name, now, response, error, owner)))

    async def finish_async(
        self,
        name: str,
        now: float,
        *,
        response: any_pb2.Any | None = None,
        error: status_pb2.Status | None = None,
        owner: str | None = None,
    ) -> Record | None:
        """:meth:`finish` for a coroutine: the write is made by the store's writer thread (in
        a group commit with the writes that meet it there), and the event loop goes on with
        other work meanwhile.

        Example:
            >>> record = await store.finish_async(name, now, response=packed, owner=owner)
        """
        job = _finishing(name, now, response, error, owner)
        return _finished(now, await self._run_async(job))

    def delete(self, name: str) -> bool:
        # The schema's trigger (see _sqlite_schema) keeps the position if it is the largest ever
        # deleted, within this statement: it is never given again, and List knows of the gap.
        def run(c: sqlite3.Connection) -> bool:
            rows = c.execute("DELETE FROM ops WHERE name = ? RETURNING position", (name,))
            return bool(rows.fetchall())  # at most one: names are unique

        return self._write(run, single=True)

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
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if max_scan is not None and max_scan < 1:
            raise ValueError(f"max_scan must be at least 1, got {max_scan}")
        condition, params = _sql.compiled(where)
        if _failed_only(where):
            condition = f"error_code != 0 AND {condition}"
        # The records examined: the positions below the cursor (of one principal: its index).
        scope = "position < ?"
        scoped: builtins.list[object] = [2**63 - 1 if before is None else before]
        if principal is not None:
            scope, scoped = "principal = ? AND " + scope, [principal, *scoped]

        page = (
            f"SELECT {_RECORD} FROM ops WHERE {scope} AND position >= ? AND {condition}"
            " ORDER BY position DESC LIMIT ?"
        )

        def run(c: sqlite3.Connection) -> tuple[builtins.list[Record], int | None]:
            edge = None  # the last position a bounded scan may examine (None: no bound)
            cursors: builtins.list[sqlite3.Cursor] = []

            def query(lowest: int, below: builtins.list[object]) -> sqlite3.Cursor:
                cursors.append(c.execute(page, (*below, lowest, *params, limit + 1)))
                return cursors[-1]

            def rows() -> Iterator[tuple[bytes, str, float, float | None, int, str | None]]:
                nonlocal edge
                if max_scan is None:
                    yield from query(0, scoped)
                    return
                # The max_scan records below the cursor take at least max_scan positions from
                # the newest one down, so those from ``near`` up are all among them: read those
                # first. Only a page they do not fill needs the edge: ``near`` itself where no
                # operation at or above it was ever deleted (the schema's position floor, read
                # in this snapshot, whoever deleted), else found by walking max_scan records.
                newest = c.execute(
                    f"SELECT position FROM ops WHERE {scope} ORDER BY position DESC LIMIT 1",
                    scoped,
                ).fetchone()
                if newest is None:
                    return  # nothing below the cursor
                near = newest[0] + 1 - max_scan
                yield from query(near, scoped)
                if principal is None and near > c.execute(_sqlite_schema.READ_FLOOR).fetchone()[0]:
                    edge = near  # no gaps: the max_scan-th record is at ``near``
                    return
                row = c.execute(
                    f"SELECT position FROM ops WHERE {scope}"
                    " ORDER BY position DESC LIMIT 1 OFFSET ?",
                    (*scoped, max_scan - 1),
                ).fetchone()
                edge = None if row is None else row[0]
                lowest = 0 if edge is None else edge
                if lowest < near:
                    yield from query(lowest, [*scoped[:-1], near])

            try:
                records, cut = _page(rows(), limit, max_bytes)
            finally:
                for cursor in cursors:
                    cursor.close()
            if cut:
                return records, records[-1].position
            return records, edge  # the scan ended at its bound (go on below), or at the end

        if max_scan is None:
            return self._read(run, scan=True)
        return self._read(lambda c: _snapshot(c, run), scan=True)

    def expire(self, cutoff: float, limit: int) -> builtins.list[str]:
        # Small transactions with pauses between them: a request never waits long behind
        # expiry, however much expires.
        removed: builtins.list[str] = []
        while len(removed) < limit:
            size = min(_EXPIRY_CHUNK, limit - len(removed))
            started = time.monotonic()
            names = self._write(lambda c, size=size: _expire_chunk(c, cutoff, size))  # type: ignore[misc]
            removed.extend(names)
            if len(names) < size:
                break
            time.sleep(max(0.001, 2 * (time.monotonic() - started)))
        return removed

    # --- ownership ------------------------------------------------------------------------------

    def renew(self, owner: str, lease_until: float) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO owners(owner, lease_until) VALUES (?, ?)",
                (owner, lease_until),
            )
            # Owners that died an hour ago (or more) are orphans whether or not their row
            # stays; drop the rows so the table does not grow by one per crash.
            conn.execute("DELETE FROM owners WHERE lease_until < ?", (lease_until - 3600,))

        self._write(run)

    def release(self, owner: str) -> None:
        self._write(
            lambda c: c.execute("DELETE FROM owners WHERE owner = ?", (owner,)), single=True
        )

    def orphans(self, now: float, limit: int) -> builtins.list[Orphan]:
        rows = self._read(
            lambda c: c.execute(
                "SELECT name, method, owner, request, lost FROM ops WHERE done = 0"
                " AND (owner IS NULL"
                " OR owner NOT IN (SELECT owner FROM owners WHERE lease_until > ?)) LIMIT ?",
                (now, limit),
            ).fetchall()
        )
        return [Orphan(r[0], r[1], r[2], None if r[3] is None else bytes(r[3]), r[4]) for r in rows]

    def claim(self, name: str, old_owner: str | None, new_owner: str) -> bool:
        return self._write(
            lambda c: (
                c.execute(
                    # Taking over from a lost owner counts a loss; from none (handed over, or
                    # never owned) does not.
                    "UPDATE ops SET owner = ?, lost = lost + (? IS NOT NULL)"
                    " WHERE name = ? AND done = 0 AND owner IS ?",
                    (new_owner, old_owner, name, old_owner),
                ).rowcount
                == 1
            ),
            single=True,
        )

    def hand_over(self, name: str, owner: str) -> bool:
        return self._write(
            lambda c: (
                c.execute(
                    "UPDATE ops SET owner = NULL WHERE name = ? AND done = 0 AND owner = ?",
                    (name, owner),
                ).rowcount
                == 1
            ),
            single=True,
        )

    # --- change detection -----------------------------------------------------------------------

    def version(self) -> int:
        # The manager's watcher polls this: a removed file is noticed (and logged) with no
        # write at all. No exception for that here: the watcher would log one every tick.
        self._attached()
        # Asked of the write connection: it sees other processes' commits, not its own, so it
        # stays put while only this process writes. It never waits for a write in progress:
        # that write's group reads it for the next poll (see _lead), and this poll answers with
        # the last one read.
        if not self._lock.acquire(blocking=False):
            self._version_due = True
            return self._version
        try:
            self._version = self._data_version()
        finally:
            self._lock.release()
        return self._version

    def _data_version(self) -> int:
        """PRAGMA data_version of the write connection (under ``_lock``)."""
        try:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"the operation store cannot be read: {exc}") from exc

    def states(self, names: Iterable[str]) -> dict[str, bool]:
        wanted = list(names)
        out: dict[str, bool] = {}
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            marks = ", ".join("?" * len(chunk))
            rows = self._read(
                lambda c, chunk=chunk, marks=marks: c.execute(  # type: ignore[misc]
                    f"SELECT name, done FROM ops WHERE name IN ({marks})", chunk
                ).fetchall()
            )
            out.update((r[0], bool(r[1])) for r in rows)
        return out

    def token_key(self) -> bytes:
        return self._key

    def close(self) -> None:
        if self._closed.is_set():
            return
        with self._queue_lock:  # no coroutine's write queues from now on (see _run_async)
            self._closed.set()
        if self._writer is not None:  # it makes the coroutines' writes queued by now, and ends
            self._wake_writer()
            self._writer.join()
        self._checkpointer.join()
        with self._readers_free:  # every reader back; later reads are refused (closed)
            self._readers_free.notify_all()
            while len(self._readers) < self._reader_count:
                self._readers_free.wait()
            readers, self._readers = self._readers, []
            self._reader_count = _READERS  # none is opened again
        with self._lock:
            for conn in readers:
                conn.close()
            with contextlib.suppress(sqlite3.Error):  # tidy the WAL away if nobody reads
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            self._conn.close()
