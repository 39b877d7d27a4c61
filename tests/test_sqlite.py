"""The SQLite store beyond the common contract: the file, opening it, and failing while serving."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import tls_pb2_grpc
from factories import (
    LONG,
    METHOD,
    Metadata,
    Request,
    Response,
    eventually,
    finished,
    get,
    in_thread,
    ops_stub,
)
from google.longrunning import operations_pb2, operations_proto_pb2
from google.protobuf import any_pb2

import lrofw
from lrofw import _core
from lrofw.listing import MatchAll, parse_filter
from lrofw.stores import (
    MemoryStore,
    NewOperation,
    SQLiteStore,
    StoreOpenError,
    StoreUnavailable,
    open_store,
)
from lrofw.stores.sqlite import SCHEMA_VERSION, _ScanPacer
from lrofw.testing import Served, serve

Operation = operations_proto_pb2.Operation

NOW = 1_700_000_000.0
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


def packed(message: Any) -> any_pb2.Any:
    """Packs a message into an Any."""
    out = any_pb2.Any()
    out.Pack(message)
    return out


def add(store: SQLiteStore, *, stage: str = "", **new: Any) -> str:
    """Inserts an unfinished op (with metadata ``stage``) and returns its name."""
    op = Operation(name=f"operations/{uuid.uuid4()}")
    if stage:
        op.metadata.CopyFrom(packed(Metadata(stage=stage)))
    new.setdefault("method", METHOD)
    return store.insert(op, NOW, NewOperation(**new)).operation.name


def dump(store: SQLiteStore) -> list[tuple[object, ...]]:
    """Every record, newest first, with the operation as bytes."""
    records, _ = store.list(ALL, None, 10**6)
    return [
        (
            r.operation.SerializeToString(deterministic=True),
            r.method,
            r.create_time,
            r.done_time,
            r.position,
        )
        for r in records
    ]


def pragma(store: SQLiteStore, statement: str) -> Any:
    """Runs a PRAGMA on the store's own connection (under its lock) and returns the first value."""
    with store._lock:
        row = store._conn.execute(f"PRAGMA {statement}").fetchone()
    return None if row is None else row[0]


def raw(path: pathlib.Path, sql: str) -> Any:
    """Runs one statement on a separate plain sqlite3 connection; returns the first value."""
    conn = sqlite3.connect(path)
    try:
        row = conn.execute(sql).fetchone()
        conn.commit()
        return None if row is None else row[0]
    finally:
        conn.close()


def reason(exc: pytest.ExceptionInfo[StoreOpenError], path: pathlib.Path) -> str:
    """The error's message without the path (test folder names must not satisfy a check)."""
    message = str(exc.value)
    assert str(path) in message, "the message names the path"
    return message.replace(str(path), "<path>")


def fill_until_full(store: SQLiteStore) -> tuple[list[str], list[str]]:
    """Inserts big, then small ops until the store refuses; returns (inserted, refused)."""
    pragma(store, f"max_page_count = {pragma(store, 'page_count') + 8}")
    inserted: list[str] = []
    refused: list[str] = []
    for stage in ("x" * 20_000, "x"):  # big ops fill the pages, small ones the last gaps
        for _ in range(1000):
            name = f"operations/{uuid.uuid4()}"
            op = Operation(name=name)
            op.metadata.CopyFrom(packed(Metadata(stage=stage)))
            try:
                store.insert(op, NOW, NewOperation(METHOD, request=b"r" * len(stage)))
            except StoreUnavailable:
                refused.append(name)
                break
            inserted.append(name)
        else:
            pytest.fail("the store never became full")
    return inserted, refused


class Common(tls_pb2_grpc.CommonServicer):
    """ProvisionDut answers at once with the request's image path."""

    @lrofw.long_running(Response, metadata_type=Metadata)
    def ProvisionDut(self, request: Any, op: lrofw.OperationContext) -> Any:
        return Response(installed_image=request.image_path)


@contextlib.contextmanager
def served(store: SQLiteStore) -> Iterator[Served]:
    """A real gRPC server whose manager keeps its operations in ``store``."""
    with serve(Common(), manager=lrofw.Manager(store=store)) as srv:
        yield srv


def create(srv: Served, image: str = "img") -> operations_pb2.Operation:
    """Starts ProvisionDut over the wire."""
    stub = tls_pb2_grpc.CommonStub(srv.channel)
    return stub.ProvisionDut(Request(name="dut", image_path=image), timeout=LONG)


def rpc_error(call: Any) -> grpc.RpcError:
    """Runs ``call`` and returns the RpcError it raises."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# --- the file -------------------------------------------------------------------------------------


def test_file_is_in_wal_mode_with_the_current_schema(
    store: SQLiteStore, path: pathlib.Path
) -> None:
    """A new file is in WAL mode, with user_version == SCHEMA_VERSION, seen from outside."""
    assert raw(path, "PRAGMA journal_mode") == "wal"
    assert pragma(store, "journal_mode") == "wal"
    assert raw(path, "PRAGMA user_version") == SCHEMA_VERSION
    assert raw(path, "PRAGMA integrity_check") == "ok"


def test_reopening_keeps_everything_byte_identical(path: pathlib.Path) -> None:
    """Ops, bookkeeping, orphans, request keys and the token key survive close and reopen."""
    first = SQLiteStore(path)
    running = add(first, stage="running", owner="dead", request=b"\x00request\xff")
    ok = add(first, stage="s", method="/a.S/M", request_key="m\nid", request_hash=b"hash")
    failed = add(first)
    assert first.finish(ok, NOW + 1, response=packed(Response(installed_image="i"))) is not None
    error = lrofw.OperationError(grpc.StatusCode.NOT_FOUND, "gone", [packed(Metadata())])
    assert first.finish(failed, NOW + 2, error=error.to_status()) is not None
    newest = add(first)
    assert first.delete(newest)
    before = (dump(first), first.orphans(NOW, 100), first.token_key())
    first.close()
    second = SQLiteStore(path)
    try:
        assert (dump(second), second.orphans(NOW, 100), second.token_key()) == before
        assert second.states([running, ok, failed]) == {running: False, ok: True, failed: True}
        with pytest.raises(lrofw.stores.DuplicateRequest) as info:
            add(second, request_key="m\nid", request_hash=b"other")
        assert info.value.request_hash == b"hash"
        positions = [row[4] for row in before[0]]
        added = second.get(add(second))
        assert added is not None
        assert added.position > max(positions) + 1  # the deleted newest position is not reused
    finally:
        second.close()


# --- opening: errors and migration ----------------------------------------------------------------


def test_open_in_a_missing_folder_says_so(tmp_path: pathlib.Path) -> None:
    """A path in a folder that does not exist is a StoreOpenError naming the path and the folder."""
    path = tmp_path / "missing" / "ops.db"
    with pytest.raises(StoreOpenError) as info:
        SQLiteStore(path)
    assert "folder" in reason(info, path)
    assert not path.parent.exists()


def test_open_of_a_directory_says_it_is_a_directory(path: pathlib.Path) -> None:
    """A path that is a directory is a StoreOpenError saying so; the directory is untouched."""
    path.mkdir()
    with pytest.raises(StoreOpenError) as info:
        SQLiteStore(path)
    assert list(path.iterdir()) == []
    assert "directory" in reason(info, path)


def test_open_of_a_file_that_is_not_a_database_leaves_it_alone(tmp_path: pathlib.Path) -> None:
    """Random bytes are refused with 'not a database'; the file keeps its bytes."""
    path = tmp_path / "ops.db"
    data = os.urandom(8192)
    path.write_bytes(data)
    with pytest.raises(StoreOpenError) as info:
        SQLiteStore(path)
    assert "not a database" in reason(info, path)
    assert path.read_bytes() == data


def cost(store: SQLiteStore, call: Any) -> int:
    """How many SQLite virtual machine instructions ``call`` runs on the store's reads."""
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    readers = list(store._readers)  # one call at a time: it reads on one of these
    for reader in readers:
        reader.set_progress_handler(count, 1)
    try:
        call()
    finally:
        for reader in readers:
            reader.set_progress_handler(None, 1)
    return steps[0]


