"""The SQLite store's file under faults: removed or replaced while in use, corrupt, and private."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from factories import (
    create,
    delete,
    eventually,
    finished,
    get,
    list_ops,
    on_both_servers,
    returns,
    rpc_error,
    served,
)
from google.longrunning import operations_proto_pb2

import lrofw
from lrofw.listing import MatchAll
from lrofw.stores import (
    NewOperation,
    SQLiteStore,
    StoreCorrupted,
    StoreOpenError,
    StoreUnavailable,
)
from lrofw.stores import sqlite as sqlite_store
from lrofw.testing import Served

Operation = operations_proto_pb2.Operation

NOW = 1_700_000_000.0
METHOD = "/chromiumos.config.api.test.tls.Common/ProvisionDut"
ALL = MatchAll()


# --- helpers --------------------------------------------------------------------------------------


@pytest.fixture
def path(tmp_path: pathlib.Path) -> pathlib.Path:
    """Where the test's database file goes."""
    return tmp_path / "ops.db"


@pytest.fixture
def store(path: pathlib.Path) -> Iterator[SQLiteStore]:
    """A SQLiteStore on a fresh file, closed at the end."""
    opened = SQLiteStore(path)
    yield opened
    opened.close()


def add(store: SQLiteStore, stage: str = "") -> str:
    """Inserts an unfinished op (its metadata ``stage`` bytes long) and returns its name."""
    op = Operation(name=f"operations/{uuid.uuid4()}")
    if stage:
        op.metadata.value = stage.encode()
    return store.insert(op, NOW, NewOperation(METHOD)).operation.name


def names_in(path: pathlib.Path) -> set[str]:
    """The operations in the file at ``path``, read by a plain sqlite3 connection."""
    conn = sqlite3.connect(path)
    try:
        return {row[0] for row in conn.execute("SELECT name FROM ops")}
    finally:
        conn.close()


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages logged at ERROR or above."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@contextlib.contextmanager
def served_on(store: SQLiteStore, aio: bool) -> Iterator[Served]:
    """A real gRPC server (sync or aio) whose manager keeps its operations in ``store``."""
    with served(returns, manager=lrofw.Manager(store=store), aio=aio) as srv:
        yield srv


# --- the file removed or replaced -----------------------------------------------------------------


@pytest.fixture
def looks_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store looks at its file at every write, not once per ``_FILE_LOOK`` seconds."""
    monkeypatch.setattr(sqlite_store, "_FILE_LOOK", 0.0)


class Looks:
    """A fake clock for the store's looks at its file, and a count of those looks."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        self.count = 0
        identity = sqlite_store._identity

        def counted(path: str) -> Any:
            self.count += 1
            return identity(path)

        monkeypatch.setattr(sqlite_store, "_clock", lambda: self.now)
        monkeypatch.setattr(sqlite_store, "_identity", counted)


