"""The SQLite store's schema versions: files written by earlier versions open as the current one
and serve their operations unchanged; a newer one is refused (tests/data/README.md: the files)."""

from __future__ import annotations

import hashlib
import pathlib
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from typing import Any

import grpc
import pytest
import tls_pb2_grpc
from factories import LONG, METHOD, Metadata, Request, Response, common, ops_stub
from google.longrunning import operations_pb2, operations_proto_pb2
from google.protobuf import any_pb2

import lrofw
from lrofw.listing import MatchAll, parse_filter
from lrofw.stores import DuplicateRequest, NewOperation, Orphan, SQLiteStore, StoreOpenError
from lrofw.stores.base import Record
from lrofw.stores.sqlite import SCHEMA_VERSION
from lrofw.testing import serve

Operation = operations_proto_pb2.Operation

NOW = 1_700_000_000.0
ALL = MatchAll()
DATA = pathlib.Path(__file__).resolve().parent / "data"
ROOT = DATA.parent.parent

#: Every column of ``ops``, in the order a row is compared.
COLUMNS = (
    "position, name, method, done, error_code, create_time, done_time, owner, request,"
    " request_key, request_hash, data, principal, lost"
)
#: The request that made operations/v2-ok, and its key for principal alice (see tests/data).
V2_REQUEST = Request(name="dut", image_path="img-1", request_id="id-1")
V2_KEY = hashlib.sha256(b"alice").hexdigest() + f":{METHOD}\nid-1"


@pytest.fixture
def path(tmp_path: pathlib.Path) -> pathlib.Path:
    """Where the test's database file goes."""
    return tmp_path / "ops.db"


def copied(name: str, path: pathlib.Path) -> pathlib.Path:
    """tests/data/``name`` copied to ``path`` (the original is never opened for writing)."""
    shutil.copyfile(DATA / name, path)
    return path


def raw(path: pathlib.Path, sql: str) -> Any:
    """Runs one statement on a separate plain sqlite3 connection; returns the first value."""
    found = rows(path, sql)
    return found[0][0] if found else None


def count_on_reopening(path: pathlib.Path) -> int:
    """How many operations a new SQLiteStore on ``path`` lists (a migrated file opens as it
    is, with nothing more to migrate)."""
    store = SQLiteStore(path)
    try:
        return len(store.list(ALL, None, 10)[0])
    finally:
        store.close()


def rows(path: pathlib.Path, sql: str) -> list[tuple[Any, ...]]:
    """Runs one statement on a separate plain sqlite3 connection; returns every row."""
    conn = sqlite3.connect(path)
    try:
        found = conn.execute(sql).fetchall()
        conn.commit()
        return found
    finally:
        conn.close()


def packed(message: Any) -> any_pb2.Any:
    """Packs a message into an Any."""
    out = any_pb2.Any()
    out.Pack(message)
    return out


def add(store: SQLiteStore, **new: Any) -> str:
    """Inserts an unfinished op and returns its name."""
    op = Operation(name=f"operations/{uuid.uuid4()}")
    new.setdefault("method", METHOD)
    return store.insert(op, NOW, NewOperation(**new)).operation.name


def reason(exc: pytest.ExceptionInfo[StoreOpenError], path: pathlib.Path) -> str:
    """The error's message without the path (test folder names must not satisfy a check)."""
    message = str(exc.value)
    assert str(path) in message, "the message names the path"
    return message.replace(str(path), "<path>")


def schema_objects(path: pathlib.Path) -> set[tuple[str, str]]:
    """The (type, name) of every index and trigger on ops."""
    found = rows(path, "SELECT type, name FROM sqlite_master WHERE tbl_name = 'ops'")
    return {(kind, name) for kind, name in found if kind != "table"}


# --- newer and older files --------------------------------------------------------------------


def finished_as_written(store: SQLiteStore, version: str) -> Record:
    """Checks the fixture's two finished operations (``operations/{version}-ok`` and
    ``-failed``) read back as written; returns the failed one's record."""
    ok = store.get(f"operations/{version}-ok")
    assert ok is not None and ok.operation.done
    assert ok.operation.response == packed(Response(installed_image="img-1"))
    assert ok.operation.metadata == packed(Metadata(stage="done"))
    failed = store.get(f"operations/{version}-failed")
    assert failed is not None
    assert (failed.operation.error.code, failed.operation.error.message) == (5, "no such DUT")
    return failed