def test_listing_by_principal_and_bounded_scans_cost_what_the_page_costs(
    store: SQLiteStore,
) -> None:
    """A principal's page and a max_scan-bounded scan do not grow with the rest of the store."""
    for _ in range(3):
        add(store, principal="rare")
    nothing = parse_filter("error.code != 0")  # no index helps: a scan

    def costs() -> tuple[int, int]:
        return (
            cost(store, lambda: store.list(ALL, None, 10, principal="rare")),
            cost(store, lambda: store.list(nothing, None, 10, max_scan=20)),
        )

    for _ in range(20):
        add(store, principal="common")
    small = costs()
    with store._lock:  # many more operations of others, quickly
        store._conn.execute("BEGIN")
        store._conn.executemany(
            "INSERT INTO ops(name, method, create_time, principal, data) VALUES (?, ?, ?, ?, ?)",
            [(f"operations/bulk-{i}", METHOD, NOW, "common", b"") for i in range(20000)],
        )
        store._conn.execute("COMMIT")
    large = costs()
    assert small[0] > 0 and small[1] > 0
    assert large[0] <= 2 * small[0] and large[1] <= 2 * small[1], (small, large)
    assert len(store.list(ALL, None, 10, principal="rare")[0]) == 3


def test_listing_one_error_code_costs_what_the_page_costs(store: SQLiteStore) -> None:
    """A List of one error code walks the failed operations' index (it holds only those), so
    its page does not grow with the operations that succeeded or still run."""
    status = lrofw.OperationError(grpc.StatusCode.NOT_FOUND, "gone").to_status()
    failed = [add(store) for _ in range(3)]
    for name in failed:
        assert store.finish(name, NOW, error=status) is not None
    wanted = parse_filter("done = true AND error.code = NOT_FOUND")
    small = cost(store, lambda: store.list(wanted, None, 10))
    with store._lock:  # many more operations without an error, quickly
        store._conn.execute("BEGIN")
        store._conn.executemany(
            "INSERT INTO ops(name, method, create_time, data) VALUES (?, ?, ?, ?)",
            [(f"operations/bulk-{i}", METHOD, NOW, b"") for i in range(20000)],
        )
        store._conn.execute("COMMIT")
    large = cost(store, lambda: store.list(wanted, None, 10))
    assert small > 0 and large <= 2 * small, (small, large)
    assert [r.operation.name for r in store.list(wanted, None, 10)[0]] == failed[::-1]
    assert store.list(parse_filter("error.code = 4"), None, 10) == ([], None)


def test_a_bounded_list_where_no_operation_was_deleted_needs_no_walk_to_its_edge(
    store: SQLiteStore,
) -> None:
    """A bounded List whose newest max_scan positions do not fill its page: where this store
    deleted nothing, the max_scan-th operation down is max_scan positions down, and the List
    costs what its page costs; once an operation there is deleted, it walks to the edge (and
    the answer stays exact)."""
    status = lrofw.OperationError(grpc.StatusCode.NOT_FOUND, "gone").to_status()
    failed = add(store)
    assert store.finish(failed, NOW, error=status) is not None
    names = [add(store) for _ in range(300)]  # none failed
    newest = store.get(names[-1])
    assert newest is not None
    wanted = parse_filter("error.code = NOT_FOUND")
    listing = lambda: store.list(wanted, None, 10, max_scan=100)  # noqa: E731
    assert listing() == ([], newest.position - 99)
    dense = cost(store, listing)
    assert store.delete(names[-50])
    assert listing() == ([], newest.position - 100)  # one position of the 100 is a gap
    walked = cost(store, listing)
    assert walked > 5 * dense, (dense, walked)
    assert [r.operation.name for r in listed_all(store, wanted, max_scan=100)] == [failed]


class FakeTime:
    """A clock that moves only when slept on or when a scan says how long it took."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def scan(self, took: float) -> Callable[[], str]:
        def run() -> str:
            self.now += took
            return "page"

        return run


def pacer(fake: FakeTime, burst: float) -> _ScanPacer:
    return _ScanPacer(pause=2.0, pause_max=0.05, burst=burst, clock=fake.clock, sleep=fake.sleep)


def test_a_client_listing_at_a_pace_the_share_allows_never_waits() -> None:
    """Scans of 10 ms, 15 and 30 ms apart in turn: a third of the time, give or take. With a
    burst they all start at once; with none (a pause after each scan) every other one waits."""
    waited = {}
    for burst in (0.05, 0.0):
        fake = FakeTime()
        paced = pacer(fake, burst)
        for i in range(200):
            assert paced.paced(fake.scan(0.010)) == "page"
            fake.now += 0.015 if i % 2 else 0.030
        waited[burst] = len(fake.sleeps)
    assert waited == {0.05: 0, 0.0: 99}


def test_scans_back_to_back_take_a_third_of_the_time() -> None:
    """100 scans of 10 ms one after another: each owes 20 ms, so once the burst is used up
    they start 30 ms apart."""
    fake = FakeTime()
    paced = pacer(fake, 0.05)
    start = fake.now
    for _ in range(100):
        paced.paced(fake.scan(0.010))
    elapsed = fake.now - start
    assert 3.0 - 0.05 - 0.02 - 1e-9 <= elapsed <= 3.0 - 0.05 - 0.02 + 1e-9
    # The first three start at once (then 60 ms are owed: 10 past the burst), the rest 30 ms apart.
    assert fake.sleeps == pytest.approx([0.010] + [0.020] * 96)


def test_a_long_scan_owes_at_most_the_longest_pause() -> None:
    """Scans of 1 s back to back owe 50 ms each, not 2 s: once the burst is used up, the next
    starts 50 ms after the last one ended."""
    fake = FakeTime()
    paced = pacer(fake, 0.05)
    for _ in range(4):
        paced.paced(fake.scan(1.0))
    assert fake.sleeps == pytest.approx([0.05, 0.05])


def test_a_failed_scan_still_counts() -> None:
    """A scan that raises owes its pause as one that returned does."""
    fake = FakeTime()
    paced = pacer(fake, 0.0)

    def failing() -> str:
        fake.now += 0.010
        raise sqlite3.OperationalError("disk I/O error")

    with pytest.raises(sqlite3.OperationalError):
        paced.paced(failing)
    paced.paced(fake.scan(0.0))
    assert fake.sleeps == pytest.approx([0.020])


def test_a_lone_client_paging_on_a_store_does_not_wait(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few List pages one right after another, on a real store: none of them is made to
    wait (each owes about twice its own fraction of a millisecond, well within the burst)."""
    slept: list[float] = []
    monkeypatch.setattr(store._pacer, "_sleep", slept.append)
    names = [add(store) for _ in range(30)]
    listed = listed_all(store, ALL, max_scan=100)
    assert [r.operation.name for r in listed] == names[::-1]
    assert slept == []


