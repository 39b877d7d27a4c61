"""Tests for the create RPC's own errors (AIP-151: they create no operation), Manager.close, and
that malformed requests never break the server; each on a ``grpc.server`` and a ``grpc.aio``
server."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import grpc
import pytest
import tls_pb2
import tls_pb2_grpc
from factories import (
    LONG,
    METHOD,
    RESPONSE,
    SlowFinishes,
    blocked,
    cancel,
    common,
    create,
    eventually,
    finished,
    get,
    in_thread,
    listed_names,
    on_both_servers,
    ops_stub,
    raw_served,
    returns,
    rpc_error,
    served,
    wait_request,
    waiting,
)
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2
from google.protobuf.message import Message

import lrofw
from lrofw import _rpc
from lrofw.testing import Served, serve

# --- validation -----------------------------------------------------------------------------------


def check_dut(request: tls_pb2.ProvisionDutRequest) -> None:
    """A validate hook: an empty name is a ValueError; "locked" and "secret" fail otherwise."""
    if not request.name:
        raise ValueError("name must not be empty")
    if request.name == "blank-message":
        raise ValueError()
    if request.name == "locked":
        raise lrofw.OperationError(grpc.StatusCode.FAILED_PRECONDITION, "DUT locked is in use")
    if request.name == "taken":
        raise lrofw.errors.AlreadyExists("DUT taken is being provisioned")
    if request.name == "missing":
        raise lrofw.errors.NotFound("Unknown DUT missing")
    if request.name == "secret":
        raise KeyError("secret")


@pytest.mark.parametrize(
    ("name", "code", "message"),
    [
        ("", grpc.StatusCode.INVALID_ARGUMENT, "name must not be empty"),
        ("blank-message", grpc.StatusCode.INVALID_ARGUMENT, "invalid request"),
        ("locked", grpc.StatusCode.FAILED_PRECONDITION, "DUT locked is in use"),
        ("taken", grpc.StatusCode.ALREADY_EXISTS, "DUT taken is being provisioned"),
        ("missing", grpc.StatusCode.NOT_FOUND, "Unknown DUT missing"),
    ],
)
@on_both_servers
def test_failed_validation_is_an_rpc_error_and_creates_no_op(
    name: str, code: grpc.StatusCode, message: str, aio: bool
) -> None:
    """A request failing validate= is refused with its code and message; no op, no handler run."""
    ran: list[str] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        ran.append(request.name)
        return RESPONSE

    with served(handler, validate=check_dut, aio=aio) as srv:
        err = rpc_error(lambda: create(srv, name))
        ops = listed_names(srv)
        good = create(srv, "ok")  # a valid request still works
        finished(srv, good.name)
    assert err.code() is code
    assert err.details() == message
    assert ops == []
    assert ran == ["ok"]


@on_both_servers
def test_validate_raising_anything_else_is_internal_and_generic(aio: bool) -> None:
    """A validate hook that crashes answers INTERNAL without its text, and creates no op."""
    with served(returns, validate=check_dut, aio=aio) as srv:
        err = rpc_error(lambda: create(srv, "secret"))
        ops = listed_names(srv)
    assert err.code() is grpc.StatusCode.INTERNAL
    assert "secret" not in (err.details() or "")
    assert ops == []


# --- a full queue ---------------------------------------------------------------------------------


@on_both_servers
def test_full_queue_is_resource_exhausted_and_creates_no_op(aio: bool) -> None:
    """A full queue answers RESOURCE_EXHAUSTED and makes no op; creates work again once drained."""
    gate = threading.Event()
    ran: list[str] = []
    manager = lrofw.Manager(max_workers=1, max_queued=1)
    with served(blocked(gate, ran=ran), manager=manager, gates=(gate,), aio=aio) as srv:
        first, second = create(srv, "first"), create(srv, "second")
        err = rpc_error(lambda: create(srv, "third"))
        ops = listed_names(srv)
        gate.set()
        finished(srv, first.name)
        finished(srv, second.name)
        fourth = create(srv, "fourth")
        finished(srv, fourth.name)
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sorted(ops) == sorted([first.name, second.name])
    assert ran == ["first", "second", "fourth"]


@on_both_servers
def test_cancelling_a_queued_op_frees_its_slot_at_once(aio: bool) -> None:
    """A queued op that is cancelled gives its queue slot back before any worker frees up."""
    gate = threading.Event()
    ran: list[str] = []
    manager = lrofw.Manager(max_workers=1, max_queued=1)
    with served(blocked(gate, ran=ran), manager=manager, gates=(gate,), aio=aio) as srv:
        running = create(srv, "running").name
        queued = create(srv, "queued").name
        full = rpc_error(lambda: create(srv, "refused"))
        cancel(srv, queued)
        replacement = create(srv, "replacement").name  # the worker is still busy
        gate.set()
        finished(srv, running)
        finished(srv, replacement)
        cancelled = get(srv, queued)
    assert full.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert cancelled.error.code == 1
    assert ran == ["running", "replacement"]


# --- a closing or closed manager ------------------------------------------------------------------


@on_both_servers
def test_create_on_a_closed_manager_is_unavailable(aio: bool) -> None:
    """After Manager.close() the create RPC answers UNAVAILABLE and makes no op."""
    with served(returns, aio=aio) as srv:
        srv.manager.close()
        err = rpc_error(lambda: create(srv))
        ops = listed_names(srv)
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert ops == []


@on_both_servers
def test_create_on_a_closing_manager_is_unavailable(aio: bool) -> None:
    """While close() waits for a running handler, the create RPC answers UNAVAILABLE."""
    gate = threading.Event()
    with served(blocked(gate), gates=(gate,), aio=aio) as srv:
        running = create(srv).name
        closer, raised = in_thread(lambda: srv.manager.close(grace=LONG))
        eventually(lambda: srv.manager.closed, "close() to start")
        err = rpc_error(lambda: create(srv))
        ops = listed_names(srv)
        assert closer.is_alive()  # still closing: the handler holds it
        gate.set()
        closer.join(LONG)
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert ops == [running]
    assert not closer.is_alive() and raised == []


# --- a servicer lrofw does not know ---------------------------------------------------------------


@pytest.mark.parametrize("registered_elsewhere", [False, True])
@on_both_servers
def test_unregistered_servicer_is_failed_precondition(
    registered_elsewhere: bool, aio: bool
) -> None:
    """A servicer not registered through lrofw answers FAILED_PRECONDITION naming the fix."""
    ran: list[str] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        ran.append(request.name)
        return RESPONSE

    stray = common(handler)
    with contextlib.ExitStack() as stack:
        if registered_elsewhere:  # another instance of the same class is registered properly
            stack.enter_context(serve(type(stray)(), manager=lrofw.Manager(), aio=aio))
        manager = lrofw.Manager()
        kind = lrofw.AsyncOperationsServicer if aio else lrofw.OperationsServicer
        operations = kind(manager)
        srv = stack.enter_context(
            raw_served(stray, operations=operations, manager=manager, aio=aio)
        )
        err = rpc_error(lambda: create(srv))
        ops = listed_names(srv)
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "add_servicer_to_server" in (err.details() or "")
    assert ops == []
    assert ran == []


# --- Manager.close --------------------------------------------------------------------------------


@on_both_servers
def test_close_twice_is_a_no_op(aio: bool) -> None:
    """A second close() returns at once and changes nothing."""
    with served(returns, aio=aio) as srv:
        name = create(srv).name
        before = finished(srv, name)
        srv.manager.close()
        start = time.monotonic()
        srv.manager.close()
        elapsed = time.monotonic() - start
        after = get(srv, name)
    assert srv.manager.closed
    assert elapsed < 1.0
    assert after == before


@on_both_servers
def test_close_concurrently_from_two_threads(aio: bool) -> None:
    """Two threads closing at once both return without error, after the running handler ended."""
    gate = threading.Event()
    with served(blocked(gate), gates=(gate,), aio=aio) as srv:
        name = create(srv).name
        closers = [in_thread(lambda: srv.manager.close(grace=LONG)) for _ in range(2)]
        eventually(lambda: srv.manager.closed, "close() to start")
        gate.set()
        for thread, _ in closers:
            thread.join(LONG)
        op = get(srv, name)
    assert [thread.is_alive() for thread, _ in closers] == [False, False]
    assert [raised for _, raised in closers] == [[], []]
    assert op.done and op.HasField("response")


@on_both_servers
def test_close_lets_a_running_handler_finish_within_grace(aio: bool) -> None:
    """close(grace) waits for a running handler; it finishes normally, not ABORTED or signalled."""
    gate = threading.Event()
    seen: list[bool] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        gate.wait(LONG)
        seen.append(op.cancelled)
        return RESPONSE

    with served(handler, gates=(gate,), aio=aio) as srv:
        name = create(srv).name
        closer, raised = in_thread(lambda: srv.manager.close(grace=LONG))
        eventually(lambda: srv.manager.closed, "close() to start")
        assert closer.is_alive()
        gate.set()
        closer.join(LONG)
        op = get(srv, name)
    assert not closer.is_alive() and raised == []
    assert seen == [False]
    assert op.done and op.HasField("response") and not op.HasField("error")


@on_both_servers
def test_close_aborts_handlers_still_running_after_grace(aio: bool) -> None:
    """close() ends running and queued ops ABORTED after grace and signals the running handler."""
    started, stopped = threading.Event(), threading.Event()
    seen: list[str] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        started.set()
        seen.append(f"{request.name} woke={op.sleep(LONG)} cancelled={op.cancelled}")
        stopped.set()
        return RESPONSE

    with served(handler, manager=lrofw.Manager(max_workers=1), aio=aio) as srv:
        running = create(srv, "running").name
        queued = create(srv, "queued").name
        assert started.wait(LONG)
        start = time.monotonic()
        srv.manager.close(grace=0.2)
        elapsed = time.monotonic() - start
        assert stopped.wait(LONG)
        ops = [get(srv, running), get(srv, queued)]
    assert 0.18 <= elapsed < 5
    assert [op.error.code for op in ops] == [grpc.StatusCode.ABORTED.value[0]] * 2
    assert all(op.done and not op.HasField("response") for op in ops)
    assert seen == ["running woke=True cancelled=True"]


@pytest.mark.parametrize(
    ("aio", "asynchronous"),
    [(False, False), (True, False), (True, True)],
    ids=["sync", "aio", "aio-async-handler"],
)
def test_close_never_starts_a_queued_handler_it_aborted(aio: bool, asynchronous: bool) -> None:
    """A queued op that close() aborts never runs its handler (a thread's or a task's), even while
    the store is slow to record the abort (the running handler's slot frees up meanwhile)."""
    store = SlowFinishes()
    started, queued_started = threading.Event(), threading.Event()
    ran: list[str] = []

    async def sleep_async(op: lrofw.AsyncOperationContext) -> object:
        await op.sleep(LONG)
        return RESPONSE

    def handler(request: Any, op: Any) -> object:
        ran.append(request.name)
        started.set()
        if request.name == "queued":
            queued_started.set()
        if asynchronous:
            return sleep_async(op)  # awaited by the async def servicer method
        op.sleep(LONG)
        return RESPONSE

    manager = lrofw.Manager(store=store, max_workers=1)
    with served(handler, manager=manager, aio=aio, asynchronous=asynchronous) as srv:
        running = create(srv, "running").name
        queued = create(srv, "queued").name
        assert started.wait(LONG)
        store.hold(queued, until=queued_started, at_most=1.0)
        srv.manager.close(grace=0.1)
        ops = [get(srv, running), get(srv, queued)]
    assert [op.error.code for op in ops] == [grpc.StatusCode.ABORTED.value[0]] * 2
    assert ran == ["running"]


@pytest.mark.parametrize("kind", ["running", "manual"])
@on_both_servers
def test_close_answers_waits_at_once_with_the_current_state(kind: str, aio: bool) -> None:
    """Once close() refuses creates, a held WaitOperation and a new one answer at once, not done,
    while the running handler still has its grace; the op then finishes normally."""
    gate = threading.Event()
    with served(blocked(gate), gates=(gate,), aio=aio) as srv:
        op = create(srv) if kind == "running" else srv.manager.new_operation()
        name = op.name
        held = ops_stub(srv).WaitOperation.future(wait_request(name), timeout=LONG + 5)
        waiting(srv, name)
        closer, raised = in_thread(lambda: srv.manager.close(grace=LONG))
        answered = held.result(timeout=LONG)
        again = ops_stub(srv).WaitOperation(wait_request(name), timeout=LONG + 5)
        still_closing = closer.is_alive()  # the handler holds it until the gate opens
        gate.set()
        if kind == "manual":
            srv.manager.set_result(name, RESPONSE)
        closer.join(LONG)
        final = get(srv, name)
    assert (answered.name, answered.done, again.done) == (name, False, False)
    assert still_closing or kind == "manual"
    assert not closer.is_alive() and raised == []
    if kind == "running":
        assert final.done and final.HasField("response")


# --- bad input never breaks the server ------------------------------------------------------------

GET, LIST, WAIT, CANCEL, DELETE, CREATE = "get", "list", "wait", "cancel", "delete", "create"
lro = operations_pb2


def bad_requests(live: str) -> list[tuple[str, Message]]:
    """Malformed or hostile requests for every RPC; ``live`` names an op that is not done."""
    return [
        (GET, lro.GetOperationRequest()),
        (GET, lro.GetOperationRequest(name="x" * 100_000)),
        (GET, lro.GetOperationRequest(name="operations/")),
        (GET, lro.GetOperationRequest(name="operations/\x00")),
        (GET, lro.GetOperationRequest(name="operations/../../etc/passwd")),
        (GET, lro.GetOperationRequest(name="opérations/x")),
        (GET, lro.GetOperationRequest(name="operations/" + "é" * 1013)),
        (GET, lro.GetOperationRequest(name="operations/" + "é" * 1014)),
        (GET, lro.GetOperationRequest(name=" operations/x")),
        (GET, lro.GetOperationRequest(name="\n")),
        (GET, lro.GetOperationRequest(name="operations/%s%n")),
        (LIST, lro.ListOperationsRequest(name="bogus")),
        (LIST, lro.ListOperationsRequest(name="x" * 100_000)),
        (LIST, lro.ListOperationsRequest(page_size=-1)),
        (LIST, lro.ListOperationsRequest(page_size=-(2**31))),
        (LIST, lro.ListOperationsRequest(page_size=2**31 - 1)),
        (LIST, lro.ListOperationsRequest(page_token="x")),
        (LIST, lro.ListOperationsRequest(page_token="é" * 44)),
        (LIST, lro.ListOperationsRequest(page_token="A" * 44)),
        (LIST, lro.ListOperationsRequest(page_token="/" * 44)),
        (LIST, lro.ListOperationsRequest(page_token="x" * 100_000)),
        (LIST, lro.ListOperationsRequest(filter="(((")),
        (LIST, lro.ListOperationsRequest(filter=")")),
        (LIST, lro.ListOperationsRequest(filter="x" * 100_000)),
        (LIST, lro.ListOperationsRequest(filter="(" * 10_000)),
        (LIST, lro.ListOperationsRequest(filter="NOT " * 1000 + "done = true")),
        (LIST, lro.ListOperationsRequest(filter="-" * 1000 + "done = true")),
        (LIST, lro.ListOperationsRequest(filter="\x00")),
        (LIST, lro.ListOperationsRequest(filter='method = "\\')),
        (LIST, lro.ListOperationsRequest(filter="method = '\\q'")),
        (LIST, lro.ListOperationsRequest(filter="error.code = 2147483648")),
        (LIST, lro.ListOperationsRequest(filter="error.code = -2147483649")),
        (LIST, lro.ListOperationsRequest(filter="error.code = 1e3")),
        (LIST, lro.ListOperationsRequest(filter="error.code = 0x10")),
        (LIST, lro.ListOperationsRequest(filter="error.code < true")),
        (LIST, lro.ListOperationsRequest(filter="done < true")),
        (LIST, lro.ListOperationsRequest(filter="name = *")),
        (LIST, lro.ListOperationsRequest(filter="done = true", page_token="A" * 44)),
        (LIST, lro.ListOperationsRequest(filter="日本 = 語")),
        (LIST, lro.ListOperationsRequest(filter="done = ٣")),
        (LIST, lro.ListOperationsRequest(filter="error.code = ٣")),
        (WAIT, lro.WaitOperationRequest()),
        (WAIT, lro.WaitOperationRequest(name="x" * 100_000)),
        (WAIT, lro.WaitOperationRequest(name="operations/nope")),
        (WAIT, wait_request("operations/nope", 0)),
        (WAIT, lro.WaitOperationRequest(name="nope", timeout=duration_pb2.Duration(seconds=-1))),
        (WAIT, lro.WaitOperationRequest(timeout=duration_pb2.Duration(nanos=-1))),
        (WAIT, lro.WaitOperationRequest(timeout=duration_pb2.Duration(seconds=-(2**62)))),
        (WAIT, lro.WaitOperationRequest(timeout=duration_pb2.Duration(seconds=2**62))),
        (WAIT, lro.WaitOperationRequest(timeout=duration_pb2.Duration(seconds=1, nanos=-(10**9)))),
        (
            WAIT,
            lro.WaitOperationRequest(timeout=duration_pb2.Duration(seconds=-1, nanos=10**9 - 1)),
        ),
        (WAIT, lro.WaitOperationRequest(timeout=duration_pb2.Duration(nanos=2**31 - 1))),
        (CANCEL, lro.CancelOperationRequest()),
        (CANCEL, lro.CancelOperationRequest(name="x" * 100_000)),
        (CANCEL, lro.CancelOperationRequest(name="operations/")),
        (CANCEL, lro.CancelOperationRequest(name="operations/nope")),
        (CANCEL, lro.CancelOperationRequest(name="operations/\x00")),
        (DELETE, lro.DeleteOperationRequest()),
        (DELETE, lro.DeleteOperationRequest(name="x" * 100_000)),
        (DELETE, lro.DeleteOperationRequest(name="operations/")),
        (DELETE, lro.DeleteOperationRequest(name="operations/nope")),
        (DELETE, lro.DeleteOperationRequest(name="operations/\x00")),
        (CREATE, tls_pb2.ProvisionDutRequest()),
        (CREATE, tls_pb2.ProvisionDutRequest(name="x" * 1_000_000)),
        (CREATE, tls_pb2.ProvisionDutRequest(name="\x00", image_path="\x00")),
        (CREATE, tls_pb2.ProvisionDutRequest(name="é" * 1000, request_id="é" * 1000)),
        (CREATE, tls_pb2.ProvisionDutRequest(name="secret")),
        (WAIT, lro.WaitOperationRequest(name=live)),
        (WAIT, lro.WaitOperationRequest(name=live, timeout=duration_pb2.Duration(seconds=2**62))),
        (WAIT, lro.WaitOperationRequest(name=live, timeout=duration_pb2.Duration(nanos=-1))),
        (WAIT, lro.WaitOperationRequest(name=live, timeout=duration_pb2.Duration(nanos=2**31 - 1))),
        (
            WAIT,
            lro.WaitOperationRequest(name=live, timeout=duration_pb2.Duration(seconds=-(2**62))),
        ),
        (WAIT, lro.WaitOperationRequest(name=live + "x" * 2000)),
        (CANCEL, lro.CancelOperationRequest(name=live + "/")),
        (DELETE, lro.DeleteOperationRequest(name=live.upper())),
        (GET, lro.GetOperationRequest(name=live + "\x00")),
    ]


def call(srv: Served, rpc: str, request: Message) -> object:
    """Sends ``request`` with the named RPC."""
    stub = ops_stub(srv)
    method = {
        GET: stub.GetOperation,
        LIST: stub.ListOperations,
        WAIT: stub.WaitOperation,
        CANCEL: stub.CancelOperation,
        DELETE: stub.DeleteOperation,
        CREATE: tls_pb2_grpc.CommonStub(srv.channel).ProvisionDut,
    }[rpc]
    return method(request, timeout=LONG)


@on_both_servers
def test_bad_input_never_breaks_the_server(aio: bool) -> None:
    """No malformed request to any RPC answers INTERNAL or UNKNOWN; a normal Get works after."""
    answers: dict[str, grpc.StatusCode] = {}

    def validate(request: tls_pb2.ProvisionDutRequest) -> None:
        if not request.name:
            raise ValueError("name must not be empty")

    with served(returns, manager=lrofw.Manager(max_wait=0.2), validate=validate, aio=aio) as srv:
        good = create(srv).name
        done = finished(srv, good)
        live = srv.manager.new_operation().name
        for i, (rpc, request) in enumerate(bad_requests(live)):
            key = f"{i}:{rpc}:{str(request)[:60]!r}"
            try:
                call(srv, rpc, request)
            except grpc.RpcError as exc:
                answers[key] = exc.code()
            else:
                answers[key] = grpc.StatusCode.OK
        after = get(srv, good)
        still_live = get(srv, live)
    broken = {
        k: c for k, c in answers.items() if c in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    }
    assert broken == {}
    assert after == done
    assert not still_live.done
    assert len(answers) == len(bad_requests(live))


# --- undecodable request bytes --------------------------------------------------------------------

#: Bytes that are not a ProvisionDutRequest (nor any message): a bad tag, a field cut short, a
#: string field holding invalid UTF-8, a group that never ends, groups nested past the parser's
#: depth limit (100).
UNDECODABLE = [b"\xff", b"\x0a\x05ab", b"\x0a\x01\xff", b"\x0b", b"\x1b" * 101 + b"\x1c" * 101]


@pytest.mark.parametrize(
    "data", UNDECODABLE, ids=["bad-tag", "truncated", "utf8", "group", "too-deep"]
)
@pytest.mark.parametrize(
    ("aio", "asynchronous"),
    [(False, False), (True, False), (True, True)],
    ids=["sync", "aio", "aio-async-def"],
)
def test_undecodable_create_request_is_invalid_argument(
    data: bytes, aio: bool, asynchronous: bool
) -> None:
    """Bytes that do not parse as the request answer INVALID_ARGUMENT, name the message type,
    leak no parser text, create no op and run no handler."""
    ran: list[str] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        ran.append(request.name)
        return RESPONSE

    with served(handler, aio=aio, asynchronous=asynchronous) as srv:
        raw = srv.channel.unary_unary(METHOD)
        err = rpc_error(lambda: raw(data, timeout=LONG))
        after = finished(srv, create(srv, "after").name)
        names = listed_names(srv)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        "the request is not a valid chromiumos.config.api.test.tls.ProvisionDutRequest: "
        "it could not be parsed"
    )
    assert after.HasField("response")
    assert names == [after.name]
    assert ran == ["after"]