def test_the_file_is_looked_at_once_per_interval_while_it_is_in_place(
    path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes trust the last look at the file for ``_FILE_LOOK`` seconds (a stat per write
    costs a server a tenth of its throughput); past it, the next write looks, and one after a
    removal is refused. Once the file is gone, every call looks (it may be back)."""
    looks = Looks(monkeypatch)
    store = SQLiteStore(path)
    try:
        opened = looks.count
        for _ in range(5):
            add(store)
        assert looks.count == opened  # within the interval of the look at open
        looks.now += sqlite_store._FILE_LOOK
        add(store)
        add(store)
        assert looks.count == opened + 1
        os.remove(path)
        add(store)  # within the interval: written where the writes before it went
        looks.now += sqlite_store._FILE_LOOK
        for _ in range(3):
            with pytest.raises(StoreUnavailable, match="removed or replaced"):
                add(store)
        assert looks.count == opened + 4
    finally:
        store.close()



@pytest.mark.usefixtures("looks_every_time")
def test_a_removed_file_refuses_the_next_write_and_says_what_to_do(
    store: SQLiteStore, path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Once the file is removed, writes (and reads) raise StoreUnavailable; an ERROR says why."""
    add(store)
    os.remove(path)
    with pytest.raises(StoreUnavailable, match="removed or replaced"):
        add(store)
    with pytest.raises(StoreUnavailable, match="removed or replaced"):
        store.get("operations/x")
    assert not path.exists()  # nothing wrote a new file either
    (logged,) = errors(caplog)
    assert str(path) in logged and "Stop this server" in logged


@pytest.mark.usefixtures("looks_every_time")
def test_a_replaced_file_refuses_the_next_write_and_keeps_the_new_file(
    store: SQLiteStore, path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """A file replaced by another database (os.replace): the next write is refused, and the
    operation is in neither file."""
    add(store)
    other_path = tmp_path / "other.db"
    other = SQLiteStore(other_path)
    kept = add(other)
    other.close()
    os.replace(other_path, path)
    op = Operation(name="operations/refused")
    with pytest.raises(StoreUnavailable, match="removed or replaced"):
        store.insert(op, NOW, NewOperation(METHOD))
    store.close()  # its -wal would otherwise mix its pages into the new file
    assert names_in(path) == {kept}


@pytest.mark.usefixtures("looks_every_time")
def test_a_refused_write_changes_nothing_even_in_the_moved_file(
    store: SQLiteStore, path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """The refused batch is rolled back; with the file moved back, the store works again."""
    first = add(store)
    away = tmp_path / "away.db"
    os.rename(path, away)
    op = Operation(name="operations/refused")
    with pytest.raises(StoreUnavailable, match="removed or replaced"):
        store.insert(op, NOW, NewOperation(METHOD))
    os.rename(away, path)
    assert store.get("operations/refused") is None
    second = add(store)
    assert {r.operation.name for r in store.list(ALL, None, 10)[0]} == {first, second}


@pytest.mark.usefixtures("looks_every_time")
def test_the_watcher_tick_notices_a_removed_file(
    store: SQLiteStore, path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """version() (polled by the manager's watcher) notices the removal with no write at all,
    logs it once, and reads then fail."""
    name = add(store)
    os.remove(path)
    store.version()
    store.version()
    assert len(errors(caplog)) == 1
    with pytest.raises(StoreUnavailable, match="removed or replaced"):
        store.get(name)


def test_a_relative_path_survives_a_change_of_directory(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check follows the file the store opened, not whatever the relative path names later."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    store = SQLiteStore("ops.db")
    try:
        monkeypatch.chdir(tmp_path / "b")
        SQLiteStore("ops.db").close()  # another file by the same relative name
        add(store)
        assert len(names_in(tmp_path / "a" / "ops.db")) == 1
    finally:
        store.close()


@pytest.mark.usefixtures("looks_every_time")
@on_both_servers
def test_a_create_after_the_file_was_removed_is_unavailable(
    store: SQLiteStore, path: pathlib.Path, aio: bool
) -> None:
    """Through a real server: a create after the file was deleted answers UNAVAILABLE, not OK."""
    with served_on(store, aio) as srv:
        finished(srv, create(srv).name)
        os.remove(path)
        err = rpc_error(lambda: create(srv))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "removed or replaced" in err.details()
        assert str(path) not in err.details()  # the path is for the operator's log only


# --- corruption -----------------------------------------------------------------------------------


def filled(path: pathlib.Path, count: int = 2000) -> list[str]:
    """A closed store file at ``path`` holding ``count`` operations (about 1 KB each)."""
    store = SQLiteStore(path)
    try:
        return [add(store, "x" * 1000) for _ in range(count)]
    finally:
        store.close()


def overwrite(path: pathlib.Path, offset: int, data: bytes) -> None:
    """Writes ``data`` over the file's bytes at ``offset``, as a failing disk might."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def zero_ops_roots(path: pathlib.Path) -> None:
    """Zeroes the root pages of the ops table and its indexes: every use of them fails."""
    conn = sqlite3.connect(path)
    try:
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        query = "SELECT rootpage FROM sqlite_master WHERE tbl_name = 'ops' AND rootpage > 0"
        pages = [row[0] for row in conn.execute(query)]
    finally:
        conn.close()
    for page in pages:
        overwrite(path, (page - 1) * size, bytes(size))


def test_a_corrupt_file_is_refused_at_open_and_left_alone(path: pathlib.Path) -> None:
    """quick_check at open: pages overwritten in the middle -> StoreOpenError naming the file."""
    filled(path)
    size = path.stat().st_size
    overwrite(path, size // 2 // 4096 * 4096, b"\xa5" * 3 * 4096)
    before = path.read_bytes()
    with pytest.raises(StoreOpenError, match="corrupt") as info:
        SQLiteStore(path)
    assert str(path) in str(info.value) and "backup" in str(info.value)
    assert path.read_bytes() == before


def test_the_open_check_can_be_skipped(path: pathlib.Path) -> None:
    """check=False opens a corrupt file without reading it all; using a bad page is
    StoreCorrupted."""
    names = filled(path, 200)
    zero_ops_roots(path)
    store = SQLiteStore(path, check=False)
    try:
        with pytest.raises(StoreCorrupted, match="corrupt"):
            store.get(names[0])
    finally:
        store.close()


def corrupt_under(store: SQLiteStore, path: pathlib.Path) -> None:
    """Zeroes the ops table's and its indexes' root pages under the open store, then has another
    connection commit, so the store's connections drop their page caches (as they do whenever
    another process writes) and read the damaged pages from the file. The WAL is copied into the
    file first: a root page written since the store opened (finishing operations moves rows) is
    read from the WAL, not from the file."""
    checkpoint = sqlite3.connect(path, isolation_level=None)
    try:
        assert checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    finally:
        checkpoint.close()
    zero_ops_roots(path)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("INSERT INTO owners(owner, lease_until) VALUES ('someone', 0)")
    finally:
        other.close()


def test_corruption_while_serving_is_store_corrupted_for_reads_and_writes(
    path: pathlib.Path,
) -> None:
    """Damaged pages found by a read or a write raise StoreCorrupted (not a bare sqlite3
    error)."""
    names = filled(path, 200)
    store = SQLiteStore(path)
    try:
        corrupt_under(store, path)
        with pytest.raises(StoreCorrupted, match="corrupt"):
            store.get(names[0])
        with pytest.raises(StoreCorrupted, match="corrupt"):
            store.list(ALL, None, 10)
        with pytest.raises(StoreCorrupted, match="corrupt"):
            store.delete(names[1])
        with pytest.raises(StoreCorrupted, match="corrupt"):
            add(store)
    finally:
        store.close()


@on_both_servers
def test_corruption_while_serving_is_data_loss(
    path: pathlib.Path, caplog: pytest.LogCaptureFixture, aio: bool
) -> None:
    """Through a real server, Get/List/Delete/create on damaged pages answer DATA_LOSS with a
    clear message (never INTERNAL); the log says which file and what to do."""
    names = filled(path, 200)
    store = SQLiteStore(path)
    try:
        with served_on(store, aio) as srv:
            corrupt_under(store, path)
            calls: dict[str, Any] = {
                "GetOperation": lambda: get(srv, names[0]),
                "ListOperations": lambda: list_ops(srv),
                "DeleteOperation": lambda: delete(srv, names[1]),
                "create": lambda: create(srv),
            }
            for what, call in calls.items():
                err = rpc_error(call)
                assert err.code() == grpc.StatusCode.DATA_LOSS, what
                assert "store is corrupt" in err.details(), what
                assert str(path) not in err.details(), what
    finally:
        store.close()
    logged = errors(caplog)
    assert logged and all(str(path) in m and "backup" in m for m in logged)


def test_a_store_error_in_the_background_is_logged_with_what_to_do(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A store error met by the manager's background work (its expiry pass, a timer, watching
    a shared store) is logged with the error's own message, which says what to do (restore a
    backup), not only in the traceback below it."""
    from lrofw._background import Background, Chores

    advice = "the operation store 'ops.db' is corrupt; restore it from a backup"

    def corrupt() -> int:
        raise StoreCorrupted(advice)

    background = Background(
        Chores(expire=corrupt, version=corrupt), expiry_interval=0.01, lease=60.0, poll=0.01
    )
    with caplog.at_level(logging.ERROR, logger="lrofw.manager"):
        background.start()
        background.schedule(0.0, corrupt)
        try:
            eventually(lambda: len(errors(caplog)) >= 3, "three chores' failures logged")
        finally:
            background.stop()
    firsts = {m.split(" failed;")[0] for m in errors(caplog)}
    assert {"expiring finished operations", "watching the shared store"} <= firsts
    assert any(f.startswith("a timer") for f in firsts)
    assert all(m.endswith(advice) for m in errors(caplog)), errors(caplog)


# --- file modes -----------------------------------------------------------------------------------


def modes(path: pathlib.Path) -> dict[str, int]:
    """The permission bits of the database, -wal and -shm files."""
    return {s: stat.S_IMODE(os.stat(f"{path}{s}").st_mode) for s in ("", "-wal", "-shm")}


def test_files_the_store_creates_are_private(store: SQLiteStore, path: pathlib.Path) -> None:
    """A new database and its -wal and -shm files are 0600: they hold the page-token key and
    requests."""
    add(store)
    assert modes(path) == {"": 0o600, "-wal": 0o600, "-shm": 0o600}


def test_an_existing_file_keeps_its_mode(path: pathlib.Path) -> None:
    """A file that exists is not chmod-ed; SQLite gives -wal and -shm the same mode."""
    sqlite3.connect(path).close()
    path.chmod(0o640)
    store = SQLiteStore(path)
    try:
        add(store)
        assert modes(path) == {"": 0o640, "-wal": 0o640, "-shm": 0o640}
    finally:
        store.close()


def test_queued_writes_give_up_within_the_busy_timeout_of_their_own(path: pathlib.Path) -> None:
    """While another process holds the write lock, every write fails within about busy_timeout
    of when it was made: writes queued behind a group that waited do not wait a second timeout
    (they used to: 2x for the second group, and more behind it)."""
    store = SQLiteStore(path, busy_timeout=1.0)
    foreign = sqlite3.connect(path, isolation_level=None)
    foreign.execute("BEGIN IMMEDIATE")
    took: list[float] = []
    lock = threading.Lock()

    def write(i: int) -> None:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.insert(Operation(name=f"operations/w{i}"), 1.0, NewOperation("/a.S/M"))
        with lock:
            took.append(time.monotonic() - start)

    try:
        threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        foreign.execute("ROLLBACK")
        foreign.close()
        store.close()
    assert len(took) == 4
    assert max(took) < 1.6, took