def listed_all(store: SQLiteStore, where: Any, **bounds: Any) -> list[Any]:
    """Every record of a listing, following cursors 3 at a time; no cursor may stand still."""
    out: list[Any] = []
    before = None
    for _ in range(10**4):
        page, cursor = store.list(where, before, 3, **bounds)
        out += page
        if cursor is None:
            return out
        assert before is None or cursor < before
        before = cursor
    raise AssertionError("the listing did not end")


def test_a_bounded_list_sees_where_another_store_deleted(path: pathlib.Path) -> None:
    """Another store on the file deletes operations: a page of this one's still examines
    exactly max_scan of them (it reads where gaps may be in its own snapshot), and following
    the cursors lists every operation once, newest first."""
    ours, theirs = SQLiteStore(path), SQLiteStore(path)
    try:
        names = [add(ours) for _ in range(60)]
        positions = {name: ours.get(name).position for name in names}  # type: ignore[union-attr]
        for name in names[::3]:
            assert theirs.delete(name)
        left = [n for i, n in enumerate(names) if i % 3][::-1]
        nothing = parse_filter('method = "/no.Such/Method"')
        for max_scan in (1, 4, 10, 39):
            # The max_scan-th operation left, from the newest down, is where the page stops.
            assert ours.list(nothing, None, 3, max_scan=max_scan) == (
                [], positions[left[max_scan - 1]]
            ), max_scan
        for max_scan in (1, 4, 10, 100):
            got = listed_all(ours, ALL, max_scan=max_scan)
            assert [r.operation.name for r in got] == left, max_scan
    finally:
        theirs.close()
        ours.close()


def test_a_reopened_store_where_nothing_was_deleted_needs_no_walk(path: pathlib.Path) -> None:
    """Where gaps may be is kept in the file: reopened, a store where nothing was deleted lists
    a bounded page without walking to its edge, as it did before it closed."""
    store = SQLiteStore(path)
    names = [add(store) for _ in range(300)]  # none failed: the page reads the errors' index
    failed = parse_filter("error.code = NOT_FOUND")
    listing = lambda: store.list(failed, None, 10, max_scan=100)  # noqa: E731
    newest = store.get(names[-1])
    assert newest is not None and listing() == ([], newest.position - 99)
    before = cost(store, listing)
    store.close()
    store = SQLiteStore(path)
    try:
        assert listing() == ([], newest.position - 99)
        assert cost(store, listing) <= before + 10, before
        assert store.delete(names[-50])  # now there is a gap: the page walks to its edge
        assert listing() == ([], newest.position - 100)
        assert cost(store, listing) > 5 * before
    finally:
        store.close()


def test_finish_drops_the_stored_request_and_keeps_the_request_hash(
    store: SQLiteStore, path: pathlib.Path
) -> None:
    """The request column of a finished op is NULL in the file; its request hash stays."""
    name = add(store, request=b"r" * 1000, request_key="k", request_hash=b"h")
    assert raw(path, "SELECT length(request) FROM ops") == 1000
    assert store.finish(name, NOW, response=packed(Response())) is not None
    assert raw(path, "SELECT request IS NULL AND request_hash = x'68' FROM ops") == 1