@on_both_servers
def test_undecodable_bytes_on_the_registered_create_method(aio: bool) -> None:
    """A client calling the create RPC as a registered method (as generated stubs do) gets the
    same answer as one calling it by name."""
    with served(returns, aio=aio) as srv:
        raw = srv.channel.unary_unary(METHOD, _registered_method=True)
        err = rpc_error(lambda: raw(b"\xff", timeout=LONG))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT


@on_both_servers
def test_undecodable_bytes_leave_other_methods_to_grpc(aio: bool) -> None:
    """Only @long_running methods get lrofw's deserializer: a plain method of the same servicer
    keeps grpc's own (its handler never sees lrofw's placeholder)."""
    seen: list[object] = []

    class Mixed(tls_pb2_grpc.CommonServicer):
        def ProvisionDut(self, request: Any, context: Any) -> operations_pb2.Operation:
            seen.append(request)
            return operations_pb2.Operation(name="plain")

    with serve(Mixed(), aio=aio) as srv:
        raw = srv.channel.unary_unary(METHOD)
        err = rpc_error(lambda: raw(b"\xff", timeout=LONG))
        ok = tls_pb2_grpc.CommonStub(srv.channel).ProvisionDut(
            tls_pb2.ProvisionDutRequest(name="x"), timeout=LONG
        )
    assert err.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    assert ok.name == "plain"
    assert seen == [tls_pb2.ProvisionDutRequest(name="x")]


