"""Tests for the five google.longrunning.Operations RPCs over a real server (DESIGN section 3):
each rule is checked on a ``grpc.server`` (OperationsServicer) and on a ``grpc.aio`` server
(AsyncOperationsServicer) by one parametrized test."""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import pathlib
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import tls_pb2
from factories import (
    LONG,
    METHOD,
    RESPONSE,
    Handler,
    blocked,
    cancel,
    create,
    delete,
    eventually,
    finished,
    get,
    in_thread,
    list_ops,
    listed_names,
    on_both_servers,
    ops_stub,
    returns,
    rpc_error,
    seconds,
    served,
    wait_request,
    waiting,
)
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2, wrappers_pb2

import lrofw
from lrofw import _core
from lrofw.manager import MAX_LIST_BYTES
from lrofw.stores import MemoryStore, SQLiteStore
from lrofw.testing import Served

OTHER_METHOD = "/other.Service/Other"


# --- GetOperation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "",
        "operations/" + "x" * 1014,  # 1,025 characters
        "x" * 5000,
        "other/123",
        "operations",
        "operations/",
        "/operations/123",
        "operationsx/123",
    ],
    ids=[
        "empty",
        "1025-chars",
        "5000-chars",
        "wrong-prefix",
        "collection",
        "bare-prefix",
        "leading-slash",
        "prefix-lookalike",
    ],
)
@on_both_servers
def test_get_malformed_name_is_invalid_argument(name: str, aio: bool) -> None:
    """GetOperation refuses a malformed name with INVALID_ARGUMENT, not NOT_FOUND."""
    with served(returns, aio=aio) as srv:
        err = rpc_error(lambda: get(srv, name))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT


@on_both_servers
def test_get_name_of_exactly_1024_chars_is_well_formed(aio: bool) -> None:
    """A well-formed unknown name of exactly 1,024 characters is NOT_FOUND, not malformed."""
    name = "operations/" + "x" * 1013
    assert len(name) == 1024
    with served(returns, aio=aio) as srv:
        err = rpc_error(lambda: get(srv, name))
    assert err.code() is grpc.StatusCode.NOT_FOUND


@on_both_servers
def test_get_unknown_is_not_found(aio: bool) -> None:
    """GetOperation of a well-formed name nobody created is NOT_FOUND."""
    with served(returns, aio=aio) as srv:
        err = rpc_error(lambda: get(srv, "operations/no-such-op"))
    assert err.code() is grpc.StatusCode.NOT_FOUND


@on_both_servers
def test_get_returns_the_created_op(aio: bool) -> None:
    """GetOperation returns the op the create RPC named, with its response once done."""
    with served(returns, aio=aio) as srv:
        created = create(srv)
        finished(srv, created.name)
        op = get(srv, created.name)
    assert not created.done
    prefix, _, id_ = created.name.partition("/")
    assert prefix == "operations"
    assert uuid.UUID(id_).version == 4  # unguessable by default
    assert op.name == created.name
    assert op.done and op.HasField("response")
    out = tls_pb2.ProvisionDutResponse()
    assert op.response.Unpack(out) and out == RESPONSE


def test_operation_ids_are_random_version_4_uuids_unique_across_threads_and_a_fork() -> None:
    """Names' ids come from os.urandom in batches (see _core.random_id): every one a version 4
    UUID, none repeated across several batches, threads at once, or a forked child (which must
    not hand out the ids its parent drew)."""
    drawn: list[str] = []
    lock = threading.Lock()

    def draw() -> None:
        mine = [_core.random_id() for _ in range(700)]  # several batches of 256
        with lock:
            drawn.extend(mine)

    threads = [in_thread(draw)[0] for _ in range(4)]
    for thread in threads:
        thread.join(LONG)
    parsed = [uuid.UUID(i) for i in drawn]
    assert all(u.version == 4 and str(u) == i for u, i in zip(parsed, drawn, strict=True))
    assert len(set(drawn)) == len(drawn) == 2800
    _core.random_id()  # the parent has a batch in hand at the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, " ".join(_core.random_id() for _ in range(8)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    parent = [_core.random_id() for _ in range(8)]
    assert len(child) == 8 and not set(child) & set(parent)


@on_both_servers
def test_configured_name_prefix_is_the_collection(aio: bool) -> None:
    """With name_prefix set, ops live under it: Get, List and Cancel use it, the default refused."""
    with served(returns, manager=lrofw.Manager(name_prefix="projects/p/ops"), aio=aio) as srv:
        name = create(srv).name
        finished(srv, name)
        got = get(srv, name)
        listed = listed_names(srv, name="projects/p/ops")
        default_get = rpc_error(lambda: get(srv, "operations/" + name.rsplit("/", 1)[1]))
        default_list = rpc_error(lambda: list_ops(srv, name="operations"))
    assert name.startswith("projects/p/ops/")
    assert got.name == name
    assert listed == [name]
    assert default_get.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert default_list.code() is grpc.StatusCode.INVALID_ARGUMENT