def test_open_store_sqlite_relative_path(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sqlite:PATH opens (and creates) PATH relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:ops.db")
    try:
        assert isinstance(store, SQLiteStore)
        name = add(store)  # type: ignore[arg-type]
        assert store.get(name) is not None
    finally:
        store.close()
    assert raw(tmp_path / "ops.db", "SELECT count(*) FROM ops") == 1


@pytest.mark.parametrize("form", ["sqlite:{}", "sqlite://{}"])
def test_open_store_sqlite_absolute_path(tmp_path: pathlib.Path, form: str) -> None:
    """sqlite:/abs/path and sqlite:///abs/path both open the file at /abs/path."""
    path = tmp_path / "abs.db"
    assert path.is_absolute()
    store = open_store(form.format(path))
    try:
        assert isinstance(store, SQLiteStore)
        assert store.path == str(path)
        add(store)  # type: ignore[arg-type]
    finally:
        store.close()
    assert raw(path, "SELECT count(*) FROM ops") == 1


def test_open_store_memory() -> None:
    """memory: is a MemoryStore."""
    assert isinstance(open_store("memory:"), MemoryStore)


@pytest.mark.parametrize(
    "url", ["", "memory", "MEMORY:", "sqlite", "sqlite:", "mysql://db/ops", "postgres:x", "ops.db"]
)
def test_open_store_bad_urls_list_the_supported_forms(url: str) -> None:
    """A URL naming no supported store is a ValueError that lists the supported forms."""
    with pytest.raises(ValueError, match="supported") as info:
        open_store(url)
    assert "memory:" in str(info.value) and "sqlite:PATH" in str(info.value)
    assert "postgresql://USER@HOST:PORT/DB?schema=NAME" in str(info.value)
    assert repr(url) in str(info.value)


# --- failing while serving: a full disk -----------------------------------------------------------


def test_full_disk_is_store_unavailable_and_nothing_half_written(store: SQLiteStore) -> None:
    """With the file at its size limit, writes raise StoreUnavailable and change nothing."""
    kept = add(store, stage="before")
    inserted, refused = fill_until_full(store)
    assert inserted and len(refused) == 2
    assert [store.get(name) for name in refused] == [None, None]
    before = dump(store)
    with pytest.raises(StoreUnavailable, match="cannot be written"):
        store.set_metadata(kept, packed(Metadata(stage="y" * 200_000)))
    assert dump(store) == before
    record = store.get(kept)
    assert record is not None and record.operation.metadata == packed(Metadata(stage="before"))
    assert len(store.list(ALL, None, 10**6)[0]) == len(inserted) + 1
    assert pragma(store, "integrity_check") == "ok"


def test_full_disk_while_serving_answers_unavailable_and_reads_work(store: SQLiteStore) -> None:
    """Through a real server: a create on a full disk is UNAVAILABLE; Get still works."""
    with served(store) as srv:
        earlier = finished(srv, create(srv, "earlier").name)
        fill_until_full(store)
        count = len(store.list(ALL, None, 10**6)[0])
        err = rpc_error(lambda: create(srv))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "cannot be written" in err.details()
        assert get(srv, earlier.name) == earlier
        assert len(store.list(ALL, None, 10**6)[0]) == count
    assert pragma(store, "integrity_check") == "ok"


# --- failing while serving: read-only -------------------------------------------------------------


def test_read_only_store_refuses_writes_and_serves_reads(store: SQLiteStore) -> None:
    """With query_only on, every write is StoreUnavailable and changes nothing; reads work."""
    running = add(store, owner="me")
    done = add(store)
    assert store.finish(done, NOW, response=packed(Response())) is not None
    before = dump(store)
    pragma(store, "query_only = ON")
    writes = [
        lambda: add(store),
        lambda: store.set_metadata(running, packed(Metadata(stage="x"))),
        lambda: store.finish(running, NOW, response=packed(Response())),
        lambda: store.delete(done),
        lambda: store.expire(NOW + 1, 10),
        lambda: store.renew("me", NOW + 10),
        lambda: store.release("me"),
        lambda: store.claim(running, "me", "other"),
    ]
    for write in writes:
        with pytest.raises(StoreUnavailable):
            write()
    assert dump(store) == before
    assert store.states([running, done]) == {running: False, done: True}
    assert [o.name for o in store.orphans(NOW, 10)] == [running]
    pragma(store, "query_only = OFF")
    assert store.finish(running, NOW, response=packed(Response())) is not None


def test_read_only_while_serving_is_unavailable_until_writable_again(store: SQLiteStore) -> None:
    """Through a real server: creates and deletes are UNAVAILABLE while read-only, Get works;
    once writable again the server works as before."""
    with served(store) as srv:
        stub = ops_stub(srv)
        earlier = finished(srv, create(srv, "earlier").name)
        delete = operations_pb2.DeleteOperationRequest(name=earlier.name)
        pragma(store, "query_only = ON")
        try:
            assert rpc_error(lambda: create(srv)).code() == grpc.StatusCode.UNAVAILABLE
            err = rpc_error(lambda: stub.DeleteOperation(delete, timeout=LONG))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert get(srv, earlier.name) == earlier
        finally:
            pragma(store, "query_only = OFF")
        op = finished(srv, create(srv, "later").name)
        response = Response()
        assert op.response.Unpack(response) and response.installed_image == "later"
        stub.DeleteOperation(delete, timeout=LONG)
        assert rpc_error(lambda: get(srv, earlier.name)).code() == grpc.StatusCode.NOT_FOUND


def test_cancel_on_a_read_only_store_is_unavailable(store: SQLiteStore) -> None:
    """CancelOperation cannot write the cancel: UNAVAILABLE, and the op stays unfinished."""
    with served(store) as srv:
        name = srv.manager.new_operation(METHOD).name
        pragma(store, "query_only = ON")
        try:
            err = rpc_error(
                lambda: ops_stub(srv).CancelOperation(
                    operations_pb2.CancelOperationRequest(name=name), timeout=LONG
                )
            )
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert not get(srv, name).done
        finally:
            pragma(store, "query_only = OFF")
        ops_stub(srv).CancelOperation(operations_pb2.CancelOperationRequest(name=name))
        assert get(srv, name).error.code == grpc.StatusCode.CANCELLED.value[0]


def test_a_write_locked_too_long_is_store_unavailable(path: pathlib.Path) -> None:
    """A write that waits past busy_timeout for another writer is StoreUnavailable; reads work."""
    store = SQLiteStore(path, busy_timeout=0.05)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        name = add(store)
        before = dump(store)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(StoreUnavailable, match="locked"):
            add(store)
        with pytest.raises(StoreUnavailable):
            store.finish(name, NOW, response=packed(Response()))
        assert dump(store) == before  # WAL: reading while another connection writes
        other.execute("ROLLBACK")
        assert store.finish(name, NOW, response=packed(Response())) is not None
    finally:
        other.close()
        store.close()


# --- two connections ------------------------------------------------------------------------------


def test_two_stores_on_one_file_from_two_threads_lose_nothing(path: pathlib.Path) -> None:
    """Two SQLiteStores on one file, inserting and finishing from two threads at once."""
    stores = [SQLiteStore(path), SQLiteStore(path)]
    barrier = threading.Barrier(2)
    made: list[list[str]] = [[], []]
    failures: list[BaseException] = []

    def work(index: int) -> None:
        store = stores[index]
        try:
            barrier.wait(LONG)
            for i in range(150):
                made[index].append(add(store, stage=f"{index}-{i}"))
                if i % 2:  # finish the one before, while the other thread writes too
                    image = f"{index}-{i - 1}"
                    done = store.finish(
                        made[index][-2], NOW, response=packed(Response(installed_image=image))
                    )
                    assert done is not None
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(LONG)
        assert not failures
        for view in stores:
            records = view.list(ALL, None, 10**6)[0]
            assert sorted(r.operation.name for r in records) == sorted(made[0] + made[1])
            assert len({r.position for r in records}) == 300
            for record in records:
                stage = Metadata()
                assert record.operation.metadata.Unpack(stage)
                i = int(stage.stage.split("-")[1])
                assert record.operation.done is (i % 2 == 0)
                if record.operation.done:
                    assert record.operation.response == packed(
                        Response(installed_image=stage.stage)
                    )
        assert pragma(stores[0], "integrity_check") == "ok"
    finally:
        for store in stores:
            store.close()


@pytest.mark.parametrize("aio", [False, True])
def test_a_result_that_cannot_be_stored_is_retried(
    store: SQLiteStore, caplog: pytest.LogCaptureFixture, aio: bool
) -> None:
    """A handler's result that meets a read-only store is written once the store recovers
    (a sync handler's on a sync server, an async handler's on an aio server)."""
    gate, attempted = threading.Event(), threading.Event()

    class Gated(tls_pb2_grpc.CommonServicer):
        @lrofw.long_running(Response)
        def ProvisionDut(self, request: Any, op: lrofw.OperationContext) -> Any:
            gate.wait(LONG)
            return Response(installed_image="late")

    class AsyncGated(tls_pb2_grpc.CommonServicer):
        @lrofw.long_running(Response)
        async def ProvisionDut(self, request: Any, op: lrofw.AsyncOperationContext) -> Any:
            await asyncio.get_running_loop().run_in_executor(None, gate.wait, LONG)
            return Response(installed_image="late")

    class Spy(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "cannot be stored yet" in record.getMessage():
                attempted.set()

    spy = Spy()
    logging.getLogger("lrofw.manager").addHandler(spy)
    try:
        servicer = AsyncGated() if aio else Gated()  # the async one retries off the loop
        with serve(servicer, manager=lrofw.Manager(store=store), aio=aio) as srv:
            name = create(srv).name
            pragma(store, "query_only = ON")
            gate.set()
            assert attempted.wait(LONG), "the first write did not fail"
            assert not get(srv, name).done
            pragma(store, "query_only = OFF")
            op = finished(srv, name)
            assert op.HasField("response")
    finally:
        logging.getLogger("lrofw.manager").removeHandler(spy)


# --- group commit ---------------------------------------------------------------------------------


def queue_writes(store: SQLiteStore, writes: list[Any]) -> tuple[list[Any], list[int]]:
    """Runs each write on a thread of its own while the store's connection is held, so that all
    of them queue; then lets them go. Returns what each returned or raised, and the sizes of the
    transactions that carried them."""
    sizes: list[int] = []
    commit = store._commit

    def counting(batch: list[Any], **options: Any) -> None:
        commit(batch, **options)
        sizes.append(len(batch))  # with the writes that joined it as it ran

    store._commit = counting  # type: ignore[method-assign]
    outcomes: list[Any] = [None] * len(writes)

    def run(i: int) -> None:
        try:
            outcomes[i] = writes[i]()
        except BaseException as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(writes))]
    with store._lock:  # the leader blocks here; everyone else queues behind it
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + LONG
        while len(store._queue) < len(writes) and time.monotonic() < deadline:
            time.sleep(0.001)  # polls a condition; nothing to wait on
        assert len(store._queue) == len(writes)
    for thread in threads:
        thread.join(LONG)
    del store._commit
    return outcomes, sizes


