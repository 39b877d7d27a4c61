"""Callers and ownership (lrofw._access, the ``identify``/``authorize`` hooks): over real servers,
each principal sees and acts on only its own operations, on the sync and the aio server.

The principal is read by a test ``identify`` hook from the ``x-test-principal`` header. SQLite
keeps principals only from its next schema (branch ``store``): these tests use the memory store.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import tls_pb2
import tls_pb2_grpc
from factories import LONG, Request, common, on_both_servers, ops_stub, rpc_error
from google.longrunning import operations_pb2

import lrofw
from lrofw._access import may_see
from lrofw.stores import SQLiteStore
from lrofw.testing import Served, serve

HEADER = "x-test-principal"
SECRET = "identify's private detail 4711"

Metadata = tuple[tuple[str, str], ...]


def identify(context: Any) -> str:
    """The test identify hook: the header's principal; none refused; "crash"/"empty" misbehave."""
    who = dict(context.invocation_metadata()).get(HEADER, "")
    if not who:
        raise lrofw.errors.Unauthenticated(f"send the {HEADER} header")
    if who == "crash":
        raise RuntimeError(SECRET)
    if who == "empty":
        return ""
    return str(who)


def admin_or_owner(principal: str, owner: str | None) -> bool:
    """An admin policy: "admin" sees everything, everybody else its own."""
    return principal == "admin" or principal == owner


def as_(who: str) -> Metadata:
    """Call metadata that makes the call ``who``'s."""
    return ((HEADER, who),)


#: Runs a test on the memory store and on a SQLite file (principals are kept by every store).
on_every_store = pytest.mark.parametrize("kind", ["memory", "sqlite"])


@contextlib.contextmanager
def owned(
    aio: bool,
    identified: bool = True,
    *,
    kind: str = "memory",
    tmp_path: Path | None = None,
    **hooks: Any,
) -> Iterator[Served]:
    """Serves ProvisionDut (request_id = the request's; "slow*" DUTs block until the end) on a
    store of ``kind`` ("sqlite": a file under ``tmp_path``)."""
    gate = threading.Event()

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        if request.name.startswith("slow"):
            op.add_stop_callback(gate.set)
            gate.wait(LONG)
        return tls_pb2.ProvisionDutResponse(installed_image=request.name)

    servicer = common(handler, request_id=lambda r: r.request_id)
    if identified:
        hooks.setdefault("identify", identify)
    store: Any = None
    if kind == "sqlite":
        assert tmp_path is not None
        store = SQLiteStore(tmp_path / "ops.db")
    manager = lrofw.Manager(store=store)
    try:
        with serve(servicer, manager=manager, aio=aio, **hooks) as srv:
            try:
                yield srv
            finally:
                gate.set()
    finally:
        if store is not None:
            store.close()


def create(srv: Served, who: str, name: str = "slow", request_id: str = "") -> str:
    """ProvisionDut as ``who``; returns the operation's name."""
    stub = tls_pb2_grpc.CommonStub(srv.channel)
    request = Request(name=name, request_id=request_id)
    return str(stub.ProvisionDut(request, metadata=as_(who), timeout=LONG).name)


def rpcs(srv: Served, name: str, who: Metadata) -> dict[str, Callable[[], Any]]:
    """Every RPC lrofw serves, each one call with metadata ``who`` (about ``name``)."""
    ops = ops_stub(srv)
    common_stub = tls_pb2_grpc.CommonStub(srv.channel)
    options: dict[str, Any] = {"metadata": who, "timeout": LONG}
    return {
        "ProvisionDut": lambda: common_stub.ProvisionDut(Request(name="dut"), **options),
        "GetOperation": lambda: ops.GetOperation(
            operations_pb2.GetOperationRequest(name=name), **options
        ),
        "ListOperations": lambda: ops.ListOperations(
            operations_pb2.ListOperationsRequest(), **options
        ),
        "WaitOperation": lambda: ops.WaitOperation(
            operations_pb2.WaitOperationRequest(name=name), **options
        ),
        "CancelOperation": lambda: ops.CancelOperation(
            operations_pb2.CancelOperationRequest(name=name), **options
        ),
        "DeleteOperation": lambda: ops.DeleteOperation(
            operations_pb2.DeleteOperationRequest(name=name), **options
        ),
    }


