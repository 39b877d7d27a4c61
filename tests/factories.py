"""Factories the tests share: servers for a ProvisionDut handler, calls over the wire, waiting.

Plain functions, imported by the test modules (pytest puts ``tests/`` on ``sys.path``). Every
test that serves a handler does it through :func:`served`; ``served(..., aio=True)`` serves it from
a ``grpc.aio`` server instead (through the same synchronous channel), and tests that hold on both
kinds of server are marked :data:`on_both_servers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import tls_pb2
import tls_pb2_grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import status_pb2

import lrofw
from lrofw.stores.base import Record
from lrofw.stores.memory import MemoryStore
from lrofw.testing import Served, serve

METHOD = "/chromiumos.config.api.test.tls.Common/ProvisionDut"
LONG = 30.0  # seconds to wait for something that should happen at once; reached only on failure

Request = tls_pb2.ProvisionDutRequest
Response = tls_pb2.ProvisionDutResponse
Metadata = tls_pb2.ProvisionDutMetadata
RESPONSE = Response(installed_image="image-1")

Handler = Callable[[tls_pb2.ProvisionDutRequest, lrofw.OperationContext], object]
AsyncHandler = Callable[
    [tls_pb2.ProvisionDutRequest, lrofw.AsyncOperationContext], Awaitable[object]
]

#: Runs a test once on a ``grpc.server`` and once on a ``grpc.aio`` server: the test takes ``aio``
#: and passes it on to :func:`served` (or :func:`raw_served`).
on_both_servers = pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])


# --- servers --------------------------------------------------------------------------------------


def common(
    handler: Handler | AsyncHandler, *, asynchronous: bool = False, **options: Any
) -> tls_pb2_grpc.CommonServicer:
    """Returns a Common servicer whose ProvisionDut runs ``handler(request, op)``.

    With ``asynchronous`` ProvisionDut is an ``async def`` (served only by ``grpc.aio`` servers,
    where it runs as a task on the server's loop) that awaits what ``handler`` returns when that
    is awaitable, so one handler can be an ``async def`` or a plain function.
    """
    if asynchronous:

        class AsyncCommon(tls_pb2_grpc.CommonServicer):
            @lrofw.long_running(Response, metadata_type=Metadata, **options)
            async def ProvisionDut(self, request: Any, op: lrofw.AsyncOperationContext) -> object:
                value = handler(request, op)  # an async def handler, or a plain one
                return await value if inspect.isawaitable(value) else value

        return AsyncCommon()

    class Common(tls_pb2_grpc.CommonServicer):
        @lrofw.long_running(Response, metadata_type=Metadata, **options)
        def ProvisionDut(self, request: Any, op: lrofw.OperationContext) -> object:
            return handler(request, op)  # type: ignore[arg-type]  # a def handler here

    return Common()


@contextlib.contextmanager
def served(
    handler: Handler | AsyncHandler,
    *,
    manager: lrofw.Manager | None = None,
    gates: tuple[threading.Event | AioGate, ...] = (),
    aio: bool = False,
    asynchronous: bool = False,
    **options: Any,
) -> Iterator[Served]:
    """Serves ``handler`` on localhost:0; opens ``gates`` before shutdown so no handler hangs.

    ``aio`` serves it from a ``grpc.aio`` server on a loop thread of its own; ``asynchronous``
    makes ProvisionDut an ``async def`` (see :func:`common`), which needs ``aio``.
    """
    servicer = common(handler, asynchronous=asynchronous, **options)
    with serve(servicer, manager=manager or lrofw.Manager(), aio=aio) as srv:
        try:
            yield srv
        finally:
            for gate in gates:
                gate.set()


class _LoopThread:
    """An event loop running on a daemon thread until :meth:`close`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(LONG)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(LONG)
        self.loop.close()


@contextlib.contextmanager
def raw_served(
    servicer: tls_pb2_grpc.CommonServicer | None = None,
    *,
    operations: operations_pb2_grpc.OperationsServicer | None = None,
    manager: lrofw.Manager | None = None,
    aio: bool = False,
) -> Iterator[Served]:
    """Serves servicers added only with grpc's generated functions: lrofw never sees them.

    ``aio`` serves them from a ``grpc.aio`` server (on a loop thread of its own) instead.
    """
    manager = manager or lrofw.Manager()

    def add(server: Any) -> str:
        if servicer is not None:
            tls_pb2_grpc.add_CommonServicer_to_server(servicer, server)
        if operations is not None:
            operations_pb2_grpc.add_OperationsServicer_to_server(operations, server)
        return f"localhost:{server.add_insecure_port('localhost:0')}"

    if aio:
        looper = _LoopThread()

        async def start() -> tuple[Any, str]:
            server = grpc.aio.server(options=lrofw.SERVER_OPTIONS)  # made on its own loop
            target = add(server)
            await server.start()
            return server, target

        server, target = looper.run(start())
        channel = grpc.insecure_channel(target)
        try:
            yield Served(channel, target, manager, server, looper.loop)
        finally:
            channel.close()
            looper.run(manager.aclose(grace=1.0))
            looper.run(server.stop(None))
            looper.close()
        return
    server = grpc.server(ThreadPoolExecutor(4), options=lrofw.SERVER_OPTIONS)
    target = add(server)
    server.start()
    channel = grpc.insecure_channel(target)
    try:
        yield Served(channel, target, manager, server)
    finally:
        channel.close()
        manager.close(grace=1.0)
        server.stop(grace=None).wait()


# --- handlers and servicers -----------------------------------------------------------------------


def returns(request: Any, op: lrofw.OperationContext) -> object:
    """A handler that succeeds at once."""
    return RESPONSE


def blocked(
    gate: threading.Event,
    *,
    ran: list[str] | None = None,
    started: threading.Event | None = None,
) -> Handler:
    """Returns a handler that notes it ran (``ran``, ``started``), then blocks until ``gate``."""

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        if ran is not None:
            ran.append(request.name)
        if started is not None:
            started.set()
        gate.wait(LONG)
        return RESPONSE

    return handler


class Provisioner(tls_pb2_grpc.CommonServicer):
    """ProvisionDut: "unknown*" DUTs fail NOT_FOUND; "slow*" DUTs block until released."""

    def __init__(self) -> None:
        self.reported = threading.Event()
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._released = False
        self._wakes: list[threading.Event] = []

    def release(self) -> None:
        """Lets every blocked handler (now and later) finish."""
        with self._lock:
            self._released = True
            wakes = list(self._wakes)
        for wake in wakes:
            wake.set()

    @lrofw.long_running(Response, metadata_type=Metadata)
    def ProvisionDut(self, request: Any, op: lrofw.OperationContext) -> Any:
        if request.name.startswith("unknown"):
            raise lrofw.OperationError(grpc.StatusCode.NOT_FOUND, f"Unknown DUT {request.name}")
        op.report(Metadata(stage="flashing", percent=40))
        self.reported.set()
        if request.name.startswith("slow"):
            wake = threading.Event()
            op.add_stop_callback(wake.set)  # cancellation and server close wake it too
            op.add_stop_callback(self.stopped.set)
            with self._lock:
                self._wakes.append(wake)
                if self._released:
                    wake.set()
            wake.wait(60)
        return Response(installed_image=request.image_path)


class AioGate:
    """A gate ``async def`` handlers await on their event loop; :meth:`set` opens it from any
    thread (an ``asyncio.Event`` may only be set on its own loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def is_set(self) -> bool:
        """True once the gate is open."""
        return self._open

    def set(self) -> None:
        """Opens the gate: every waiter (now and later) goes on."""
        with self._lock:
            self._open = True
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, future)

    async def wait(self, timeout: float = LONG) -> bool:
        """Awaits the gate for up to ``timeout`` seconds; True if it opened."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._open:
                return True
            self._waiters.append((loop, future))
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
            return False
        return True


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class SlowFinishes(MemoryStore):
    """A MemoryStore that is slow to finish chosen operations, as a loaded database may be: their
    ``finish`` first waits for an event (up to a bound)."""

    def __init__(self) -> None:
        super().__init__()
        self._holds: dict[str, tuple[threading.Event, float]] = {}

    def hold(self, name: str, until: threading.Event, at_most: float) -> None:
        """Makes finishing ``name`` wait until ``until`` is set, or ``at_most`` seconds."""
        self._holds[name] = (until, at_most)

    def finish(
        self,
        name: str,
        now: float,
        *,
        response: any_pb2.Any | None = None,
        error: status_pb2.Status | None = None,
        owner: str | None = None,
    ) -> Record | None:
        held = self._holds.get(name)
        if held is not None:
            held[0].wait(held[1])
        return super().finish(name, now, response=response, error=error, owner=owner)


# --- calls over the wire --------------------------------------------------------------------------


def ops_stub(srv: Served) -> operations_pb2_grpc.OperationsStub:
    """Returns an Operations stub on the test server."""
    return operations_pb2_grpc.OperationsStub(srv.channel)


def create(
    srv: Served, name: str = "dut", image_path: str = "", **call_options: Any
) -> operations_pb2.Operation:
    """Starts one ProvisionDut operation through the real create RPC."""
    stub = tls_pb2_grpc.CommonStub(srv.channel)
    request = Request(name=name, image_path=image_path)
    return stub.ProvisionDut(request, timeout=LONG, **call_options)


def get(srv: Served, name: str) -> operations_pb2.Operation:
    """GetOperation over the wire."""
    return ops_stub(srv).GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=LONG)