def test_open_of_a_newer_schema_is_refused_unchanged(path: pathlib.Path) -> None:
    """A file with a newer schema is refused with a message saying to upgrade; nothing changes."""
    SQLiteStore(path).close()
    raw(path, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    tables = raw(path, "SELECT group_concat(name) FROM sqlite_master")
    with pytest.raises(StoreOpenError) as info:
        SQLiteStore(path)
    message = reason(info, path)
    assert "newer" in message and "upgrade" in message and str(SCHEMA_VERSION + 1) in message
    assert raw(path, "PRAGMA user_version") == SCHEMA_VERSION + 1
    assert raw(path, "SELECT group_concat(name) FROM sqlite_master") == tables


def test_an_older_schema_is_migrated(path: pathlib.Path) -> None:
    """A database at user_version 0 gets the current schema and works; other tables stay."""
    raw(path, "CREATE TABLE unrelated (x INTEGER)")
    raw(path, "INSERT INTO unrelated VALUES (42)")
    assert raw(path, "PRAGMA user_version") == 0
    store = SQLiteStore(path)
    try:
        assert raw(path, "PRAGMA user_version") == SCHEMA_VERSION
        name = add(store)
        assert store.get(name) is not None
        assert raw(path, "SELECT x FROM unrelated") == 42
    finally:
        store.close()


def test_a_new_file_and_a_migrated_one_have_the_same_schema(tmp_path: pathlib.Path) -> None:
    """The current schema made from nothing and reached from schema 1, 2 and 3 files: the same
    table, indexes and trigger."""
    new = tmp_path / "new.db"
    SQLiteStore(new).close()
    older = [
        copied(name, tmp_path / name)
        for name in ("schema_v1.sqlite", "schema_v2.sqlite", "schema_v3.sqlite")
    ]
    for old in older:
        SQLiteStore(old).close()
    # (A renamed table's SQL reads CREATE TABLE "ops": SQLite quotes the new name.)
    query = (
        "SELECT type, name, replace(sql, 'TABLE \"ops\"', 'TABLE ops') FROM sqlite_master"
        " WHERE tbl_name = 'ops' ORDER BY name"
    )
    for old in older:
        assert rows(old, query) == rows(new, query), old.name
    assert schema_objects(new) == {
        ("index", "ops_expiry"),
        ("index", "ops_unfinished"),
        ("index", "ops_request_key"),
        ("index", "ops_principal"),
        ("index", "ops_error"),
        ("index", "sqlite_autoindex_ops_1"),  # the UNIQUE name
        ("trigger", "ops_floor"),
    }


# --- schema 2 ---------------------------------------------------------------------------------


def test_a_schema_2_file_keeps_every_row_byte_for_byte(path: pathlib.Path) -> None:
    """Migrating a schema 2 file rebuilds its table: every row, every column (positions,
    requests, keys, principals, losses), the owners and the token key come through unchanged;
    AUTOINCREMENT's counter becomes the position floor."""
    copied("schema_v2.sqlite", path)
    assert raw(path, "PRAGMA user_version") == 2
    query = f"SELECT {COLUMNS} FROM ops ORDER BY position"
    before = rows(path, query)
    owners = rows(path, "SELECT * FROM owners")
    key = raw(path, "SELECT value FROM meta WHERE key = 'token_key'")
    assert raw(path, "SELECT seq FROM sqlite_sequence WHERE name = 'ops'") == 7
    SQLiteStore(path).close()
    assert raw(path, "PRAGMA user_version") == SCHEMA_VERSION == 4
    assert raw(path, "PRAGMA integrity_check") == "ok"
    assert rows(path, query) == before and len(before) == 5
    assert rows(path, "SELECT * FROM owners") == owners
    assert raw(path, "SELECT value FROM meta WHERE key = 'token_key'") == key
    assert raw(path, "SELECT value FROM meta WHERE key = 'position_floor'") == 7
    assert raw(path, "SELECT count(*) FROM sqlite_sequence WHERE name = 'ops'") == 0
    assert ("index", "ops_done") not in schema_objects(path)


def test_a_schema_2_file_is_served_unchanged(path: pathlib.Path) -> None:
    """A migrated schema 2 file: Get, List (filters, principals), orphans, request keys, fenced
    finish and metadata of its running operations, and new positions above every one given."""
    copied("schema_v2.sqlite", path)
    store = SQLiteStore(path)
    try:
        records = store.list(ALL, None, 10)[0]
        assert [(r.operation.name, r.method, r.create_time, r.done_time, r.position, r.principal)
                for r in records] == [
            ("operations/v2-claimed", METHOD, NOW + 5, None, 6, None),
            ("operations/v2-unowned", "", NOW + 4, None, 5, None),
            ("operations/v2-failed", "/a.S/M", NOW + 2, NOW + 11, 3, "bob"),
            ("operations/v2-ok", METHOD, NOW + 1, NOW + 10, 2, "alice"),
            ("operations/v2-running", METHOD, NOW, None, 1, "alice"),
        ]  # fmt: skip
        failed = finished_as_written(store, "v2")
        assert list(failed.operation.error.details) == [packed(Metadata(stage="gone"))]

        def names(filter_: str, **options: Any) -> list[str]:
            node = parse_filter(filter_) if filter_ else ALL
            return [r.operation.name for r in store.list(node, None, 10, **options)[0]]

        assert names("done = true") == ["operations/v2-failed", "operations/v2-ok"]
        assert names("error.code = 5") == ["operations/v2-failed"]
        assert names("error.code = NOT_FOUND AND done = true") == ["operations/v2-failed"]
        assert names('method = "/a.S/M"') == ["operations/v2-failed"]
        assert names("", principal="alice") == ["operations/v2-ok", "operations/v2-running"]
        assert names("done = false", principal="alice") == ["operations/v2-running"]
        assert names("", principal="bob", max_scan=1) == ["operations/v2-failed"]
        assert sorted(store.orphans(NOW, 10), key=lambda o: o.name) == [
            Orphan("operations/v2-running", METHOD, "dead-owner", b"\x00request\xff", 0),
            Orphan("operations/v2-unowned", "", None, None, 0),
        ]  # v2-claimed's owner holds a lease until NOW + 100
        assert [o.lost for o in store.orphans(NOW + 200, 10) if o.owner == "live-owner"] == [1]
        with pytest.raises(DuplicateRequest) as info:
            add(store, request_key=V2_KEY, request_hash=b"another request")
        assert info.value.record.operation.name == "operations/v2-ok"
        assert (
            info.value.request_hash
            == hashlib.sha256(V2_REQUEST.SerializeToString(deterministic=True)).digest()
        )

        # Its running operations: fenced metadata and finish, the request dropped.
        assert not store.set_metadata("operations/v2-claimed", packed(Metadata()), owner="me")
        assert store.set_metadata(
            "operations/v2-claimed", packed(Metadata(stage="again")), owner="live-owner"
        )
        assert store.finish("operations/v2-running", NOW + 20, response=packed(Response()),
                            owner="someone else") is None  # fmt: skip
        done = store.finish(
            "operations/v2-running", NOW + 20, response=packed(Response(installed_image="i")),
            owner="dead-owner",
        )  # fmt: skip
        assert done is not None and done.principal == "alice" and done.position == 1
        expected = Operation(
            name="operations/v2-running",
            metadata=packed(Metadata(stage="flashing")),
            done=True,
            response=packed(Response(installed_image="i")),
        )
        assert done.operation == expected
        assert raw(path, "SELECT data FROM ops WHERE position = 1") == expected.SerializeToString()
        assert raw(path, "SELECT request IS NULL AND owner IS NULL FROM ops WHERE position = 1")
        assert store.get("operations/v2-running") == done

        # New operations go above every position ever given (7 was the deleted newest).
        first = store.get(add(store, principal="carol"))
        assert first is not None and first.position == 8
        assert store.delete(first.operation.name)
        second = store.get(add(store))
        assert second is not None and second.position == 9
    finally:
        store.close()
    assert count_on_reopening(path) == 6


def identify(context: Any) -> str:
    """The caller named by the x-test-principal header."""
    return str(dict(context.invocation_metadata())["x-test-principal"])


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_a_server_on_a_schema_2_file_serves_it(path: pathlib.Path, aio: bool) -> None:
    """A real server on a migrated schema 2 file: each principal's Get, Wait and List see its
    operations as they were; a repeated request id returns the operation it made; the running
    operation of a dead server is resolved (ABORTED) with its metadata kept."""
    copied("schema_v2.sqlite", path)
    store = SQLiteStore(path)
    runs: list[str] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        runs.append(request.name)
        return Response(installed_image=request.image_path)

    servicer = common(handler, request_id=lambda r: r.request_id)
    try:
        with serve(servicer, manager=lrofw.Manager(store=store), aio=aio, identify=identify) as srv:
            ops = ops_stub(srv)

            def as_(who: str) -> dict[str, Any]:
                return {"metadata": (("x-test-principal", who),), "timeout": LONG}

            ok = ops.GetOperation(
                operations_pb2.GetOperationRequest(name="operations/v2-ok"), **as_("alice")
            )
            assert ok.response == packed(Response(installed_image="img-1"))
            failed = ops.WaitOperation(
                operations_pb2.WaitOperationRequest(name="operations/v2-failed"), **as_("bob")
            )
            assert failed.done and failed.error.code == grpc.StatusCode.NOT_FOUND.value[0]
            with pytest.raises(grpc.RpcError) as info:  # bob's operation, asked by alice
                ops.GetOperation(
                    operations_pb2.GetOperationRequest(name="operations/v2-failed"),
                    **as_("alice"),
                )
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            listed = ops.ListOperations(operations_pb2.ListOperationsRequest(), **as_("alice"))
            assert [op.name for op in listed.operations] == [
                "operations/v2-ok",
                "operations/v2-running",
            ]
            running = ops.WaitOperation(
                operations_pb2.WaitOperationRequest(name="operations/v2-running"), **as_("alice")
            )
            assert running.done and running.error.code == grpc.StatusCode.ABORTED.value[0]
            assert running.metadata == packed(Metadata(stage="flashing"))
            create = tls_pb2_grpc.CommonStub(srv.channel).ProvisionDut
            again = create(V2_REQUEST, **as_("alice"))
            assert again.name == "operations/v2-ok" and runs == []  # not run again
            theirs = create(V2_REQUEST, **as_("bob"))  # request ids are per principal
            assert theirs.name != "operations/v2-ok"
    finally:
        store.close()
    assert runs == ["dut"]


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_processes_opening_a_schema_2_file_at_once_migrate_it_once(
    path: pathlib.Path, journal: str
) -> None:
    """Three processes open one schema 2 file at the same moment: each opens it, it is migrated
    once (BEGIN IMMEDIATE serialises them), and every row is there once. As the file is kept
    here (one file, not in WAL mode yet) and as a server leaves it (WAL mode)."""
    copied("schema_v2.sqlite", path)
    assert raw(path, f"PRAGMA journal_mode = {journal}") == journal
    before = rows(path, f"SELECT {COLUMNS} FROM ops ORDER BY position")
    code = (
        "import sys, time\n"
        "from lrofw.stores import SQLiteStore\n"
        "while time.time() < float(sys.argv[2]): pass\n"  # start together
        "SQLiteStore(sys.argv[1]).close()\n"
    )
    start = time.time() + 1.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(path), str(start)],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        errors = [proc.communicate(timeout=LONG)[1] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert [proc.returncode for proc in procs] == [0, 0, 0], errors
    assert raw(path, "PRAGMA user_version") == SCHEMA_VERSION
    assert rows(path, f"SELECT {COLUMNS} FROM ops ORDER BY position") == before
    assert raw(path, "PRAGMA integrity_check") == "ok"


# --- schema 1 ---------------------------------------------------------------------------------


def test_a_schema_1_file_is_migrated_and_served_unchanged(path: pathlib.Path) -> None:
    """A file written by schema 1's code opens as the current schema: its ops, orphans, keys
    and positions are served as before, with no principal and no losses."""
    copied("schema_v1.sqlite", path)
    assert raw(path, "PRAGMA user_version") == 1
    key = raw(path, "SELECT value FROM meta WHERE key = 'token_key'")
    store = SQLiteStore(path)
    try:
        assert raw(path, "PRAGMA user_version") == SCHEMA_VERSION
        assert raw(path, "PRAGMA integrity_check") == "ok"
        assert store.token_key() == key
        records = store.list(ALL, None, 10)[0]
        summary = [
            (r.operation.name, r.method, r.create_time, r.done_time, r.position, r.principal)
            for r in records
        ]
        assert summary == [
            ("operations/v1-unowned", "", NOW + 4, None, 5, None),
            ("operations/v1-failed", METHOD, NOW + 2, NOW + 11, 3, None),
            ("operations/v1-ok", "/a.S/M", NOW + 1, NOW + 10, 2, None),
            ("operations/v1-running", METHOD, NOW, None, 1, None),
        ]
        finished_as_written(store, "v1")
        done = store.list(parse_filter("done = true"), None, 10)[0]
        assert [r.operation.name for r in done] == ["operations/v1-failed", "operations/v1-ok"]
        assert store.list(ALL, None, 10, principal="anyone") == ([], None)
        assert sorted(store.orphans(NOW, 10), key=lambda o: o.name) == [
            Orphan("operations/v1-running", METHOD, "dead-owner", b"\x00request\xff", 0),
            Orphan("operations/v1-unowned", "", None, None, 0),
        ]
        with pytest.raises(DuplicateRequest) as info:
            add(store, method="/a.S/M", request_key="m\nid-1", request_hash=b"other")
        assert (info.value.record.operation.name, info.value.request_hash) == (
            "operations/v1-ok",
            b"hash-1",
        )
        # It works as a current file: losses, principals, finishing, new positions.
        assert store.claim("operations/v1-running", "dead-owner", "me")
        assert [o.lost for o in store.orphans(NOW, 10) if o.owner == "me"] == [1]
        finished = store.finish("operations/v1-running", NOW + 20, response=packed(Response()))
        assert finished is not None and finished.principal is None
        assert raw(path, "SELECT count(*) FROM ops WHERE request IS NOT NULL") == 0
        new = store.get(add(store, principal="alice"))
        assert new is not None and new.position == 6  # the deleted position 4 stays unused
        assert store.list(ALL, None, 10, principal="alice")[0] == [new]
    finally:
        store.close()
    assert count_on_reopening(path) == 5


# --- schema 3 ---------------------------------------------------------------------------------


def test_a_schema_3_file_keeps_every_row_and_marks_its_newest_position(path: pathlib.Path) -> None:
    """Migrating a schema 3 file changes no row: its trigger is replaced, and the position
    floor, which schema 3 raised only when the newest operation went, becomes the newest
    position (what was deleted below it is not known)."""
    copied("schema_v3.sqlite", path)
    assert raw(path, "PRAGMA user_version") == 3
    query = f"SELECT {COLUMNS} FROM ops ORDER BY position"
    before = rows(path, query)
    key = raw(path, "SELECT value FROM meta WHERE key = 'token_key'")
    assert raw(path, "SELECT value FROM meta WHERE key = 'position_floor'") == 0
    SQLiteStore(path).close()
    assert raw(path, "PRAGMA user_version") == SCHEMA_VERSION == 4
    assert raw(path, "PRAGMA integrity_check") == "ok"
    assert rows(path, query) == before
    assert [r[0] for r in before] == [1, 3, 4, 5]  # 2 was deleted
    assert raw(path, "SELECT value FROM meta WHERE key = 'token_key'") == key
    assert raw(path, "SELECT value FROM meta WHERE key = 'position_floor'") == 5
    assert ("trigger", "ops_top") not in schema_objects(path)


def test_a_schema_3_file_is_listed_whole_across_a_gap_it_did_not_mark(path: pathlib.Path) -> None:
    """A bounded List over a migrated schema 3 file examines max_scan operations even across
    a position deleted before the migration (2, below the newest); the file's operations are
    served, and a new one takes the next position."""
    copied("schema_v3.sqlite", path)
    store = SQLiteStore(path)
    try:
        nothing = parse_filter('method = "/no.Such/Method"')
        # 5, 4, 3 and 1 are the four newest: the bound is 1 (not 2, were 2 taken to be there).
        assert store.list(nothing, None, 10, max_scan=4) == ([], 1)
        names = [r.operation.name for r in store.list(ALL, None, 10)[0]]
        assert names == [f"operations/v3-{n}" for n in ("newest", "running", "failed", "ok")]
        failed = store.list(parse_filter("error.code = 5"), None, 10, max_scan=4)[0]
        assert [r.operation.name for r in failed] == ["operations/v3-failed"]
        op = Operation(name="operations/v3-new")
        assert store.insert(op, NOW + 20, NewOperation(method=METHOD)).position == 6
        assert store.delete("operations/v3-new")
        op = Operation(name="operations/v3-newer")
        assert store.insert(op, NOW + 21, NewOperation(method=METHOD)).position == 7
    finally:
        store.close()