def test_concurrent_writes_share_one_commit_and_a_failing_one_undoes_only_itself(
    store: SQLiteStore,
) -> None:
    """Writes queued behind a commit go in one transaction; one that fails (a duplicate name)
    gets its own error and leaves no trace, the others are all written."""
    existing = add(store, stage="kept")
    running = add(store)
    fresh = [Operation(name=f"operations/{uuid.uuid4()}") for _ in range(4)]
    writes = [
        *[lambda op=op: store.insert(op, NOW, NewOperation(METHOD)) for op in fresh],
        lambda: store.insert(Operation(name=existing), NOW, NewOperation(METHOD)),
        lambda: store.finish(running, NOW + 1, response=packed(Response())),
    ]
    outcomes, sizes = queue_writes(store, writes)
    assert sizes == [len(writes)]
    assert [o.operation.name for o in outcomes[:4]] == [op.name for op in fresh]
    assert isinstance(outcomes[4], KeyError)
    assert outcomes[5] is not None and outcomes[5].operation.done
    for op in fresh:
        assert store.get(op.name) is not None
    kept = store.get(existing)
    assert kept is not None and kept.operation.metadata == packed(Metadata(stage="kept"))
    finished_record = store.get(running)
    assert finished_record is not None and finished_record.done_time == NOW + 1
    assert pragma(store, "integrity_check") == "ok"


def test_queued_creates_and_finishes_are_one_statement_each_and_keep_their_rules(
    store: SQLiteStore, path: pathlib.Path
) -> None:
    """Creates and finishes queued behind a commit are made by one statement per kind, and each
    keeps its own answer: positions in order, a finish fenced by another owner or of a missing
    or already finished operation refused, the second of two finishes of one operation refused
    (the first wins), every stored operation byte-identical to one finished alone."""
    owned = [add(store, stage=f"s{i}", owner="me", request=b"r") for i in range(3)]
    done_before = add(store)
    assert store.finish(done_before, NOW, response=packed(Response())) is not None
    fresh = [Operation(name=f"operations/{uuid.uuid4()}") for _ in range(4)]
    payload = packed(Response(installed_image=bytes(range(256)).decode("latin-1")))
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)
    try:
        writes = [
            *[lambda op=op: store.insert(op, NOW, NewOperation(METHOD)) for op in fresh],
            lambda: store.finish(owned[0], NOW + 1, response=payload, owner="me"),
            lambda: store.finish(owned[1], NOW + 1, response=payload, owner="not me"),
            lambda: store.finish(owned[2], NOW + 1, error=lrofw.OperationError(
                grpc.StatusCode.NOT_FOUND, "gone").to_status()),
            lambda: store.finish("operations/missing", NOW + 1, response=payload),
            lambda: store.finish(done_before, NOW + 1, response=payload),
        ]  # fmt: skip
        outcomes, sizes = queue_writes(store, writes)
    finally:
        store._conn.set_trace_callback(None)
    assert sizes == [len(writes)]
    inserts = [s for s in statements if s.startswith("INSERT INTO ops")]
    finishes = [s for s in statements if s.startswith("UPDATE ops SET done = 1")]
    assert len(inserts) == 1 and len(finishes) == 1, statements
    positions = [o.position for o in outcomes[:4]]
    assert positions == sorted(positions) and len(set(positions)) == 4
    assert [o.operation.name for o in outcomes[:4]] == [op.name for op in fresh]
    assert outcomes[4].operation.response == payload and outcomes[4].done_time == NOW + 1
    assert outcomes[5] is None  # fenced: owned by "me"
    assert outcomes[6] is not None and outcomes[6].operation.error.code == 5
    assert outcomes[7] is None and outcomes[8] is None
    error = outcomes[6].operation.error
    for i, name, result in ((0, owned[0], {"response": payload}), (2, owned[2], {"error": error})):
        unfinished = Operation(name=name, metadata=packed(Metadata(stage=f"s{i}")))
        alone = _core.finished(unfinished, **result)  # as if parsed, finished, serialized
        assert raw(path, f"SELECT data FROM ops WHERE name = '{name}'") == (
            alone.SerializeToString()
        )
        assert store.get(name) == outcomes[4 if i == 0 else 6]
        assert store.get(name).operation == alone  # type: ignore[union-attr]
    assert raw(path, "SELECT count(*) FROM ops WHERE request IS NOT NULL") == 1  # owned[1]


