"""Tests for ``async def`` handlers on a grpc.aio server: each outcome row of DESIGN section 4,
cancellation of the handler's task, timeouts, ``await op.sleep``, bounded concurrency, contextvars,
close and aclose, and WaitOperation without threads."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import pathlib
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import tls_pb2_grpc
from factories import (
    LONG,
    METHOD,
    RESPONSE,
    AioGate,
    AsyncHandler,
    Metadata,
    Request,
    Response,
    cancel,
    common,
    create,
    delete,
    eventually,
    finished,
    get,
    in_thread,
    listed_names,
    raw_served,
    rpc_error,
    served,
    wait_request,
)
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import error_details_pb2

import lrofw
from lrofw import decorator
from lrofw.stores import SQLiteStore
from lrofw.testing import Served, serve

RESPONSE_TYPE = "chromiumos.config.api.test.tls.ProvisionDutResponse"
CANCELLED = grpc.StatusCode.CANCELLED.value[0]

#: Set by a server interceptor for the create call; read by handlers.
CALLER_TAG: contextvars.ContextVar[str] = contextvars.ContextVar("caller_tag", default="unset")

# --- factories ------------------------------------------------------------------------------------


def run_async(handler: AsyncHandler, **options: Any) -> operations_pb2.Operation:
    """Runs the ``async def`` handler as one operation on a fresh aio server; the finished op."""
    with served(handler, aio=True, asynchronous=True, **options) as srv:
        return finished(srv, create(srv).name)


def error_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The log records at ERROR or above."""
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def settle(srv: Served) -> None:
    """Lets the server's loop run every callback and task step that is ready now."""

    async def turns() -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    srv.run(turns())


def stoppable(
    gate: AioGate, started: threading.Event, seen: list[str], stopped: threading.Event
) -> AsyncHandler:
    """An async handler that awaits ``gate``; when its task is cancelled it notes what it saw
    (``CancelledError``, ``op.cancelled``, what ``op.report`` answered), then re-raises."""

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
        started.set()
        try:
            await gate.wait()
        except asyncio.CancelledError:
            reported = op.report(Metadata(stage="after"))
            seen.append(f"CancelledError cancelled={op.cancelled} reported={reported}")
            stopped.set()
            raise
        seen.append("gate opened")
        return RESPONSE

    return handler


# --- the outcome rows, with async def handlers ----------------------------------------------------


def test_returning_the_response_type_packs_it() -> None:
    """An async handler returning its response type (after an await) finishes with it."""

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
        await asyncio.sleep(0)
        return Response(installed_image=f"{request.name} on {type(op).__name__}")

    op = run_async(handler)
    out = Response()
    assert op.done and not op.HasField("error")
    assert op.response.type_url.endswith("/" + RESPONSE_TYPE)
    assert op.response.Unpack(out)
    assert out.installed_image == "dut on AsyncOperationContext"