def test_lenient_methods_wrap_only_the_named_methods() -> None:
    """The generic handler lrofw registers parses leniently only the methods it is given."""
    original = grpc.unary_unary_rpc_method_handler(
        lambda request, context: request,
        request_deserializer=tls_pb2.ProvisionDutRequest.FromString,
    )
    inner = grpc.method_handlers_generic_handler("svc.S", {"Long": original, "Plain": original})
    lenient = _rpc.LenientMethods(inner, {"Long"})

    class Details(grpc.HandlerCallDetails):
        def __init__(self, method: str) -> None:
            self.method = method
            self.invocation_metadata = ()

    details = Details

    long_handler = lenient.service(details("/svc.S/Long"))
    assert long_handler is not None and long_handler.request_deserializer is not None
    placeholder = long_handler.request_deserializer(b"\xff")
    assert lenient.service(details("/svc.S/Plain")) is original
    assert lenient.service(details("/svc.S/Missing")) is None
    assert lenient.service(details("/svc.S/Long")) is long_handler  # built once
    assert long_handler.request_deserializer(b"\x0a\x01x") == tls_pb2.ProvisionDutRequest(name="x")
    with pytest.raises(lrofw.errors.InvalidArgument) as refused:
        _rpc.decoded(placeholder)
    assert refused.value.message == (
        "the request is not a valid chromiumos.config.api.test.tls.ProvisionDutRequest: "
        "it could not be parsed"
    )