def test_two_queued_finishes_of_one_operation_the_first_wins(store: SQLiteStore) -> None:
    """Two finishes of one operation in one group: one is stored, the other refused."""
    name = add(store)
    writes = [
        lambda: store.finish(name, NOW + 1, response=packed(Response(installed_image="a"))),
        lambda: store.finish(name, NOW + 2, response=packed(Response(installed_image="b"))),
    ]
    outcomes, sizes = queue_writes(store, writes)
    assert sizes == [2]
    winners = [o for o in outcomes if o is not None]
    assert len(winners) == 1 and outcomes.count(None) == 1
    assert store.get(name) == winners[0]


def test_version_never_waits_for_a_write_in_progress(
    store: SQLiteStore, path: pathlib.Path
) -> None:
    """version() while the write connection is busy answers at once with the last number; the
    write's group reads a fresh one, so another process's commit is still seen next time."""
    first = store.version()
    raw(path, "INSERT INTO owners(owner, lease_until) VALUES ('elsewhere', 0)")  # a foreign commit
    answered: list[int] = []
    with store._lock:  # a write in progress
        thread = threading.Thread(target=lambda: answered.append(store.version()))
        thread.start()
        thread.join(LONG)
        assert answered == [first]
    add(store)  # the next write's group reads the number asked for
    assert store._version != first
    assert store.version() != first


# --- coroutines' writes: the writer thread -------------------------------------------------------


class LoopThread:
    """An event loop running on a thread of its own, for coroutines that write while the test's
    thread holds the store's connection."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda loop, context: self.errors.append(context))
        self.thread = threading.Thread(target=self.loop.run_forever)
        self.thread.start()
        self.ident = self.run(_ident())

    def submit(self, coroutine: Any) -> Any:
        """Start ``coroutine`` on the loop; its concurrent.futures.Future."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Any) -> Any:
        return self.submit(coroutine).result(LONG)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(LONG)
        self.loop.close()


async def _ident() -> int:
    return threading.get_ident()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    running = LoopThread()
    yield running
    running.close()


def queued(store: SQLiteStore, count: int) -> None:
    """Wait until ``count`` writes queue (the test holds the store's connection)."""
    deadline = time.monotonic() + LONG
    while len(store._queue) < count and time.monotonic() < deadline:
        time.sleep(0.001)  # polls a condition; nothing to wait on
    assert len(store._queue) == count


def test_coroutines_and_threads_writes_share_one_commit_made_off_the_event_loop(
    store: SQLiteStore, loop_thread: LoopThread
) -> None:
    """insert_async and finish_async queue with the threads' writes; the store's writer thread
    commits them (and those of threads) as one group, in one statement per kind, and settles
    each coroutine with its own answer. No statement runs on the event loop's thread."""
    running = [add(store, owner="me") for _ in range(3)]
    fresh = [Operation(name=f"operations/{uuid.uuid4()}") for _ in range(4)]
    statements: list[tuple[str, int]] = []
    store._conn.set_trace_callback(lambda sql: statements.append((sql, threading.get_ident())))
    sizes: list[int] = []
    commit = store._commit

    def counting(batch: list[Any], **options: Any) -> None:
        commit(batch, **options)
        sizes.append(len(batch))

    store._commit = counting  # type: ignore[method-assign]
    try:
        with store._lock:  # the first group waits here; every later write queues
            creates = [
                loop_thread.submit(store.insert_async(op, NOW, NewOperation(METHOD)))
                for op in fresh[:2]
            ]
            finishes = [
                loop_thread.submit(
                    store.finish_async(name, NOW + 1, response=packed(Response()), owner=owner)
                )
                for name, owner in zip(running, ["me", "me", "not me"], strict=True)
            ]
            queued(store, 5)
            failures: list[BaseException] = []
            threads = [
                in_thread(lambda op=op: store.insert(op, NOW, NewOperation(METHOD)), failures)[0]
                for op in fresh[2:]
            ]
            queued(store, 7)
        records = [c.result(LONG) for c in creates]
        outcomes = [f.result(LONG) for f in finishes]
        for thread in threads:
            thread.join(LONG)
        assert not failures
    finally:
        store._conn.set_trace_callback(None)
        del store._commit
    assert sizes == [7]
    assert [r.operation.name for r in records] == [op.name for op in fresh[:2]]
    assert records[0].position < records[1].position
    assert [o is not None and o.operation.done for o in outcomes] == [True, True, False]
    for op in fresh:
        assert store.get(op.name) is not None
    writes = [sql for sql, _ in statements if sql.split()[0] in ("INSERT", "UPDATE")]
    assert len(writes) == 2, writes  # one statement per kind for the whole group
    assert loop_thread.ident not in {thread for _, thread in statements}
    assert not loop_thread.errors


def test_a_coroutines_write_raises_its_own_error_in_the_coroutine(
    store: SQLiteStore, loop_thread: LoopThread
) -> None:
    """insert_async of an existing name raises KeyError; of a used request key,
    DuplicateRequest with the stored record; finish_async of a missing operation returns None."""
    name = add(store, request_key="k", request_hash=b"h")
    with pytest.raises(KeyError):
        loop_thread.run(store.insert_async(Operation(name=name), NOW, NewOperation(METHOD)))
    other = Operation(name=f"operations/{uuid.uuid4()}")
    with pytest.raises(lrofw.stores.DuplicateRequest) as info:
        loop_thread.run(store.insert_async(other, NOW, NewOperation(METHOD, request_key="k")))
    assert info.value.record.operation.name == name
    finish = store.finish_async("operations/missing", NOW, response=packed(Response()))
    assert loop_thread.run(finish) is None
    with pytest.raises(ValueError, match="exactly one"):
        loop_thread.run(store.finish_async(name, NOW))
    assert store.get(other.name) is None


def test_a_coroutines_write_waits_for_a_foreign_lock_without_blocking_its_loop(
    path: pathlib.Path, loop_thread: LoopThread
) -> None:
    """While another process holds the write lock, insert_async waits on the writer thread: the
    loop runs other callbacks meanwhile. Once the lock is let go, the write is made; held past
    the busy timeout, it fails with StoreUnavailable and writes nothing."""
    store = SQLiteStore(path, busy_timeout=LONG)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        trying = threading.Event()
        store._conn.set_trace_callback(lambda sql: trying.set())
        op = Operation(name=f"operations/{uuid.uuid4()}")
        write = loop_thread.submit(store.insert_async(op, NOW, NewOperation(METHOD)))
        assert trying.wait(LONG)  # the writer thread's statement waits for the lock
        assert loop_thread.run(_ident()) == loop_thread.ident  # the loop still answers
        assert not write.done()
        other.execute("COMMIT")
        assert write.result(LONG).operation.name == op.name
    finally:
        other.close()
        store.close()
    quick = SQLiteStore(path, busy_timeout=0.05)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        late = Operation(name=f"operations/{uuid.uuid4()}")
        with pytest.raises(StoreUnavailable):
            loop_thread.run(quick.insert_async(late, NOW, NewOperation(METHOD)))
        other.execute("ROLLBACK")
        assert quick.get(late.name) is None
    finally:
        other.close()
        quick.close()