def get(srv: Served, who: str, name: str) -> operations_pb2.Operation:
    """GetOperation as ``who``."""
    request = operations_pb2.GetOperationRequest(name=name)
    return ops_stub(srv).GetOperation(request, metadata=as_(who), timeout=LONG)


def listed(srv: Served, who: str, **fields: Any) -> operations_pb2.ListOperationsResponse:
    """One ListOperations page as ``who``."""
    request = operations_pb2.ListOperationsRequest(**fields)
    return ops_stub(srv).ListOperations(request, metadata=as_(who), timeout=LONG)


def names(srv: Served, who: str) -> set[str]:
    """The names ``who`` lists, over every page."""
    found: set[str] = set()
    token = None
    while token != "":
        page = listed(srv, who, page_size=2, page_token=token or "")
        found.update(op.name for op in page.operations)
        token = page.next_page_token
    return found


# --- visibility -----------------------------------------------------------------------------------


@on_every_store
@on_both_servers
@pytest.mark.parametrize(
    "rpc", ["GetOperation", "WaitOperation", "CancelOperation", "DeleteOperation"]
)
def test_another_principals_operation_is_not_found_exactly_as_a_missing_one(
    aio: bool, rpc: str, kind: str, tmp_path: Path
) -> None:
    """Bob's Get/Wait/Cancel/Delete of alice's op answer as for a missing name, changing nothing."""
    with owned(aio, kind=kind, tmp_path=tmp_path) as srv:
        mine = create(srv, "alice")
        missing = f"operations/{uuid.uuid4()}"
        hidden = rpc_error(rpcs(srv, mine, as_("bob"))[rpc])
        absent = rpc_error(rpcs(srv, missing, as_("bob"))[rpc])
        assert hidden.code() == absent.code() == grpc.StatusCode.NOT_FOUND
        assert hidden.details() == absent.details().replace(missing, mine)
        op = get(srv, "alice", mine)
        assert not op.done  # neither cancelled nor deleted


@on_every_store
@on_both_servers
def test_each_principal_lists_only_its_own_operations(aio: bool, kind: str, tmp_path: Path) -> None:
    """ListOperations returns the caller's operations only, over every page."""
    with owned(aio, kind=kind, tmp_path=tmp_path) as srv:
        alices = {create(srv, "alice", "dut") for _ in range(3)}
        bobs = {create(srv, "bob", "dut")}
        assert names(srv, "alice") == alices
        assert names(srv, "bob") == bobs
        assert names(srv, "carol") == set()


@on_both_servers
def test_a_page_token_is_bound_to_its_principal(aio: bool) -> None:
    """Alice's next page token is INVALID_ARGUMENT for bob."""
    with owned(aio) as srv:
        for _ in range(3):
            create(srv, "alice", "dut")
        token = listed(srv, "alice", page_size=1).next_page_token
        assert token
        error = rpc_error(lambda: listed(srv, "bob", page_size=1, page_token=token))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


@on_every_store
@on_both_servers
def test_an_authorize_hook_lets_an_admin_see_and_act_on_every_operation(
    aio: bool, kind: str, tmp_path: Path
) -> None:
    """With admin_or_owner, admin lists, gets and cancels alice's op; bob still cannot."""
    with owned(aio, authorize=admin_or_owner, kind=kind, tmp_path=tmp_path) as srv:
        alices = create(srv, "alice")
        bobs = create(srv, "bob")
        assert names(srv, "admin") == {alices, bobs}
        assert names(srv, "bob") == {bobs}
        assert get(srv, "admin", alices).name == alices
        rpcs(srv, alices, as_("admin"))["CancelOperation"]()
        assert get(srv, "alice", alices).error.code == grpc.StatusCode.CANCELLED.value[0]
        hidden = rpc_error(rpcs(srv, alices, as_("bob"))["GetOperation"])
        assert hidden.code() == grpc.StatusCode.NOT_FOUND