@on_both_servers
def test_get_returned_op_is_a_copy_over_the_wire(aio: bool) -> None:
    """Mutating an op a client got does not change what a later GetOperation returns."""
    with served(returns, aio=aio) as srv:
        name = create(srv).name
        first = finished(srv, name)
        before = first.SerializeToString(deterministic=True)
        first.done = False
        first.ClearField("response")
        first.error.code = 13
        later = get(srv, name)
    assert later.SerializeToString(deterministic=True) == before


@pytest.mark.parametrize(
    "read",
    [
        lambda m, name: m.get(name),
        lambda m, name: m.wait(name, timeout=0),
        lambda m, name: m.cancel(name),  # the op is done: cancel returns it unchanged
        lambda m, name: m.list()[0][0],
    ],
    ids=["get", "wait", "cancel-done", "list"],
)
@on_both_servers
def test_manager_hands_out_copies(
    read: Callable[[lrofw.Manager, str], operations_pb2.Operation],
    aio: bool,
) -> None:
    """Every Manager read returns a copy: mutating it changes neither the store nor a later Get."""
    with served(returns, aio=aio) as srv:
        name = create(srv).name
        before = finished(srv, name).SerializeToString(deterministic=True)
        op = read(srv.manager, name)
        assert op.name == name
        op.done = False
        op.ClearField("response")
        op.error.code = 13
        op.metadata.Pack(tls_pb2.ProvisionDutMetadata(stage="tampered"))
        assert get(srv, name).SerializeToString(deterministic=True) == before
        assert srv.manager.get(name).SerializeToString(deterministic=True) == before


# --- ListOperations -------------------------------------------------------------------------------


@pytest.mark.parametrize("collection", ["", "operations"])
@on_both_servers
def test_list_empty_name_or_collection_lists_all(collection: str, aio: bool) -> None:
    """ListOperations with name "" or "operations" lists every op."""
    with served(returns, aio=aio) as srv:
        names = {create(srv).name for _ in range(3)}
        listed = list_ops(srv, name=collection)
    assert {op.name for op in listed.operations} == names
    assert listed.next_page_token == ""


@pytest.mark.parametrize(
    "collection", ["operations/", "ops", "projects/p/operations", "operations/abc", "/operations"]
)
@on_both_servers
def test_list_other_name_is_invalid_argument(collection: str, aio: bool) -> None:
    """ListOperations with a name other than "" or the collection is INVALID_ARGUMENT."""
    with served(returns, aio=aio) as srv:
        create(srv)
        err = rpc_error(lambda: list_ops(srv, name=collection))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT


@on_both_servers
def test_list_is_newest_first(aio: bool) -> None:
    """ListOperations returns the most recently created op first."""
    with served(returns, aio=aio) as srv:
        created = [create(srv).name for _ in range(6)]
        listed = listed_names(srv)
    assert listed == created[::-1]


@on_both_servers
def test_list_page_size_zero_is_default_50(aio: bool) -> None:
    """page_size 0 returns the documented default of 50 and a token for the rest."""
    with served(returns, aio=aio) as srv:
        created = [create(srv).name for _ in range(60)]
        first = list_ops(srv, page_size=0)
        rest = list_ops(srv, page_size=0, page_token=first.next_page_token)
    assert len(first.operations) == 50
    assert first.next_page_token != ""
    assert [op.name for op in first.operations] == created[::-1][:50]
    assert [op.name for op in rest.operations] == created[::-1][50:]
    assert rest.next_page_token == ""


@pytest.mark.parametrize("page_size", [1001, 5000, 2**31 - 1])
@on_both_servers
def test_list_page_size_above_max_is_clamped_to_1000(page_size: int, aio: bool) -> None:
    """A page_size above 1,000 returns 1,000 ops and a token, not an error."""
    with served(returns, aio=aio) as srv:
        for _ in range(1003):
            srv.manager.new_operation(method=OTHER_METHOD)
        first = list_ops(srv, page_size=page_size)
        rest = list_ops(srv, page_size=page_size, page_token=first.next_page_token)
    assert len(first.operations) == 1000
    assert first.next_page_token != ""
    assert len(rest.operations) == 3
    assert rest.next_page_token == ""