def test_a_cancelled_coroutines_write_is_still_made_and_nothing_is_left_unsettled(
    store: SQLiteStore, loop_thread: LoopThread
) -> None:
    """A coroutine cancelled while its write waits in the queue: the write is made all the same
    (as a thread's would be), and settling it later raises nothing on the loop."""
    op = Operation(name=f"operations/{uuid.uuid4()}")
    with store._lock:
        write = loop_thread.submit(store.insert_async(op, NOW, NewOperation(METHOD)))
        queued(store, 1)
        write.cancel()
    eventually(lambda: store.get(op.name) is not None, "the cancelled coroutine's write")
    assert loop_thread.run(_ident()) == loop_thread.ident  # the settling callback ran first
    assert not loop_thread.errors


def test_the_writer_thread_outlives_an_unexpected_error_after_a_group(
    store: SQLiteStore, loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected error in the writer thread after its group committed (a bug, simulated in
    the data_version read that may follow a group) is logged; the group's coroutines get their
    answers, and the writer thread goes on leading later groups instead of leaving them to wait
    for ever."""

    def broken() -> int:
        raise RuntimeError("a bug")

    store._data_version = broken  # type: ignore[method-assign]
    store._version_due = True
    first = Operation(name=f"operations/{uuid.uuid4()}")
    with caplog.at_level(logging.ERROR, logger="lrofw.stores.sqlite"):
        record = loop_thread.run(store.insert_async(first, NOW, NewOperation(METHOD)))
        assert record.operation.name == first.name
        second = Operation(name=f"operations/{uuid.uuid4()}")
        loop_thread.run(store.insert_async(second, NOW, NewOperation(METHOD)))
    assert store.get(second.name) is not None
    assert "unexpected error" in caplog.text and "a bug" in caplog.text
    del store._data_version


def closed_with_writes_made(
    store: SQLiteStore,
    path: pathlib.Path,
    close: tuple[threading.Thread, list[BaseException]],
    writes: list[Any],
    ops: list[Operation],
    kept: tuple[Operation, ...] = (),
) -> None:
    """close() (running on ``close``, with its failures) returned; each of the coroutines'
    ``writes`` answered with its operation of ``ops``; the writer thread ended; and a store
    opened anew on ``path`` has every operation of ``ops`` and ``kept``."""
    closing, failures = close
    closing.join(LONG)
    assert not closing.is_alive() and not failures
    assert [w.result(LONG).operation.name for w in writes] == [op.name for op in ops]
    assert store._writer is not None and not store._writer.is_alive()
    reopened = SQLiteStore(path)
    try:
        assert all(reopened.get(op.name) is not None for op in [*ops, *kept])
    finally:
        reopened.close()


def test_close_makes_the_coroutines_writes_in_progress_and_refuses_later_ones(
    path: pathlib.Path, loop_thread: LoopThread
) -> None:
    """close() while coroutines' writes wait for the connection: they are made (close waits
    for them) and their coroutines answered; a coroutine's write after close gets
    StoreUnavailable at once, and the writer thread has ended."""
    store = SQLiteStore(path)
    fresh = [Operation(name=f"operations/{uuid.uuid4()}") for _ in range(3)]
    with store._lock:
        writes = [
            loop_thread.submit(store.insert_async(op, NOW, NewOperation(METHOD))) for op in fresh
        ]
        queued(store, 3)  # the writer thread waits for the connection to take them
        closing, failures = in_thread(store.close)
    closed_with_writes_made(store, path, (closing, failures), writes, fresh)
    late = Operation(name=f"operations/{uuid.uuid4()}")
    with pytest.raises(StoreUnavailable, match="closed"):
        loop_thread.run(store.insert_async(late, NOW, NewOperation(METHOD)))


def test_close_makes_the_coroutines_writes_queued_before_the_writer_thread_looked(
    path: pathlib.Path, loop_thread: LoopThread
) -> None:
    """Found as a failure of the test above on a loaded machine: close() came before the writer
    thread had looked at the writes handed to it, and it failed all three with "the operation
    store is closed". Writes queued before close are made however late the writer thread runs,
    and close waits for them."""
    go = threading.Event()

    class Late(SQLiteStore):
        def _writer_loop(self) -> None:
            go.wait(LONG)  # the thread is started, but looks only once close() has begun
            super()._writer_loop()

    store = Late(path)
    fresh = [Operation(name=f"operations/{uuid.uuid4()}") for _ in range(3)]
    with store._lock:
        writes = [
            loop_thread.submit(store.insert_async(op, NOW, NewOperation(METHOD))) for op in fresh
        ]
        queued(store, 3)
    closing, failures = in_thread(store.close)
    assert store._closed.wait(LONG)
    go.set()
    closed_with_writes_made(store, path, (closing, failures), writes, fresh)


def test_close_waits_for_a_coroutines_write_in_a_threads_group_and_the_writer_thread_ends(
    path: pathlib.Path, loop_thread: LoopThread
) -> None:
    """close() while a thread leads a group that a coroutine's write waits for: the writer
    thread, woken by close, finds that write still queued and waits for it; the thread's group
    makes it, and the writer thread then ends, so close returns (it would wait for ever for a
    writer thread that nobody woke again)."""
    store = SQLiteStore(path)
    looked = threading.Event()

    class Watched:
        """The store's queue lock, noting when the writer thread looks once close began."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __enter__(self) -> None:
            self.inner.acquire()
            if threading.current_thread().name == "lrofw-sqlite-writer" and store._closed.is_set():
                looked.set()

        def __exit__(self, *exc: object) -> None:
            self.inner.release()

    store._queue_lock = Watched(store._queue_lock)  # type: ignore[assignment]
    first, second = (Operation(name=f"operations/{uuid.uuid4()}") for _ in range(2))
    with store._lock:
        leading, failures = in_thread(lambda: store.insert(first, NOW, NewOperation(METHOD)))
        queued(store, 1)  # the thread leads, and waits for the connection
        write = loop_thread.submit(store.insert_async(second, NOW, NewOperation(METHOD)))
        queued(store, 2)  # the coroutine's write waits for the thread's group
        closing, close_failures = in_thread(store.close)
        assert looked.wait(LONG)  # the writer thread, woken by close, looked: a write is queued
    leading.join(LONG)
    assert not leading.is_alive() and not failures
    closed_with_writes_made(store, path, (closing, close_failures), [write], [second], (first,))