@pytest.mark.parametrize(
    ("value", "got"),
    [(None, "None"), (Metadata(stage="x"), "ProvisionDutMetadata"), ("done", "str")],
    ids=["none", "metadata-type", "str"],
)
def test_returning_something_else_is_internal(
    value: object, got: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An async handler returning another type is INTERNAL "handler returned X, expected Y"."""
    caplog.set_level(logging.INFO, logger="lrofw")

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
        await asyncio.sleep(0)
        return value

    op = run_async(handler)
    message = f"handler returned {got}, expected {RESPONSE_TYPE}"
    assert op.done and not op.HasField("response")
    assert op.error.code == grpc.StatusCode.INTERNAL.value[0]
    assert op.error.message == message
    assert any(message in r.getMessage() and op.name in r.getMessage() for r in caplog.records)


def test_raising_operation_error_keeps_code_message_and_details() -> None:
    """An OperationError raised after an await keeps its code, message and details."""
    info = error_details_pb2.ErrorInfo(reason="DUT_OFFLINE", domain="lab", metadata={"dut": "x"})

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
        await asyncio.sleep(0)
        raise lrofw.OperationError(grpc.StatusCode.UNAVAILABLE, "DUT offline", [info])

    op = run_async(handler)
    got = error_details_pb2.ErrorInfo()
    assert op.done and not op.HasField("response")
    assert op.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert op.error.message == "DUT offline"
    assert len(op.error.details) == 1
    assert op.error.details[0].Unpack(got) and got == info


class Downstream(tls_pb2_grpc.CommonServicer):
    """A plain (not long-running) aio Common servicer whose ProvisionDut aborts with a code."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details

    async def ProvisionDut(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(self.code, self.details)


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE],
)
def test_raising_downstream_aio_rpc_error_keeps_its_code_and_details(
    code: grpc.StatusCode,
) -> None:
    """A grpc.RpcError from a real downstream grpc.aio call becomes the op's code and details."""
    details = f"downstream says {code.name.lower()}"
    raised: list[grpc.RpcError] = []
    with raw_served(Downstream(code, details), aio=True) as down:

        async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
            async with grpc.aio.insecure_channel(down.target) as channel:
                try:
                    return await tls_pb2_grpc.CommonStub(channel).ProvisionDut(
                        request, timeout=LONG
                    )
                except grpc.RpcError as exc:
                    raised.append(exc)
                    raise

        op = run_async(handler)
    assert [exc.code() for exc in raised] == [code]  # the downstream call really failed
    assert op.done and not op.HasField("response")
    assert op.error.code == code.value[0]
    assert op.error.message == details


@pytest.mark.parametrize(
    "exc",
    [KeyError("secret"), RuntimeError("secret password hunter2"), ZeroDivisionError("secret")],
    ids=lambda exc: type(exc).__name__,
)
def test_raising_anything_else_is_internal_and_generic(
    exc: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    """Any other exception is INTERNAL naming the op; its text and traceback go to the log."""
    caplog.set_level(logging.INFO, logger="lrofw")

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
        await asyncio.sleep(0)
        raise exc

    op = run_async(handler)
    assert op.done and not op.HasField("response")
    assert op.error.code == grpc.StatusCode.INTERNAL.value[0]
    assert op.name in op.error.message
    assert "secret" not in op.error.message
    assert type(exc).__name__ not in op.error.message
    logged = [r for r in error_records(caplog) if r.exc_info and r.exc_info[1] is exc]
    assert len(logged) == 1
    assert op.name in logged[0].getMessage()


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (lrofw.OperationCancelled("stopped by the user"), "stopped by the user"),
        (lrofw.OperationError(grpc.StatusCode.CANCELLED, "gave up"), "gave up"),
    ],
    ids=["OperationCancelled", "OperationError-CANCELLED"],
)
def test_raising_operation_cancelled_is_cancelled(
    error: lrofw.OperationError, message: str
) -> None:
    """An async handler raising OperationCancelled ends the op CANCELLED with its message."""

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
        await asyncio.sleep(0)
        raise error

    op = run_async(handler)
    assert op.done and not op.HasField("response")
    assert op.error.code == CANCELLED
    assert op.error.message == message