@on_both_servers
def test_a_list_filtered_by_authorize_may_return_short_pages_with_a_token(aio: bool) -> None:
    """An auditor allowed only alice's ops gets short pages that still lead to all of them."""

    def auditor(principal: str, owner: str | None) -> bool:
        return owner == "alice" or principal == owner

    with owned(aio, authorize=auditor) as srv:
        alices = [create(srv, "alice", "dut")]
        create(srv, "bob", "dut")
        create(srv, "bob", "dut")
        alices.append(create(srv, "alice", "dut"))  # newest first: alice, bob, bob, alice
        first = listed(srv, "auditor", page_size=2)
        assert [op.name for op in first.operations] == [alices[1]]
        assert first.next_page_token
        assert names(srv, "auditor") == set(alices)


# --- request ids ----------------------------------------------------------------------------------


@on_every_store
@on_both_servers
def test_request_ids_are_scoped_per_principal(aio: bool, kind: str, tmp_path: Path) -> None:
    """One request id from alice and from bob makes two ops; each repeat finds its own."""
    with owned(aio, kind=kind, tmp_path=tmp_path) as srv:
        alices = create(srv, "alice", "dut", request_id="r-1")
        bobs = create(srv, "bob", "dut", request_id="r-1")
        assert alices != bobs
        assert create(srv, "alice", "dut", request_id="r-1") == alices
        assert create(srv, "bob", "dut", request_id="r-1") == bobs
        assert get(srv, "bob", bobs).name == bobs


@on_both_servers
def test_already_exists_never_names_another_principals_operation(aio: bool) -> None:
    """Bob reusing an id with another request is refused naming bob's op, never alice's."""
    with owned(aio) as srv:
        alices = create(srv, "alice", "dut", request_id="r-1")
        bobs = create(srv, "bob", "dut", request_id="r-1")
        error = rpc_error(lambda: create(srv, "bob", "other dut", request_id="r-1"))
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        assert bobs in error.details() and alices not in error.details()


# --- identify -------------------------------------------------------------------------------------


@on_both_servers
def test_a_refused_caller_gets_unauthenticated_on_every_rpc(aio: bool) -> None:
    """No principal header: all six RPCs answer UNAUTHENTICATED with identify's message."""
    with owned(aio) as srv:
        mine = create(srv, "alice")
        for rpc, call in rpcs(srv, mine, ()).items():
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, rpc
            assert error.details() == f"send the {HEADER} header", rpc
        assert names(srv, "alice") == {mine}  # nothing created, nothing changed
        assert not get(srv, "alice", mine).done


@on_both_servers
@pytest.mark.parametrize("who", ["crash", "empty"])
def test_a_failing_identify_is_internal_on_every_rpc_and_leaks_nothing(
    aio: bool, who: str, caplog: pytest.LogCaptureFixture
) -> None:
    """identify raising (or returning "") is INTERNAL, generic, with the detail in the log."""
    with owned(aio) as srv:
        mine = create(srv, "alice")
        for rpc, call in rpcs(srv, mine, as_(who)).items():
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.INTERNAL, rpc
            assert (
                error.details() == f"internal error in {_what(rpc)}; details are in the server log"
            )
        assert names(srv, "alice") == {mine}
    detail = SECRET if who == "crash" else "got an empty str"
    assert detail in caplog.text


def _what(rpc: str) -> str:
    return "ProvisionDut (creating an operation)" if rpc == "ProvisionDut" else rpc


@on_both_servers
def test_identify_is_called_once_per_rpc_before_the_request_is_read(aio: bool) -> None:
    """Each RPC calls identify once, and a refused caller learns nothing about its request."""
    calls: list[str] = []

    def counting(context: Any) -> str:
        calls.append("identify")
        return identify(context)

    with owned(aio, identify=counting) as srv:
        for rpc, call in rpcs(srv, "not a name", as_("alice")).items():
            calls.clear()
            with contextlib.suppress(grpc.RpcError):
                call()
            assert calls == ["identify"], rpc
        for rpc, call in rpcs(srv, "not a name", ()).items():
            assert rpc_error(call).code() == grpc.StatusCode.UNAUTHENTICATED, rpc


@on_both_servers
def test_without_identify_one_trusted_caller_sees_everything(aio: bool) -> None:
    """No identify hook: any client gets, lists, cancels and deletes any operation."""
    with owned(aio, identified=False) as srv:
        alices = create(srv, "alice")
        assert get(srv, "bob", alices).name == alices
        assert names(srv, "bob") == {alices}
        rpcs(srv, alices, as_("bob"))["CancelOperation"]()
        rpcs(srv, alices, ())["DeleteOperation"]()
        assert names(srv, "alice") == set()