def list_ops(srv: Served, **fields: Any) -> operations_pb2.ListOperationsResponse:
    """ListOperations over the wire."""
    request = operations_pb2.ListOperationsRequest(**fields)
    return ops_stub(srv).ListOperations(request, timeout=LONG)


def listed_names(srv: Served, **fields: Any) -> list[str]:
    """The names on one ListOperations page."""
    return [op.name for op in list_ops(srv, **fields).operations]


def cancel(srv: Served, name: str) -> None:
    """CancelOperation over the wire."""
    ops_stub(srv).CancelOperation(operations_pb2.CancelOperationRequest(name=name), timeout=LONG)


def delete(srv: Served, name: str) -> None:
    """DeleteOperation over the wire."""
    ops_stub(srv).DeleteOperation(operations_pb2.DeleteOperationRequest(name=name), timeout=LONG)


def seconds(value: float) -> duration_pb2.Duration:
    """A Duration of ``value`` seconds."""
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


def wait_request(name: str, timeout: float = LONG) -> operations_pb2.WaitOperationRequest:
    """A WaitOperationRequest for ``name`` with ``timeout`` seconds."""
    return operations_pb2.WaitOperationRequest(name=name, timeout=seconds(timeout))


def finished(srv: Served, name: str) -> operations_pb2.Operation:
    """Waits (WaitOperation) until the operation is done and returns it."""
    op = ops_stub(srv).WaitOperation(wait_request(name), timeout=LONG + 5)
    assert op.done, f"{name} not done after {LONG} s"
    return op


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """Runs ``call`` and returns the RpcError it must raise."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# --- waiting and threads --------------------------------------------------------------------------


def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Polls ``predicate`` until it is true; fails the test after LONG seconds."""
    deadline = time.monotonic() + LONG
    pause = threading.Event()  # never set: a pause that is not time.sleep
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        pause.wait(0.005)


def waiting(srv: Served, name: str) -> None:
    """Returns once a WaitOperation on ``name`` holds (reads the private waiter table: no hook)."""
    eventually(lambda: srv.manager.registry.is_waited(name), f"a waiter on {name}")


def in_thread(
    fn: Callable[[], object], raised: list[BaseException] | None = None
) -> tuple[threading.Thread, list[BaseException]]:
    """Starts ``fn`` on a daemon thread; returns it and the list (``raised``) its error goes to."""
    failures: list[BaseException] = [] if raised is None else raised

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, failures


class WaitWatchingManager(lrofw.Manager):
    """A Manager that signals when a WaitOperation (sync or asyncio) starts waiting."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.waiting = threading.Event()

    def wait(
        self,
        name: str,
        timeout: float | None = None,
        *,
        wake: threading.Event | None = None,
        caller: lrofw.Caller | None = None,
    ) -> operations_pb2.Operation:
        self.waiting.set()
        return super().wait(name, timeout, wake=wake, caller=caller)

    async def wait_async(
        self, name: str, timeout: float | None = None, *, caller: lrofw.Caller | None = None
    ) -> operations_pb2.Operation:
        self.waiting.set()
        return await super().wait_async(name, timeout, caller=caller)