@pytest.mark.parametrize("then", ["re-raise", "return", "raise-OperationCancelled"])
def test_handler_that_observes_cancel_and_stops_is_cancelled(
    then: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that catches the cancel and stops leaves the op CANCELLED, whatever it does."""
    started, stopped = threading.Event(), threading.Event()
    gate = AioGate()

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
        started.set()
        try:
            await gate.wait()
        except asyncio.CancelledError:
            stopped.set()
            if then == "re-raise":
                raise
            if then == "raise-OperationCancelled":
                raise lrofw.OperationCancelled("stopping") from None
        return RESPONSE

    caplog.set_level(logging.DEBUG, logger="lrofw")
    with served(handler, aio=True, asynchronous=True, gates=(gate,)) as srv:
        name = create(srv).name
        assert started.wait(LONG)
        cancel(srv, name)
        assert stopped.wait(LONG)
        eventually(lambda: not srv.manager.registry.count(), "the handler's task to end")
        op = get(srv, name)
    assert op.done and not op.HasField("response")
    assert op.error.code == CANCELLED
    assert error_records(caplog) == []


# --- CancelOperation cancels the task -------------------------------------------------------------


def test_cancel_cancels_the_task_at_its_next_await() -> None:
    """CancelOperation ends the op CANCELLED at once; the handler sees CancelledError."""
    gate, started, stopped = AioGate(), threading.Event(), threading.Event()
    seen: list[str] = []
    with served(
        stoppable(gate, started, seen, stopped), aio=True, asynchronous=True, gates=(gate,)
    ) as srv:
        name = create(srv).name
        assert started.wait(LONG)
        assert not get(srv, name).done
        cancel(srv, name)
        at_once = get(srv, name)
        assert stopped.wait(LONG)
        eventually(lambda: not srv.manager.registry.count(), "the handler's task to end")
        later = get(srv, name)
    assert at_once.done and at_once.error.code == CANCELLED
    assert seen == ["CancelledError cancelled=True reported=False"]
    assert later == at_once
    assert not later.HasField("metadata")  # the report after the cancel was dropped


class SlowOutcomeStore(lrofw.stores.MemoryStore):
    """A memory store that stores an async handler's outcome from the event loop
    (``finish_async``, as the PostgreSQL store does) only once the test lets it."""

    blocking = True  # so the manager uses finish_async, as for a store that does I/O

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = threading.Event()
        self.proceed = threading.Event()
        self.completed = threading.Event()

    async def finish_async(self, name: str, now: float, **outcome: Any) -> Any:
        self.in_flight.set()
        await asyncio.get_running_loop().run_in_executor(None, self.proceed.wait, LONG)
        record = self.finish(name, now, **outcome)
        self.completed.set()
        return record


def test_a_stop_while_the_outcome_is_stored_does_not_cancel_the_store_call() -> None:
    """A cancel (or the watcher seeing the operation done) that comes once the handler has
    returned, while its outcome is on its way to the store, does not cancel the task: on
    PostgreSQL that would throw the statement's connection away. The first writer wins."""
    store = SlowOutcomeStore()

    async def handler(request: Request, op: lrofw.OperationContext) -> Response:
        return Response(installed_image="done")

    with served(handler, manager=lrofw.Manager(store=store), aio=True, asynchronous=True) as srv:
        try:
            name = create(srv).name
            assert store.in_flight.wait(LONG)
            cancel(srv, name)
        finally:
            store.proceed.set()
        assert store.completed.wait(LONG), "the store call was cancelled"
        assert finished(srv, name).error.code == grpc.StatusCode.CANCELLED.value[0]


def test_cancel_wakes_a_waiter_on_the_aio_server() -> None:
    """A WaitOperation holding on an async handler's op returns it CANCELLED when cancelled."""
    gate, started, stopped = AioGate(), threading.Event(), threading.Event()
    seen: list[str] = []
    with served(
        stoppable(gate, started, seen, stopped), aio=True, asynchronous=True, gates=(gate,)
    ) as srv:
        name = create(srv).name
        assert started.wait(LONG)
        stub = operations_pb2_grpc.OperationsStub(srv.channel)
        future = stub.WaitOperation.future(wait_request(name), timeout=LONG + 5)
        eventually(lambda: srv.manager.registry.is_waited(name), "a waiter")
        cancel(srv, name)
        op = future.result(timeout=LONG)
        assert stopped.wait(LONG)
    assert op.done and op.error.code == CANCELLED
    assert seen == ["CancelledError cancelled=True reported=False"]


def test_cancel_queued_async_op_never_runs_its_handler() -> None:
    """Cancelling an async op still queued for a slot makes it CANCELLED; it never runs."""
    gate = AioGate()
    ran: list[str] = []

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
        ran.append(request.name)
        await gate.wait()
        return RESPONSE

    manager = lrofw.Manager(max_workers=1)
    with served(handler, manager=manager, aio=True, asynchronous=True, gates=(gate,)) as srv:
        running = create(srv, "running").name
        queued = create(srv, "queued").name
        eventually(lambda: ran == ["running"], "the first handler to start")
        cancel(srv, queued)
        at_once = get(srv, queued)
        gate.set()
        assert finished(srv, running).HasField("response")
        settle(srv)
        later = get(srv, queued)
    assert at_once.done and at_once.error.code == CANCELLED
    assert later == at_once
    assert ran == ["running"]


def test_delete_does_not_cancel_the_task(caplog: pytest.LogCaptureFixture) -> None:
    """DeleteOperation leaves the async handler running; its later return is dropped quietly."""
    gate, started, stopped = AioGate(), threading.Event(), threading.Event()
    seen: list[str] = []
    caplog.set_level(logging.DEBUG, logger="lrofw")
    with served(
        stoppable(gate, started, seen, stopped), aio=True, asynchronous=True, gates=(gate,)
    ) as srv:
        name = create(srv).name
        assert started.wait(LONG)
        delete(srv, name)
        gate.set()
        eventually(lambda: not srv.manager.registry.count(), "the handler to return")
        err = rpc_error(lambda: get(srv, name))
        listed = listed_names(srv)
    assert seen == ["gate opened"]  # never cancelled: it ran to the end
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert listed == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# --- the method's own timeout ---------------------------------------------------------------------


def test_timeout_is_deadline_exceeded_and_cancels_the_task() -> None:
    """Past ``timeout=`` the op is DEADLINE_EXCEEDED and the handler's task is cancelled."""
    gate, started, stopped = AioGate(), threading.Event(), threading.Event()
    seen: list[str] = []
    with served(
        stoppable(gate, started, seen, stopped),
        aio=True,
        asynchronous=True,
        gates=(gate,),
        timeout=0.2,
    ) as srv:
        start = time.monotonic()
        name = create(srv).name
        op = finished(srv, name)
        elapsed = time.monotonic() - start
        assert stopped.wait(LONG)
        eventually(lambda: not srv.manager.registry.count(), "the handler's task to end")
        later = get(srv, name)
    assert op.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "0.2" in op.error.message
    assert 0.18 <= elapsed < 5
    assert seen == ["CancelledError cancelled=True reported=False"]
    assert later == op


def test_timeout_keeps_deadline_exceeded_when_the_handler_swallows_the_cancel() -> None:
    """A handler that catches the cancel and returns a response still ends DEADLINE_EXCEEDED."""
    returned = threading.Event()

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
        try:
            await asyncio.sleep(LONG)
        except asyncio.CancelledError:
            returned.set()
        return RESPONSE

    with served(handler, aio=True, asynchronous=True, timeout=0.2) as srv:
        name = create(srv).name
        op = finished(srv, name)
        assert returned.wait(LONG)
        eventually(lambda: not srv.manager.registry.count(), "the handler to return")
        later = get(srv, name)
    assert op.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert later == op and not later.HasField("response")


# --- await op.sleep -------------------------------------------------------------------------------


def test_sleep_returns_false_after_the_time() -> None:
    """``await op.sleep(s)`` returns False after s seconds when nothing stops the handler."""
    seen: list[tuple[bool, float]] = []

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
        start = time.monotonic()
        woke = await op.sleep(0.2)
        seen.append((woke, time.monotonic() - start))
        zero = await op.sleep(0)
        negative = await op.sleep(-1)
        seen.append((zero or negative, 0.0))
        return RESPONSE

    op = run_async(handler)
    assert op.HasField("response")
    [(woke, elapsed), (short, _)] = seen
    assert woke is False and short is False
    assert 0.18 <= elapsed < 5


def test_sleep_is_cut_short_by_a_cancel() -> None:
    """A cancel ends ``await op.sleep(LONG)`` at once (CancelledError, or True); a later sleep is
    True at once."""
    started, stopped = threading.Event(), threading.Event()
    seen: list[object] = []

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
        started.set()
        start = time.monotonic()
        try:
            seen.append(await op.sleep(LONG))
        except asyncio.CancelledError:
            seen.append("CancelledError")
        seen.append(time.monotonic() - start < LONG / 2)
        start = time.monotonic()
        seen.append(await op.sleep(LONG))
        seen.append(time.monotonic() - start < LONG / 2)
        stopped.set()
        return RESPONSE

    with served(handler, aio=True, asynchronous=True) as srv:
        name = create(srv).name
        assert started.wait(LONG)
        cancel(srv, name)
        assert stopped.wait(LONG)
        eventually(lambda: not srv.manager.registry.count(), "the handler to return")
        op = get(srv, name)
    assert seen[0] in ("CancelledError", True)
    assert seen[1:] == [True, True, True]
    assert op.error.code == CANCELLED


def test_sleep_holds_no_thread_and_lets_other_handlers_run() -> None:
    """Many async handlers sleeping at once overlap on the loop and add no threads."""
    count, nap = 20, 0.5
    all_asleep, all_awake = threading.Event(), threading.Event()
    asleep: list[str] = []
    woke: list[bool] = []

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
        asleep.append(request.name)
        if len(asleep) == count:
            all_asleep.set()
        woke.append(await op.sleep(nap))
        if len(woke) == count:
            all_awake.set()
        return RESPONSE

    manager = lrofw.Manager(max_workers=count)
    with served(handler, manager=manager, aio=True, asynchronous=True) as srv:
        threads = threading.active_count()
        start = time.monotonic()
        names = [create(srv, f"dut{i}").name for i in range(count)]
        assert all_asleep.wait(LONG)
        during = threading.active_count()
        assert all_awake.wait(LONG)
        elapsed = time.monotonic() - start
        ops = [finished(srv, name) for name in names]
    assert woke == [False] * count
    assert all(op.HasField("response") for op in ops)
    assert elapsed < nap * count / 4  # overlapped, not one after another
    assert during - threads < 4  # a thread per sleeping handler would add twenty


# --- bounded concurrency --------------------------------------------------------------------------


def test_at_most_max_workers_run_and_the_queue_is_bounded() -> None:
    """With max_workers=2, max_queued=1: two async handlers run, one waits, a fourth is refused."""
    gate = AioGate()
    started: list[str] = []
    running = [0, 0]  # now, most at once (only the loop thread changes them)

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
        started.append(request.name)
        running[0] += 1
        running[1] = max(running)
        try:
            await gate.wait()
        finally:
            running[0] -= 1
        return Response(installed_image=request.name)

    manager = lrofw.Manager(max_workers=2, max_queued=1)
    with served(handler, manager=manager, aio=True, asynchronous=True, gates=(gate,)) as srv:
        names = [create(srv, dut).name for dut in ("a", "b", "c")]
        eventually(lambda: len(started) == 2, "two handlers to start")
        settle(srv)  # the third task has had every chance to start
        two = sorted(started)
        refused = rpc_error(lambda: create(srv, "d"))
        listed = listed_names(srv)
        gate.set()
        ops = [finished(srv, name) for name in names]
        again = finished(srv, create(srv, "e").name)  # room again once they are done
    assert two == ["a", "b"]
    assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sorted(listed) == sorted(names)
    assert all(op.HasField("response") for op in ops)
    assert again.HasField("response")
    assert sorted(started) == ["a", "b", "c", "e"]
    assert running == [0, 2]


# --- what a running async handler sees ------------------------------------------------------------


def test_report_is_visible_through_get_at_once() -> None:
    """op.report() in an async handler is visible through GetOperation while it runs."""
    gate, reported = AioGate(), threading.Event()
    results: list[bool] = []

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
        results.append(op.report(Metadata(stage="flashing", percent=40)))
        reported.set()
        await gate.wait()
        return RESPONSE

    with served(handler, aio=True, asynchronous=True, gates=(gate,)) as srv:
        name = create(srv).name
        assert reported.wait(LONG)
        running = get(srv, name)
        gate.set()
        op = finished(srv, name)
    seen, final = Metadata(), Metadata()
    assert results == [True]
    assert not running.done
    assert running.metadata.Unpack(seen) and (seen.stage, seen.percent) == ("flashing", 40)
    assert op.HasField("response")
    assert op.metadata.Unpack(final) and final == seen


def test_handler_sees_the_callers_metadata_peer_name_and_method() -> None:
    """The async op carries the creating call's metadata and peer, the op's name and method."""
    seen: dict[str, Any] = {}

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
        seen.update(
            kind=type(op),
            metadata=tuple(op.invocation_metadata),
            peer=op.peer,
            name=op.name,
            method=op.method,
            thread=threading.current_thread(),
        )
        return RESPONSE

    async def loop_thread() -> threading.Thread:
        return threading.current_thread()

    with served(handler, aio=True, asynchronous=True) as srv:
        name = create(srv, metadata=(("x-user", "alice"),)).name
        finished(srv, name)
        server_loop = srv.run(loop_thread())
    assert seen["kind"] is lrofw.AsyncOperationContext
    assert ("x-user", "alice") in seen["metadata"]
    assert seen["peer"].startswith(("ipv4:", "ipv6:"))
    assert seen["name"] == name
    assert seen["method"] == METHOD
    assert seen["thread"] is server_loop  # a task on the server's loop, not a worker thread


class Tagging(grpc.aio.ServerInterceptor):
    """Sets CALLER_TAG from the ``x-tag`` metadata around each call's behaviour, as tracing or
    auth middleware does."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        inner = handler.unary_unary if handler is not None else None
        if inner is None:
            return handler
        tag = dict(details.invocation_metadata or ()).get("x-tag", "none")

        async def behaviour(request: Any, context: Any) -> Any:
            CALLER_TAG.set(str(tag))
            result = inner(request, context)
            return await result if asyncio.iscoroutine(result) else result

        return grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@pytest.mark.parametrize("asynchronous", [True, False], ids=["async-def", "def"])
def test_contextvars_of_the_create_call_reach_the_handler(asynchronous: bool) -> None:
    """A ContextVar set for the create call (by an interceptor) is visible in the handler, both
    in an async handler's task and in a sync handler on the manager's threads."""
    seen: list[str] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        seen.append(CALLER_TAG.get())
        CALLER_TAG.set("changed by the handler")
        return RESPONSE

    async def main() -> tuple[operations_pb2.Operation, operations_pb2.Operation]:
        manager = lrofw.Manager()
        server = grpc.aio.server(interceptors=[Tagging()], options=lrofw.SERVER_OPTIONS)
        servicer = common(handler, asynchronous=asynchronous)
        lrofw.add_servicer_to_server(servicer, server, manager=manager)
        port = server.add_insecure_port("localhost:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
                stub = tls_pb2_grpc.CommonStub(channel)
                first = await stub.ProvisionDut(
                    Request(name="a"), metadata=(("x-tag", "alice"),), timeout=LONG
                )
                second = await stub.ProvisionDut(
                    Request(name="b"), metadata=(("x-tag", "bob"),), timeout=LONG
                )
                return (
                    await lrofw.aio.wait(channel, first.name, timeout=LONG),
                    await lrofw.aio.wait(channel, second.name, timeout=LONG),
                )
        finally:
            await manager.aclose(grace=1.0)
            await server.stop(None)

    ops = asyncio.run(main())
    assert all(op.HasField("response") for op in ops)
    assert sorted(seen) == ["alice", "bob"]  # each run saw its own call's value, not the other's


# --- close and aclose -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "aclose"])
def test_close_aborts_async_handlers_after_grace_and_cancels_their_tasks(how: str) -> None:
    """After grace, close/aclose ends running and queued async ops ABORTED and cancels the tasks."""
    gate, started, stopped = AioGate(), threading.Event(), threading.Event()
    seen: list[str] = []
    manager = lrofw.Manager(max_workers=1)
    with served(
        stoppable(gate, started, seen, stopped),
        manager=manager,
        aio=True,
        asynchronous=True,
        gates=(gate,),
    ) as srv:
        running = create(srv, "running").name
        queued = create(srv, "queued").name
        assert started.wait(LONG)
        start = time.monotonic()
        if how == "close":
            srv.manager.close(grace=0.2)
        else:
            srv.run(srv.manager.aclose(grace=0.2))
        elapsed = time.monotonic() - start
        assert stopped.wait(LONG)
        settle(srv)
        ops = [get(srv, running), get(srv, queued)]
        refused = rpc_error(lambda: create(srv))
    assert 0.18 <= elapsed < 5
    assert [op.error.code for op in ops] == [grpc.StatusCode.ABORTED.value[0]] * 2
    # The running handler's task was cancelled (that the queued one never runs is checked,
    # deterministically, by test_close_never_starts_a_queued_task_it_aborted).
    assert seen[0] == "CancelledError cancelled=True reported=False"
    assert refused.code() is grpc.StatusCode.UNAVAILABLE


def test_aclose_lets_running_async_handlers_finish_within_grace() -> None:
    """aclose(grace) keeps the loop running, so a running async handler finishes normally."""
    gate, started, stopped = AioGate(), threading.Event(), threading.Event()
    seen: list[str] = []
    with served(
        stoppable(gate, started, seen, stopped), aio=True, asynchronous=True, gates=(gate,)
    ) as srv:
        name = create(srv).name
        assert started.wait(LONG)
        closer, raised = in_thread(lambda: srv.run(srv.manager.aclose(grace=LONG)))
        eventually(lambda: srv.manager.closed, "aclose() to start")
        assert closer.is_alive()  # it waits for the handler
        gate.set()
        closer.join(LONG)
        op = get(srv, name)
    assert not closer.is_alive() and raised == []
    assert seen == ["gate opened"]
    assert op.done and op.HasField("response")


# --- WaitOperation without threads ----------------------------------------------------------------


class CountingSubscribers(lrofw.Manager):
    """A Manager that calls ``on_held()`` once ``expected`` waits have subscribed to operations."""

    def __init__(self, expected: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._expected = expected
        self._count = 0
        self._count_lock = threading.Lock()
        self.on_held: Callable[[], object] = lambda: None

        subscribe = self.registry.subscribe_running

        def counted(name: str, callback: Callable[[], None]) -> Any:
            subscribed = subscribe(name, callback)
            with self._count_lock:
                self._count += 1
                reached = self._count == self._expected
            if reached:
                self.on_held()
            return subscribed

        self.registry.subscribe_running = counted  # type: ignore[method-assign]


def test_wait_operation_on_the_aio_server_holds_no_thread() -> None:
    """Fifty WaitOperation calls held at once on the aio server add no threads to the process."""
    count = 50
    manager = CountingSubscribers(count + 1)  # the warm-up wait subscribes too
    with served(lambda request, op: RESPONSE, manager=manager, aio=True) as srv:
        names = [manager.new_operation().name for _ in range(count)]

        async def main() -> tuple[int, int, list[operations_pb2.Operation]]:
            loop = asyncio.get_running_loop()
            held = asyncio.Event()
            manager.on_held = lambda: loop.call_soon_threadsafe(held.set)
            async with grpc.aio.insecure_channel(srv.target) as channel:
                stub = operations_pb2_grpc.OperationsStub(channel)
                await stub.WaitOperation(wait_request(names[0], 0), timeout=LONG)  # warm up
                before = threading.active_count()
                calls = [
                    asyncio.ensure_future(stub.WaitOperation(wait_request(n), timeout=LONG + 5))
                    for n in names
                ]
                await asyncio.wait_for(held.wait(), LONG)  # every wait is held now
                during = threading.active_count()
                for name in names:
                    manager.set_result(name, RESPONSE)
                return before, during, list(await asyncio.gather(*calls))

        before, during, ops = asyncio.run(main())
    assert [op.done for op in ops] == [True] * count
    assert during - before < 5  # one thread per wait would add about fifty


def test_one_manager_runs_async_handlers_on_one_loop_only() -> None:
    """A Manager serving async handlers on two aio servers (two loops) refuses creates on the
    second with FAILED_PRECONDITION and makes no op there; the first keeps working."""

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
        return RESPONSE

    manager = lrofw.Manager()
    with served(handler, manager=manager, aio=True, asynchronous=True) as first:
        servicer = common(handler, asynchronous=True)
        with serve(servicer, manager=manager, aio=True) as second:
            refused = rpc_error(lambda: create(second))
            op = finished(first, create(first).name)
            listed = listed_names(first)
    assert refused.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "one Manager per grpc.aio server" in (refused.details() or "")
    assert op.HasField("response")
    assert listed == [op.name]


def test_async_handler_servicer_on_a_sync_server_is_a_type_error() -> None:
    """Registering a servicer with an async def handler on a grpc.server raises TypeError."""
    servicer = common(lambda request, op: RESPONSE, asynchronous=True)
    server = grpc.server(ThreadPoolExecutor(1))
    with lrofw.Manager() as manager, pytest.raises(TypeError, match=r"grpc\.aio\.server"):
        lrofw.add_servicer_to_server(servicer, server, manager=manager)
    assert decorator.binding_of(servicer) is None  # nothing was half registered


@pytest.mark.parametrize(
    ("servicer", "aio"),
    [
        (common(lambda request, op: RESPONSE, asynchronous=True), False),
        (object(), False),
        (object(), True),
    ],
    ids=["async-handler-on-sync", "not-a-servicer-sync", "not-a-servicer-aio"],
)
def test_serve_closes_the_manager_when_registration_fails(servicer: object, aio: bool) -> None:
    """lrofw.testing.serve closes its manager (and stops its threads) when registration fails."""
    manager = lrofw.Manager()
    with pytest.raises(TypeError), serve(servicer, manager=manager, aio=aio):
        pass  # pragma: no cover - registration fails first
    closed = manager.closed
    manager.close()  # whatever serve() did, leave no threads behind for later tests
    assert closed


def test_a_loop_that_ends_under_a_handler_aborts_its_operation() -> None:
    """An event loop that ends under a running async handler leaves it ABORTED, not CANCELLED."""
    manager = lrofw.Manager()
    started: list[asyncio.Event] = []

    class Blocked(tls_pb2_grpc.CommonServicer):
        @lrofw.long_running(Response)
        async def ProvisionDut(self, request: Any, op: lrofw.AsyncOperationContext) -> Any:
            started[0].set()
            await asyncio.Event().wait()  # forever: only the loop's end stops it
            return Response()

    async def main() -> str:
        started.append(asyncio.Event())
        server = grpc.aio.server(options=lrofw.SERVER_OPTIONS)
        lrofw.add_servicer_to_server(Blocked(), server, manager=manager)
        port = server.add_insecure_port("localhost:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
            op = await tls_pb2_grpc.CommonStub(channel).ProvisionDut(Request(name="x"))
        await asyncio.wait_for(started[0].wait(), LONG)
        await server.stop(None)
        return str(op.name)  # asyncio.run now cancels the handler's task: the loop is ending

    try:
        name = asyncio.run(main())
        op = manager.get(name)
        assert op.done
        assert op.error.code == grpc.StatusCode.ABORTED.value[0]
        assert op.error.message == "the server stopped before the operation finished"
    finally:
        manager.close(grace=0)


def test_an_async_handlers_last_report_is_stored_before_its_outcome(
    tmp_path: pathlib.Path,
) -> None:
    """An async handler's report goes to a blocking store from a thread, and its outcome by
    another way (the store's finish_async, or another thread); a report stored after the
    outcome would be refused. The outcome waits for the report: the finished operation carries
    the report made just before the handler returned."""
    entered, release = threading.Event(), threading.Event()

    class SlowReports(SQLiteStore):
        def set_metadata(self, *args: Any, **kwargs: Any) -> bool:
            entered.set()
            assert release.wait(LONG)
            return super().set_metadata(*args, **kwargs)

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
        op.report(Metadata(stage="done", percent=100))
        return RESPONSE

    manager = lrofw.Manager(store=SlowReports(tmp_path / "ops.db"))
    with served(handler, manager=manager, aio=True, asynchronous=True, gates=(release,)) as srv:
        name = create(srv).name
        assert entered.wait(LONG)
        assert not get(srv, name).done  # the outcome waits for the report being stored
        release.set()
        op = finished(srv, name)
    final = Metadata()
    assert op.HasField("response")
    assert op.metadata.Unpack(final) and (final.stage, final.percent) == ("done", 100)