def test_a_shared_commit_that_fails_writes_none_and_every_writer_hears_why(
    store: SQLiteStore,
) -> None:
    """When the shared transaction fails (here one write breaks the database's rules in a way
    that dooms the transaction), every write in it raises StoreUnavailable and none is kept;
    the next write goes through."""
    before = dump(store)
    fresh = [Operation(name=f"operations/{uuid.uuid4()}") for _ in range(3)]

    def doomed() -> None:
        store._write(lambda conn: conn.execute("INSERT INTO no_such_table VALUES (1)"))

    writes = [*[lambda op=op: store.insert(op, NOW, NewOperation(METHOD)) for op in fresh], doomed]
    outcomes, sizes = queue_writes(store, writes)
    assert sizes == [len(writes)]
    assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
    assert all("cannot be written" in str(o) for o in outcomes)
    assert dump(store) == before
    assert store.get(add(store)) is not None


def wal_size_after_steady_writes(path: pathlib.Path, writes: int) -> int:
    """Inserts ``writes`` operations back to back (no pause for the WAL to catch up) and
    returns the WAL file's size."""
    opened = SQLiteStore(path)
    try:
        for _ in range(writes):
            add(opened)
        return os.path.getsize(f"{path}-wal")
    finally:
        opened._closed.set()  # stop the checkpoints before the size is read by the caller
        opened._checkpointer.join()
        opened._conn.close()
        for reader in opened._readers:
            reader.close()


def test_the_wal_starts_again_under_steady_writes(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes that never pause would keep a passive checkpoint from ever catching up, and the
    WAL from ever being rewound; the store's checkpoints rewind it once it is long enough."""
    import lrofw.stores.sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "_CHECKPOINT_INTERVAL", 0.05)  # several during the writes
    monkeypatch.setattr(sqlite_store, "_WAL_RESTART_BYTES", 10**12)  # the old behaviour
    unbounded = wal_size_after_steady_writes(tmp_path / "unbounded.db", 6000)
    monkeypatch.setattr(sqlite_store, "_WAL_RESTART_BYTES", 200 * 1024)
    monkeypatch.setattr(sqlite_store, "_WAL_SIZE_LIMIT", 1 << 20)  # cut back to 1 MB
    bounded = wal_size_after_steady_writes(tmp_path / "bounded.db", 6000)
    # Measured: 87 MB unbounded; 15-30 MB bounded (how far the WAL grows while a rewind's
    # catch-up checkpoints run depends on the timing of the writes and of the checkpoints).
    assert bounded < unbounded / 2, (bounded, unbounded)


def wal_frames(path: pathlib.Path) -> int:
    """The frames in the WAL of the file at ``path``, read from the WAL index's header (mxFrame,
    in native byte order) without a checkpoint, which would change what it measures."""
    with open(f"{path}-shm", "rb") as shm:
        return int.from_bytes(shm.read(20)[16:20], sys.byteorder)


class RecordingConnection:
    """A checkpoint connection that records each statement with whether the store's write lock
    was held, and runs the next of ``during_pass`` after each passive checkpoint."""

    def __init__(self, store: SQLiteStore, during_pass: list[Callable[[], None]]) -> None:
        self.store = store
        self.conn = store._connect()
        self.during_pass = during_pass
        self.statements: list[tuple[str, bool]] = []

    def execute(self, sql: str) -> sqlite3.Cursor:
        self.statements.append((sql, self.store._lock.locked()))
        cursor = self.conn.execute(sql)
        if "PASSIVE" in sql and self.during_pass:
            self.during_pass.pop(0)()
        return cursor

    def checkpoints(self) -> list[tuple[str, bool]]:
        """(mode, write lock held) of each checkpoint run."""
        return [
            (sql.split("(")[1].rstrip(")"), locked)
            for sql, locked in self.statements
            if "wal_checkpoint" in sql
        ]


def test_rewinding_the_wal_copies_under_the_write_lock_only_what_its_catch_up_missed(
    path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rewind first runs passive checkpoints without the write lock, as long as each finds
    many frames written since the one before; only then does it hold the lock, for a RESTART
    that has little left to copy. The next write starts the WAL again from its beginning."""
    import lrofw.stores.sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "_CHECKPOINT_INTERVAL", 3600)  # only this test's
    opened = SQLiteStore(path)
    try:
        add(opened)
        # A reader's snapshot keeps the writes from starting the WAL again on their own (as
        # they would after a checkpoint that copied everything) until the last pass.
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM ops").fetchone()

        def burst(writes: int) -> None:  # writes made while a checkpoint runs
            for _ in range(writes):
                add(opened)

        def reader_done() -> None:
            reader.execute("COMMIT")

        seen = wal_frames(path)  # by the checkpoint thread's last passive checkpoint
        burst(80)
        # Each pass finds fewer new frames than the one before (else it would stop: never
        # catching up), but more than _CAUGHT_UP_FRAMES until the third.
        conn = RecordingConnection(opened, [lambda: burst(30), reader_done])
        frames = opened._restart_wal(conn, seen)  # type: ignore[arg-type]
        assert conn.checkpoints() == [
            ("PASSIVE", False),  # finds the first burst: goes on
            ("PASSIVE", False),  # finds the second, smaller: goes on
            ("PASSIVE", False),  # finds nothing new
            ("RESTART", True),
        ]
        assert frames > seen + 110  # it succeeded, and reports the WAL it leaves
        name = add(opened)
        assert wal_frames(path) < 10  # that write started the WAL again
        assert opened.get(name) is not None
        conn.conn.close()
        reader.close()
    finally:
        opened.close()


def test_rewinding_the_wal_never_holds_writes_behind_another_processs_reader(
    path: pathlib.Path,
) -> None:
    """Rewinding the WAL waits for other processes' readers; it gives up after a moment (the
    next checkpoint tries again) instead of holding the store's writes for busy_timeout."""
    opened = SQLiteStore(path, busy_timeout=LONG)
    try:
        add(opened)
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM ops").fetchone()  # holds a snapshot of the WAL
        add(opened)  # the WAL now has frames the reader's snapshot does not see
        conn = opened._connect()
        started = time.monotonic()
        assert opened._restart_wal(conn, 0) == -1  # given up
        assert time.monotonic() - started < LONG / 3
        assert not opened._lock.locked()
        assert opened.get(add(opened)) is not None
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == int(LONG * 1000)  # restored
        reader.execute("COMMIT")
        reader.close()
        assert opened._restart_wal(conn, 0) > 0  # no reader left: done
        conn.close()
    finally:
        opened.close()