@pytest.mark.parametrize("page_size", [-1, -50, -(2**31)])
@on_both_servers
def test_list_negative_page_size_is_invalid_argument(page_size: int, aio: bool) -> None:
    """A negative page_size is INVALID_ARGUMENT (AIP-158)."""
    with served(returns, aio=aio) as srv:
        create(srv)
        err = rpc_error(lambda: list_ops(srv, page_size=page_size))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("count", "page_size"), [(21, 1), (21, 7), (21, 10), (21, 21), (21, 22), (0, 5), (1, 1)]
)
@on_both_servers
def test_list_paging_visits_each_op_exactly_once(count: int, page_size: int, aio: bool) -> None:
    """Paging visits every op once, newest first; the token is empty only on the last page."""
    with served(returns, aio=aio) as srv:
        created = [srv.manager.new_operation(method=OTHER_METHOD).name for _ in range(count)]
        pages: list[list[str]] = []
        tokens: list[str] = []
        token = ""
        while True:
            page = list_ops(srv, page_size=page_size, page_token=token)
            pages.append([op.name for op in page.operations])
            tokens.append(page.next_page_token)
            token = page.next_page_token
            if not token:
                break
            assert len(pages) <= count + 1, "paging does not end"
    visited = [name for page in pages for name in page]
    assert visited == created[::-1]
    assert all(tokens[:-1]) and tokens[-1] == ""
    assert len(pages) == max(1, -(-count // page_size))
    assert all(len(page) == page_size for page in pages[:-1])


@on_both_servers
def test_list_paging_with_a_filter_visits_each_match_once(aio: bool) -> None:
    """Paging through a filtered listing visits each matching op exactly once."""
    with served(returns, aio=aio) as srv:
        mine = []
        for i in range(30):
            op = srv.manager.new_operation(method=METHOD if i % 3 else OTHER_METHOD)
            if i % 3 == 0:
                mine.append(op.name)
        visited: list[str] = []
        token = ""
        while True:
            page = list_ops(srv, filter=f"method = {OTHER_METHOD}", page_size=4, page_token=token)
            visited += [op.name for op in page.operations]
            token = page.next_page_token
            if not token:
                break
    assert visited == mine[::-1]


@contextlib.contextmanager
def served_store(kind: str, tmp_path: pathlib.Path, aio: bool, **options: Any) -> Iterator[Served]:
    """A server whose Manager (with ``options``) keeps its operations in a ``kind`` store."""
    store = SQLiteStore(tmp_path / "ops.db") if kind == "sqlite" else MemoryStore()
    try:
        with served(returns, manager=lrofw.Manager(store, **options), aio=aio) as srv:
            yield srv
    finally:
        store.close()


def list_all(srv: Served, **fields: Any) -> list[operations_pb2.ListOperationsResponse]:
    """Every page of a listing, following next_page_token to the end."""
    pages = [list_ops(srv, **fields)]
    while pages[-1].next_page_token:
        pages.append(list_ops(srv, page_token=pages[-1].next_page_token, **fields))
        assert len(pages) <= 100, "paging does not end"
    return pages


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@on_both_servers
def test_list_pages_of_large_operations_fit_the_client_limit(
    kind: str, tmp_path: pathlib.Path, aio: bool
) -> None:
    """Five ops of 900 KB: a default List page stays under the client's 4 MB limit (a short
    page with a token), and the tokens lead to all five."""
    with served_store(kind, tmp_path, aio) as srv:
        created = [srv.manager.new_operation(METHOD).name for _ in range(5)]
        for name in created:
            assert srv.manager.set_metadata(name, wrappers_pb2.BytesValue(value=b"x" * 900_000))
        pages = list_all(srv)  # the test channel keeps grpc's default 4 MB receive limit
    assert 0 < len(pages[0].operations) < 5
    assert pages[0].next_page_token != ""
    assert all(page.ByteSize() < MAX_LIST_BYTES for page in pages)
    assert [op.name for page in pages for op in page.operations] == created[::-1]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@pytest.mark.parametrize("matching", [0, 3])
@on_both_servers
def test_list_examines_at_most_max_list_scan_per_call(
    kind: str, matching: int, tmp_path: pathlib.Path, aio: bool
) -> None:
    """With max_list_scan=50 over 200 ops, a filter matching few or none answers short (even
    empty) pages with a token; the tokens lead to exactly the matches, then an empty token."""
    with served_store(kind, tmp_path, aio, max_list_scan=50) as srv:
        created = [srv.manager.new_operation(METHOD).name for _ in range(200)]
        wanted = created[:matching]  # the oldest: the last a scan from the newest reaches
        filter_ = " OR ".join(f"name = {n}" for n in wanted) or 'method = "/no.Such/Method"'
        pages = list_all(srv, filter=filter_)
    assert pages[0].operations == [] and pages[0].next_page_token != ""
    assert 200 // 50 <= len(pages) <= 200 // 50 + 1  # SQLite may need one call to find the end
    assert [op.name for page in pages for op in page.operations] == wanted[::-1]
    assert pages[-1].next_page_token == ""


@on_both_servers
def test_list_paging_survives_creates_and_deletes_between_pages(aio: bool) -> None:
    """Ops created or deleted between pages neither repeat nor skip the ones still listed."""
    with served(returns, aio=aio) as srv:
        created = [srv.manager.new_operation(method=OTHER_METHOD).name for _ in range(12)]
        first = list_ops(srv, page_size=5)
        srv.manager.new_operation(method=OTHER_METHOD)  # newer than the cursor: not on later pages
        delete(srv, created[-6])  # on the next page
        delete(srv, created[-1])  # already listed
        visited = [op.name for op in first.operations]
        token = first.next_page_token
        while token:
            page = list_ops(srv, page_size=5, page_token=token)
            visited += [op.name for op in page.operations]
            token = page.next_page_token
    assert visited == [name for name in created[::-1] if name != created[-6]]


def first_token(srv: Served, **fields: Any) -> str:
    """Makes three ops and returns the next_page_token of a page of one."""
    for _ in range(3):
        srv.manager.new_operation(method=OTHER_METHOD)
    token = list_ops(srv, page_size=1, **fields).next_page_token
    assert token
    return token


def tampered(token: str, index: int) -> str:
    """``token`` with the character at ``index`` changed to another base64url character."""
    replacement = "A" if token[index] != "A" else "B"
    return token[:index] + replacement + token[index + 1 :]


@pytest.mark.parametrize("index", [0, 5, 20, 43])
@on_both_servers
def test_list_tampered_token_is_invalid_argument(index: int, aio: bool) -> None:
    """A page token with any character changed is INVALID_ARGUMENT."""
    with served(returns, aio=aio) as srv:
        token = first_token(srv)
        assert list_ops(srv, page_size=1, page_token=token).operations  # the real one works
        err = rpc_error(lambda: list_ops(srv, page_size=1, page_token=tampered(token, index)))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "token",
    [
        "bogus",
        "1",
        "A" * 44,
        base64.urlsafe_b64encode(struct.pack(">BQ24s", 1, 1, b"\0" * 24)).decode(),
        base64.urlsafe_b64encode(b"1").decode(),
        "=" * 44,
        "é" * 44,
        "x" * 10_000,
    ],
    ids=["word", "digit", "zeros", "unsigned", "base64-of-1", "padding", "non-ascii", "huge"],
)
@on_both_servers
def test_list_made_up_token_is_invalid_argument(token: str, aio: bool) -> None:
    """A page token the server never issued is INVALID_ARGUMENT."""
    with served(returns, aio=aio) as srv:
        first_token(srv)
        err = rpc_error(lambda: list_ops(srv, page_size=1, page_token=token))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT


@on_both_servers
def test_list_token_from_another_server_is_invalid_argument(aio: bool) -> None:
    """A page token issued by another server (another Manager) is INVALID_ARGUMENT."""
    with served(returns, aio=aio) as other:
        foreign = first_token(other)
    with served(returns, aio=aio) as srv:
        first_token(srv)
        err = rpc_error(lambda: list_ops(srv, page_size=1, page_token=foreign))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT


@on_both_servers
def test_list_token_reused_with_another_filter_is_invalid_argument(aio: bool) -> None:
    """A page token used with a different filter than it was issued for is INVALID_ARGUMENT."""
    with served(returns, aio=aio) as srv:
        token = first_token(srv, filter="done = false")
        assert list_ops(srv, page_size=1, filter="done = false", page_token=token).operations
        err = rpc_error(lambda: list_ops(srv, page_size=1, filter="done = true", page_token=token))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT


def scripted(gate: threading.Event) -> Handler:
    """A handler run by request.name: ok succeeds, block waits for gate, a code name raises it."""

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        if request.name == "block":
            gate.wait(LONG)
        if request.name in ("ok", "block"):
            return RESPONSE
        raise lrofw.OperationError(grpc.StatusCode[request.name], "scripted failure")

    return handler


@pytest.mark.parametrize(
    ("filter_", "expected"),
    [
        ("", {"ok", "nf", "pd", "block", "other"}),
        ("done = true", {"ok", "nf", "pd"}),
        ("done = false", {"block", "other"}),
        ("done != true", {"block", "other"}),
        ("error.code = 5", {"nf"}),
        ("error.code = NOT_FOUND", {"nf"}),
        ("error.code = not_found", {"nf"}),
        ("error.code = PERMISSION_DENIED", {"pd"}),
        ("error.code != 0", {"nf", "pd"}),
        ("error.code != OK", {"nf", "pd"}),
        ("error.code = 0", {"ok", "block", "other"}),
        (f"method = {METHOD}", {"ok", "nf", "pd", "block"}),
        (f'method = "{METHOD}"', {"ok", "nf", "pd", "block"}),
        (f"method != {METHOD}", {"other"}),
        (f"method = {OTHER_METHOD}", {"other"}),
        ("done = true AND error.code = 0", {"ok"}),
        ("error.code = 5 OR error.code = 7", {"nf", "pd"}),
        ("NOT done = true", {"block", "other"}),
        ("-done = true", {"block", "other"}),
        (f"done = false AND NOT method = {OTHER_METHOD}", {"block"}),
        ("(error.code = 5 OR error.code = 7) AND NOT error.code = 7", {"nf"}),
        (f"method = {METHOD} AND (done = false OR error.code = NOT_FOUND)", {"nf", "block"}),
        ("NOT (done = true OR done = false)", set()),
    ],
)
@on_both_servers
def test_list_filter(filter_: str, expected: set[str], aio: bool) -> None:
    """ListOperations filters on done, error.code (number or name) and method, with AND/OR/NOT."""
    gate = threading.Event()
    with served(scripted(gate), gates=(gate,), aio=aio) as srv:
        labels = {
            create(srv, "ok").name: "ok",
            create(srv, "NOT_FOUND").name: "nf",
            create(srv, "PERMISSION_DENIED").name: "pd",
            create(srv, "block").name: "block",
            srv.manager.new_operation(method=OTHER_METHOD).name: "other",
        }
        for name, label in labels.items():
            if label in ("ok", "nf", "pd"):
                finished(srv, name)
        listed = list_ops(srv, filter=filter_)
    assert {labels[op.name] for op in listed.operations} == expected


@pytest.mark.parametrize(
    "filter_",
    [
        "done",
        "done =",
        "= true",
        "done = maybe",
        "color = red",
        "error.code = BANANA",
        "error.code = 99999999999",
        "(done = true",
        "done = true)",
        "AND",
        "done = true OR",
        "done = true AND AND done = false",
        "NOT",
        "done : true",
        "method < x",
        "done == true",
        "done = 'true",
        "done = true; drop table operations",
        "(" * 40 + "done = true" + ")" * 40,
        "done = true AND " * 200 + "done = true",
        "\x00",
    ],
)
@on_both_servers
def test_list_malformed_filter_is_invalid_argument(filter_: str, aio: bool) -> None:
    """A malformed filter is INVALID_ARGUMENT (AIP-160), never INTERNAL."""
    with served(returns, aio=aio) as srv:
        create(srv)
        err = rpc_error(lambda: list_ops(srv, filter=filter_))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT


# --- WaitOperation --------------------------------------------------------------------------------


@on_both_servers
def test_wait_returns_as_soon_as_the_op_is_done(aio: bool) -> None:
    """A holding WaitOperation returns done as soon as another thread finishes the op."""
    gate, started = threading.Event(), threading.Event()
    with served(blocked(gate, started=started), gates=(gate,), aio=aio) as srv:
        name = create(srv).name
        assert started.wait(LONG)
        request = wait_request(name)
        future = ops_stub(srv).WaitOperation.future(request, timeout=LONG + 5)
        waiting(srv, name)
        assert not future.done()
        released = time.monotonic()
        gate.set()  # the handler, on a worker thread, now returns and finishes the op
        op = future.result(timeout=LONG)
        elapsed = time.monotonic() - released
    assert op.done and op.HasField("response")
    assert elapsed < 1.0


@on_both_servers
def test_wait_returns_the_latest_state_at_timeout(aio: bool) -> None:
    """A WaitOperation that times out returns the metadata reported while it held."""
    gate, between, reported = threading.Event(), threading.Event(), threading.Event()

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        op.report(tls_pb2.ProvisionDutMetadata(stage="downloading", percent=10))
        between.wait(LONG)
        op.report(tls_pb2.ProvisionDutMetadata(stage="flashing", percent=50))
        reported.set()
        gate.wait(LONG)
        return RESPONSE

    with served(handler, gates=(gate, between), aio=aio) as srv:
        name = create(srv).name
        request = wait_request(name, 0.5)
        future = ops_stub(srv).WaitOperation.future(request, timeout=LONG)
        waiting(srv, name)
        between.set()
        assert reported.wait(LONG)
        op = future.result(timeout=LONG)
    metadata = tls_pb2.ProvisionDutMetadata()
    assert not op.done
    assert op.metadata.Unpack(metadata) and metadata.percent == 50


@on_both_servers
def test_wait_on_a_done_op_returns_at_once(aio: bool) -> None:
    """WaitOperation on an op that is already done returns it without holding."""
    with served(returns, aio=aio) as srv:
        name = create(srv).name
        finished(srv, name)
        start = time.monotonic()
        request = wait_request(name)
        op = ops_stub(srv).WaitOperation(request, timeout=LONG)
        elapsed = time.monotonic() - start
    assert op.done
    assert elapsed < 1.0


@pytest.mark.parametrize("timeout", [0.0, 0.05, 0.2, 0.5])
@on_both_servers
def test_wait_timeout_returns_not_done_with_ok(timeout: float, aio: bool) -> None:
    """A not-done op's WaitOperation answers OK and not done after the (sub-second) timeout."""
    gate = threading.Event()
    with served(blocked(gate), gates=(gate,), aio=aio) as srv:
        name = create(srv).name
        request = wait_request(name, timeout)
        start = time.monotonic()
        op = ops_stub(srv).WaitOperation(request, timeout=LONG)
        elapsed = time.monotonic() - start
    assert op.name == name and not op.done
    assert timeout - 0.02 <= elapsed < timeout + 0.5


@pytest.mark.parametrize(
    "timeout",
    [
        duration_pb2.Duration(seconds=-1),
        duration_pb2.Duration(nanos=-1),
        duration_pb2.Duration(seconds=-(10**10)),
    ],
    ids=["minus-1s", "minus-1ns", "minus-huge"],
)
@on_both_servers
def test_wait_negative_timeout_is_invalid_argument(
    timeout: duration_pb2.Duration, aio: bool
) -> None:
    """A negative WaitOperation timeout is INVALID_ARGUMENT."""
    gate = threading.Event()
    with served(blocked(gate), gates=(gate,), aio=aio) as srv:
        name = create(srv).name
        request = operations_pb2.WaitOperationRequest(name=name, timeout=timeout)
        err = rpc_error(lambda: ops_stub(srv).WaitOperation(request, timeout=LONG))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("timeout", [None, 10.0, 10**6], ids=["unset", "10s", "huge"])
@on_both_servers
def test_wait_is_capped_by_max_wait(timeout: float | None, aio: bool) -> None:
    """The server's max_wait caps an unset or larger WaitOperation timeout."""
    gate = threading.Event()
    with served(blocked(gate), manager=lrofw.Manager(max_wait=0.3), gates=(gate,), aio=aio) as srv:
        name = create(srv).name
        request = operations_pb2.WaitOperationRequest(name=name)
        if timeout is not None:
            request.timeout.CopyFrom(seconds(timeout))
        start = time.monotonic()
        op = ops_stub(srv).WaitOperation(request, timeout=LONG)
        elapsed = time.monotonic() - start
    assert not op.done
    assert 0.28 <= elapsed < 1.5


@pytest.mark.parametrize("timeout", [None, 10.0], ids=["unset", "10s"])
@on_both_servers
def test_wait_answers_ok_just_before_the_caller_deadline(timeout: float | None, aio: bool) -> None:
    """A caller deadline shorter than the timeout gets an OK answer, not DEADLINE_EXCEEDED."""
    gate = threading.Event()
    with served(blocked(gate), gates=(gate,), aio=aio) as srv:
        name = create(srv).name
        request = operations_pb2.WaitOperationRequest(name=name)
        if timeout is not None:
            request.timeout.CopyFrom(seconds(timeout))
        start = time.monotonic()
        op = ops_stub(srv).WaitOperation(request, timeout=0.6)
        elapsed = time.monotonic() - start
    assert op.name == name and not op.done
    assert 0.3 <= elapsed < 0.6


@on_both_servers
def test_wait_on_unknown_is_not_found(aio: bool) -> None:
    """WaitOperation on an unknown op is NOT_FOUND."""
    with served(returns, aio=aio) as srv:
        request = wait_request("operations/nope", 1)
        err = rpc_error(lambda: ops_stub(srv).WaitOperation(request, timeout=LONG))
    assert err.code() is grpc.StatusCode.NOT_FOUND


@on_both_servers
def test_wait_deleted_mid_wait_is_not_found(aio: bool) -> None:
    """A WaitOperation holding on an op that is then deleted answers NOT_FOUND at once."""
    gate = threading.Event()
    with served(blocked(gate), gates=(gate,), aio=aio) as srv:
        name = create(srv).name
        request = wait_request(name)
        future = ops_stub(srv).WaitOperation.future(request, timeout=LONG + 5)
        waiting(srv, name)
        deleted = time.monotonic()
        delete(srv, name)
        err = future.exception(timeout=LONG)
        elapsed = time.monotonic() - deleted
    assert isinstance(err, grpc.RpcError)
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert elapsed < 1.0


@on_both_servers
def test_wait_the_client_cancels_stops_holding_at_once(aio: bool) -> None:
    """A WaitOperation its client cancels stops holding on the server at once: its waiter (and on
    a grpc.server, the thread it holds) is let go, not kept until the wait's own timeout."""
    gate = threading.Event()
    with served(blocked(gate), gates=(gate,), aio=aio) as srv:
        name = create(srv).name
        future = ops_stub(srv).WaitOperation.future(wait_request(name, 5.0), timeout=LONG)
        waiting(srv, name)
        cancelled = time.monotonic()
        assert future.cancel()
        eventually(lambda: not srv.manager.registry.is_waited(name), "the waiter to be let go")
        elapsed = time.monotonic() - cancelled
    assert elapsed < 1.0, f"the cancelled wait held on for {elapsed:.1f} s"


# --- CancelOperation ------------------------------------------------------------------------------


@on_both_servers
def test_cancel_unknown_is_not_found(aio: bool) -> None:
    """CancelOperation on an unknown op is NOT_FOUND."""
    with served(returns, aio=aio) as srv:
        err = rpc_error(lambda: cancel(srv, "operations/nope"))
    assert err.code() is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("outcome", ["ok", "NOT_FOUND"])
@on_both_servers
def test_cancel_done_op_is_ok_and_unchanged(outcome: str, aio: bool) -> None:
    """CancelOperation on a done op answers OK and leaves it exactly as it was."""
    gate = threading.Event()
    with served(scripted(gate), gates=(gate,), aio=aio) as srv:
        name = create(srv, outcome).name
        before = finished(srv, name).SerializeToString(deterministic=True)
        cancel(srv, name)
        after = get(srv, name).SerializeToString(deterministic=True)
    assert after == before


@on_both_servers
def test_cancel_running_op_is_cancelled_at_once(aio: bool) -> None:
    """Cancel makes a running op CANCELLED before its handler returns; that return is dropped."""
    gate, started = threading.Event(), threading.Event()
    seen: list[bool] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        started.set()
        gate.wait(LONG)  # deliberately deaf to the cancel signal until the test opens the gate
        seen.append(op.cancelled)
        return RESPONSE

    with served(handler, gates=(gate,), aio=aio) as srv:
        name = create(srv).name
        assert started.wait(LONG)
        cancel(srv, name)
        at_once = get(srv, name)
        gate.set()
        srv.manager.close(grace=LONG)  # drains: the handler has returned and been dealt with
        later = get(srv, name)
    assert at_once.done and at_once.error.code == 1
    assert seen == [True]
    assert later.done and later.error.code == 1
    assert not later.HasField("response")


@pytest.mark.parametrize("observe", ["sleep", "cancelled"])
@on_both_servers
def test_cancel_signals_the_handler(observe: str, aio: bool) -> None:
    """After CancelOperation the handler sees op.sleep return True / op.cancelled turn true."""
    started, stopped = threading.Event(), threading.Event()
    seen: list[bool] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        started.set()
        if observe == "sleep":
            seen.append(op.sleep(LONG))
        else:
            signal = threading.Event()
            op.add_stop_callback(signal.set)
            signal.wait(LONG)
            seen.append(op.cancelled)
        stopped.set()
        return RESPONSE

    with served(handler, aio=aio) as srv:
        name = create(srv).name
        assert started.wait(LONG)
        assert not get(srv, name).done
        cancel(srv, name)
        assert stopped.wait(LONG)
        srv.manager.close(grace=LONG)
        op = get(srv, name)
    assert seen == [True]
    assert op.error.code == grpc.StatusCode.CANCELLED.value[0]


@on_both_servers
def test_cancel_queued_op_never_runs_its_handler(aio: bool) -> None:
    """Cancelling an op still queued for a worker makes it CANCELLED; its handler never runs."""
    gate = threading.Event()
    ran: list[str] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        ran.append(request.name)
        gate.wait(LONG)
        return RESPONSE

    with served(handler, manager=lrofw.Manager(max_workers=1), gates=(gate,), aio=aio) as srv:
        running = create(srv, "running").name
        queued = create(srv, "queued").name
        eventually(lambda: ran == ["running"], "the first handler to start")
        cancel(srv, queued)
        at_once = get(srv, queued)
        gate.set()
        assert finished(srv, running).HasField("response")
        srv.manager.close(grace=LONG)
        later = get(srv, queued)
    assert at_once.done and at_once.error.code == 1
    assert later == at_once
    assert ran == ["running"]


@on_both_servers
def test_cancel_wakes_a_waiter_with_the_cancelled_op(aio: bool) -> None:
    """A WaitOperation holding on an op returns it, done and CANCELLED, when it is cancelled."""
    gate = threading.Event()
    with served(blocked(gate), gates=(gate,), aio=aio) as srv:
        name = create(srv).name
        request = wait_request(name)
        future = ops_stub(srv).WaitOperation.future(request, timeout=LONG + 5)
        waiting(srv, name)
        cancel(srv, name)
        op = future.result(timeout=5)
    assert op.done and op.error.code == 1


# --- DeleteOperation ------------------------------------------------------------------------------


@on_both_servers
def test_delete_unknown_is_not_found(aio: bool) -> None:
    """DeleteOperation on an unknown op is NOT_FOUND."""
    with served(returns, aio=aio) as srv:
        err = rpc_error(lambda: delete(srv, "operations/nope"))
    assert err.code() is grpc.StatusCode.NOT_FOUND


@on_both_servers
def test_delete_removes_the_op(aio: bool) -> None:
    """After DeleteOperation, Get is NOT_FOUND, List omits it, and a second Delete is NOT_FOUND."""
    with served(returns, aio=aio) as srv:
        keep, gone = create(srv).name, create(srv).name
        finished(srv, keep)
        finished(srv, gone)
        delete(srv, gone)
        err = rpc_error(lambda: get(srv, gone))
        again = rpc_error(lambda: delete(srv, gone))
        listed = listed_names(srv)
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert again.code() is grpc.StatusCode.NOT_FOUND
    assert listed == [keep]


@on_both_servers
def test_delete_does_not_cancel_the_running_handler(
    caplog: pytest.LogCaptureFixture, aio: bool
) -> None:
    """Delete leaves the handler running; its later completion is refused without a warning."""
    gate, started = threading.Event(), threading.Event()
    seen: list[bool] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        started.set()
        gate.wait(LONG)
        seen.append(op.cancelled)
        return RESPONSE

    caplog.set_level(logging.DEBUG, logger="lrofw")
    with served(handler, gates=(gate,), aio=aio) as srv:
        name = create(srv).name
        assert started.wait(LONG)
        delete(srv, name)
        assert rpc_error(lambda: get(srv, name)).code() is grpc.StatusCode.NOT_FOUND
        gate.set()
        srv.manager.close(grace=LONG)
        err = rpc_error(lambda: get(srv, name))
        listed = listed_names(srv)
    assert seen == [False]  # not cancelled, and it ran to the end
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert listed == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# --- undecodable request bytes --------------------------------------------------------------------

OPERATIONS_RPCS = [
    ("GetOperation", "GetOperationRequest"),
    ("ListOperations", "ListOperationsRequest"),
    ("WaitOperation", "WaitOperationRequest"),
    ("CancelOperation", "CancelOperationRequest"),
    ("DeleteOperation", "DeleteOperationRequest"),
]


@pytest.mark.parametrize("data", [b"\xff", b"\x0a\x05ab", b"\x0a\x01\xff", b"\x0b"])
@pytest.mark.parametrize(("rpc", "message"), OPERATIONS_RPCS)
@on_both_servers
def test_undecodable_bytes_are_invalid_argument(
    rpc: str, message: str, data: bytes, aio: bool
) -> None:
    """Bytes that do not parse as the RPC's request answer INVALID_ARGUMENT naming the message
    type, with no parser text; the server goes on serving."""
    with served(returns, aio=aio) as srv:
        raw = srv.channel.unary_unary(f"/google.longrunning.Operations/{rpc}")
        err = rpc_error(lambda: raw(data, timeout=LONG))
        name = create(srv).name
        after = finished(srv, name)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        f"the request is not a valid google.longrunning.{message}: it could not be parsed"
    )
    assert after.HasField("response")


@on_both_servers
def test_undecodable_bytes_on_a_registered_operations_method(aio: bool) -> None:
    """A client calling a registered method (as generated stubs do) gets the same answer."""
    with served(returns, aio=aio) as srv:
        raw = srv.channel.unary_unary(
            "/google.longrunning.Operations/GetOperation", _registered_method=True
        )
        err = rpc_error(lambda: raw(b"\xff", timeout=LONG))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