@on_both_servers
def test_the_operations_service_alone_identifies_callers_too(aio: bool) -> None:
    """Served alone, Operations still asks identify; an op made without a principal is hidden."""
    with serve(aio=aio, identify=identify, authorize=admin_or_owner) as srv:
        name = srv.manager.new_operation().name
        assert rpc_error(rpcs(srv, name, ())["GetOperation"]).code() == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert rpc_error(rpcs(srv, name, as_("alice"))["GetOperation"]).code() == (
            grpc.StatusCode.NOT_FOUND
        )
        assert get(srv, "admin", name).name == name


# --- registration and the decision itself ---------------------------------------------------------


def test_one_server_has_one_identify_authorize_pair() -> None:
    """A second servicer with another identify on the same server is a ValueError."""
    server = grpc.server(ThreadPoolExecutor(2))
    manager = lrofw.Manager()
    try:
        lrofw.add_servicer_to_server(
            common(lambda r, op: r), server, manager=manager, identify=identify
        )
        lrofw.add_servicer_to_server(
            common(lambda r, op: r), server, manager=manager, identify=identify
        )  # the same pair: fine
        with pytest.raises(ValueError, match="identify/authorize"):
            lrofw.add_servicer_to_server(common(lambda r, op: r), server, manager=manager)
        with pytest.raises(ValueError, match="identify/authorize"):
            lrofw.add_servicer_to_server(
                common(lambda r, op: r), server, manager=manager, identify=lambda c: "x"
            )
    finally:
        manager.close()


def test_hooks_are_checked_at_registration() -> None:
    """authorize without identify, an async identify, or a non-callable are refused at once."""
    server = grpc.server(ThreadPoolExecutor(2))
    manager = lrofw.Manager()

    async def async_identify(context: Any) -> str:
        return "x"

    try:
        servicer = common(lambda r, op: r)
        with pytest.raises(ValueError, match="authorize needs identify"):
            lrofw.add_servicer_to_server(
                servicer, server, manager=manager, authorize=admin_or_owner
            )
        with pytest.raises(TypeError, match="plain function"):
            lrofw.add_servicer_to_server(servicer, server, manager=manager, identify=async_identify)
        with pytest.raises(TypeError, match="callable"):
            lrofw.add_servicer_to_server(servicer, server, manager=manager, identify="alice")
    finally:
        manager.close()


def test_may_see_is_owner_only_by_default_and_everything_without_a_caller() -> None:
    """The one decision: no caller sees all; a caller its own; authorize widens it."""
    assert may_see(None, "alice") and may_see(None, None)
    assert may_see(lrofw.Caller("alice"), "alice")
    assert not may_see(lrofw.Caller("alice"), "bob")
    assert not may_see(lrofw.Caller("alice"), None)
    admin = lrofw.Caller("admin", authorize=admin_or_owner)
    assert may_see(admin, "bob") and may_see(admin, None)
    assert not may_see(lrofw.Caller("bob", authorize=admin_or_owner), "alice")


def test_the_manager_applies_a_caller_directly() -> None:
    """Code driving a Manager by hand passes a Caller to get/list/cancel/delete/wait."""
    manager = lrofw.Manager()
    try:
        runner = lrofw.manager.MethodRunner("/s/M", lambda r, op: r, tls_pb2.ProvisionDutRequest)
        name = manager.launch(runner, Request(name="x"), principal="alice").name
        alice, bob = lrofw.Caller("alice"), lrofw.Caller("bob")
        assert manager.wait(name, LONG, caller=alice).done
        for act in (manager.get, manager.cancel, manager.delete, manager.wait):
            with pytest.raises(lrofw.errors.NotFound) as info:
                act(name, caller=bob)
            assert info.value.message == f"operation {name} not found"
        assert [op.name for op in manager.list(caller=alice)[0]] == [name]
        assert manager.list(caller=bob)[0] == []
        manager.delete(name, caller=alice)
    finally:
        manager.close()
