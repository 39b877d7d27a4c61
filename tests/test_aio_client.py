"""Tests for lrofw.aio (wait and OperationFuture over grpc.aio channels) against real sync and aio
servers; each mirrors its sync twin in test_client.py, so the two client paths are checked alike."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import pytest
import tls_pb2_grpc
from factories import (
    LONG,
    Metadata,
    Provisioner,
    Request,
    Response,
    WaitWatchingManager,
    on_both_servers,
    raw_served,
)
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import any_pb2

import lrofw
from lrofw import errors
from lrofw.testing import Served, serve

T = TypeVar("T")

R120 = Response(installed_image="R120")


# --- helpers --------------------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Runs ``coro`` in a fresh event loop in this thread (the client's loop), as a caller would."""
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def aio_channel(srv: Served) -> AsyncIterator[grpc.aio.Channel]:
    """A grpc.aio channel to the test server, closed on the way out."""
    async with grpc.aio.insecure_channel(srv.target) as channel:
        yield channel


def finish_later(manager: lrofw.Manager, name: str, when: threading.Event) -> threading.Thread:
    """Starts a thread that finishes ``name`` with R120 once ``when`` is set."""

    def finish() -> None:
        if when.wait(LONG):
            manager.set_result(name, R120)

    thread = threading.Thread(target=finish, daemon=True)
    thread.start()
    return thread


# --- wait over a real server ----------------------------------------------------------------------


@on_both_servers
def test_wait_returns_done_op_finished_from_another_thread(aio: bool) -> None:
    """aio.wait returns promptly once another thread finishes the op while the wait is held."""
    manager = WaitWatchingManager()
    with serve(manager=manager, aio=aio) as srv:
        op = manager.new_operation()
        thread = finish_later(manager, op.name, manager.waiting)

        async def main() -> tuple[operations_pb2.Operation, float]:
            async with aio_channel(srv) as channel:
                started = time.monotonic()
                done = await lrofw.aio.wait(channel, op.name, timeout=20)
                return done, time.monotonic() - started

        done, elapsed = run(main())
        thread.join(5)
    response = Response()
    assert done.done and done.name == op.name
    assert done.response.Unpack(response) and response == R120
    assert elapsed < 5  # no polling lag: the held wait was woken


@on_both_servers
def test_wait_times_out_with_the_latest_state(aio: bool) -> None:
    """An op not done in time raises OperationTimeout (a TimeoutError) with its latest state."""
    with serve(aio=aio) as srv:
        op = srv.manager.new_operation(metadata=Metadata(stage="queued"))
        srv.manager.set_metadata(op.name, Metadata(stage="flashing"))

        async def main() -> None:
            async with aio_channel(srv) as channel:
                await lrofw.aio.wait(channel, op.name, timeout=0.2)

        with pytest.raises(lrofw.OperationTimeout) as info:
            run(main())
    latest = info.value.operation
    metadata = Metadata()
    assert isinstance(info.value, TimeoutError)
    assert isinstance(latest, operations_pb2.Operation)
    assert latest.name == op.name and not latest.done
    assert latest.metadata.Unpack(metadata) and metadata.stage == "flashing"


@on_both_servers
def test_wait_timeout_zero_on_running_op_times_out(aio: bool) -> None:
    """timeout=0 on an unfinished op raises OperationTimeout at once."""
    with serve(aio=aio) as srv:
        op = srv.manager.new_operation()

        async def main() -> None:
            async with aio_channel(srv) as channel:
                await lrofw.aio.wait(channel, op.name, timeout=0)

        start = time.monotonic()
        with pytest.raises(lrofw.OperationTimeout) as info:
            run(main())
        elapsed = time.monotonic() - start
    assert info.value.operation.name == op.name
    assert elapsed < 2


@on_both_servers
def test_wait_negative_timeout_is_a_value_error(aio: bool) -> None:
    """aio.wait refuses a negative timeout."""
    with serve(aio=aio) as srv:

        async def main() -> None:
            async with aio_channel(srv) as channel:
                await lrofw.aio.wait(channel, "operations/x", timeout=-1)

        with pytest.raises(ValueError, match="negative"):
            run(main())


@on_both_servers
def test_wait_unknown_operation_is_not_found(aio: bool) -> None:
    """An unknown name raises lrofw.errors.NotFound, chained to the RpcError."""
    with serve(aio=aio) as srv:

        async def main() -> None:
            async with aio_channel(srv) as channel:
                await lrofw.aio.wait(channel, "operations/does-not-exist", timeout=10)

        with pytest.raises(errors.NotFound) as info:
            run(main())
    assert isinstance(info.value, lrofw.OperationError)
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    assert "operations/does-not-exist" in info.value.message
    assert isinstance(info.value.__cause__, grpc.RpcError)


@pytest.mark.parametrize("via", ["channel", "stub"])
@on_both_servers
def test_wait_accepts_a_channel_or_a_stub(via: str, aio: bool) -> None:
    """aio.wait works given a grpc.aio channel or an OperationsStub made on one."""
    with serve(aio=aio) as srv:
        op = srv.manager.new_operation()
        srv.manager.set_error(op.name, lrofw.OperationError(grpc.StatusCode.ABORTED, "stopped"))

        async def main() -> operations_pb2.Operation:
            async with aio_channel(srv) as channel:
                target = (
                    channel if via == "channel" else operations_pb2_grpc.OperationsStub(channel)
                )
                return await lrofw.aio.wait(target, op.name, timeout=10)

        done = run(main())
    assert done.done
    assert done.error.code == grpc.StatusCode.ABORTED.value[0]
    assert done.error.message == "stopped"


def test_wait_keeps_retrying_an_unreachable_server_until_the_timeout() -> None:
    """With no server listening, aio.wait retries UNAVAILABLE and ends in OperationTimeout."""
    with serve() as srv:
        target = srv.target  # a port nobody listens on once this server is gone

    async def main() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            await lrofw.aio.wait(channel, "operations/x", timeout=0.5)

    start = time.monotonic()
    with pytest.raises(lrofw.OperationTimeout) as info:
        run(main())
    elapsed = time.monotonic() - start
    assert info.value.operation is None  # the server never answered
    assert 0.45 <= elapsed < 5


# --- servers whose WaitOperation misbehaves -------------------------------------------------------


class Counts:
    """Calls an Operations servicer received."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.waits = 0
        self.gets = 0
        self.got = threading.Event()

    def wait(self) -> int:
        """Counts a WaitOperation; returns how many there were."""
        with self._lock:
            self.waits += 1
            return self.waits

    def get(self) -> None:
        """Counts a GetOperation."""
        with self._lock:
            self.gets += 1
        self.got.set()


def scripted(behaviour: str, n: int) -> tuple[grpc.StatusCode, str] | str | None:
    """What the ``n``-th WaitOperation does: abort with (code, details), "get" (answer at once
    with the current state), or None (wait as usual).

    ``unimplemented``: a server without WaitOperation; ``eager``: a best-effort WaitOperation that
    never holds; ``flaky``: UNAVAILABLE twice, then a normal wait.
    """
    if behaviour == "unimplemented":
        return grpc.StatusCode.UNIMPLEMENTED, "WaitOperation is not implemented"
    if behaviour == "eager":
        return "get"
    if behaviour == "flaky" and n <= 2:
        return grpc.StatusCode.UNAVAILABLE, "try again"
    return None


class SyncScripted(lrofw.OperationsServicer):
    """OperationsServicer (grpc.server) that counts calls and scripts WaitOperation."""

    def __init__(self, manager: lrofw.Manager, behaviour: str) -> None:
        super().__init__(manager)
        self.behaviour = behaviour
        self.counts = Counts()

    def GetOperation(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.counts.get()
        return super().GetOperation(request, context)

    def WaitOperation(self, request: Any, context: grpc.ServicerContext) -> Any:
        step = scripted(self.behaviour, self.counts.wait())
        if step == "get":
            return lrofw.OperationsServicer.GetOperation(self, request, context)
        if isinstance(step, tuple):
            context.abort(*step)
        return super().WaitOperation(request, context)


class AsyncScripted(lrofw.AsyncOperationsServicer):
    """AsyncOperationsServicer (grpc.aio) that counts calls and scripts WaitOperation."""

    def __init__(self, manager: lrofw.Manager, behaviour: str) -> None:
        super().__init__(manager)
        self.behaviour = behaviour
        self.counts = Counts()

    async def GetOperation(self, request: Any, context: Any) -> Any:
        self.counts.get()
        return await super().GetOperation(request, context)

    async def WaitOperation(self, request: Any, context: Any) -> Any:
        step = scripted(self.behaviour, self.counts.wait())
        if step == "get":
            return await lrofw.AsyncOperationsServicer.GetOperation(self, request, context)
        if isinstance(step, tuple):
            await context.abort(*step)
        return await super().WaitOperation(request, context)


@dataclass
class Custom:
    """A server with a scripted Operations servicer: its served parts and the call counts."""

    srv: Served
    counts: Counts


@contextlib.contextmanager
def custom_server(behaviour: str, aio: bool) -> Iterator[Custom]:
    """Serves a scripted Operations servicer of the server's kind over a fresh Manager."""
    manager = lrofw.Manager()
    kind = AsyncScripted if aio else SyncScripted
    servicer = kind(manager, behaviour)
    with raw_served(operations=servicer, manager=manager, aio=aio) as srv:
        yield Custom(srv, servicer.counts)


@on_both_servers
def test_wait_polls_get_when_wait_is_unimplemented(aio: bool) -> None:
    """Against a server without WaitOperation, aio.wait polls GetOperation until done."""
    with custom_server("unimplemented", aio) as custom:
        op = custom.srv.manager.new_operation()
        thread = finish_later(custom.srv.manager, op.name, custom.counts.got)

        async def main() -> operations_pb2.Operation:
            async with aio_channel(custom.srv) as channel:
                return await lrofw.aio.wait(channel, op.name, timeout=20)

        done = run(main())
        thread.join(5)
    assert done.done and done.HasField("response")
    assert custom.counts.waits == 1  # it switched after the first UNIMPLEMENTED
    assert custom.counts.gets >= 1


@on_both_servers
def test_wait_backs_off_when_wait_returns_early(aio: bool) -> None:
    """A WaitOperation that answers at once, not done, is called a few times, not in a spin."""
    with custom_server("eager", aio) as custom:
        op = custom.srv.manager.new_operation()

        async def main() -> None:
            async with aio_channel(custom.srv) as channel:
                await lrofw.aio.wait(channel, op.name, timeout=0.5)

        with pytest.raises(lrofw.OperationTimeout):
            run(main())
    assert 2 <= custom.counts.waits < 20


@on_both_servers
def test_wait_retries_unavailable(aio: bool) -> None:
    """UNAVAILABLE answers are retried with backoff until the wait succeeds."""
    with custom_server("flaky", aio) as custom:
        op = custom.srv.manager.new_operation()
        custom.srv.manager.set_result(op.name, Response(installed_image="R1"))

        async def main() -> operations_pb2.Operation:
            async with aio_channel(custom.srv) as channel:
                return await lrofw.aio.wait(channel, op.name, timeout=20)

        done = run(main())
    assert done.done and done.HasField("response")
    assert custom.counts.waits == 3


# --- OperationFuture ------------------------------------------------------------------------------


@dataclass
class Lab:
    """A served Provisioner and an aio channel to it (made in the test's own event loop)."""

    srv: Served
    servicer: Provisioner
    channel: grpc.aio.Channel

    async def start(self, dut: str, image: str = "R120") -> lrofw.aio.OperationFuture:
        """Calls ProvisionDut over the aio channel and wraps the Operation in a future."""
        stub = tls_pb2_grpc.CommonStub(self.channel)
        op = await stub.ProvisionDut(Request(name=dut, image_path=image), timeout=LONG)
        assert not op.done
        return lrofw.aio.OperationFuture(self.channel, op, Response, metadata_type=Metadata)


@contextlib.contextmanager
def lab_server(aio: bool) -> Iterator[tuple[Served, Provisioner]]:
    """Serves a Provisioner; blocked handlers are released before the server stops."""
    servicer = Provisioner()
    with serve(servicer, grace=0.5, aio=aio) as srv:
        try:
            yield srv, servicer
        finally:
            servicer.release()


@contextlib.asynccontextmanager
async def lab(srv: Served, servicer: Provisioner) -> AsyncIterator[Lab]:
    """The Lab of a served Provisioner, with its aio channel open."""
    async with aio_channel(srv) as channel:
        yield Lab(srv, servicer, channel)


async def until(event: threading.Event) -> bool:
    """Awaits a threading.Event without blocking the loop (a thread of the default executor)."""
    return await asyncio.get_running_loop().run_in_executor(None, event.wait, LONG)


@on_both_servers
def test_future_result_returns_the_unpacked_response(aio: bool) -> None:
    """await fut and await fut.result() return the response of a successful operation."""
    with lab_server(aio) as (srv, servicer):

        async def main() -> tuple[Any, ...]:
            async with lab(srv, servicer) as lb:
                fut = await lb.start("some host", "R120-15662.0.0")
                awaited = await fut
                return (
                    awaited,
                    await fut.result(timeout=20),
                    await fut.done(),
                    await fut.exception(),
                    fut.cancelled(),
                )

        awaited, result, done, exception, cancelled = run(main())
    assert awaited == result == Response(installed_image="R120-15662.0.0")
    assert done is True
    assert exception is None
    assert cancelled is False


@on_both_servers
def test_future_result_raises_the_handlers_error(aio: bool) -> None:
    """A handler's NOT_FOUND surfaces as errors.NotFound from result() and exception()."""
    with lab_server(aio) as (srv, servicer):

        async def main() -> tuple[BaseException, Any, bool, bool]:
            async with lab(srv, servicer) as lb:
                fut = await lb.start("unknown host")
                with pytest.raises(errors.NotFound) as info:
                    await fut.result(timeout=20)
                return info.value, await fut.exception(), await fut.done(), fut.cancelled()

        raised, exc, done, cancelled = run(main())
    assert isinstance(raised, lrofw.OperationError)
    assert isinstance(raised, errors.NotFound)
    assert raised.code is grpc.StatusCode.NOT_FOUND
    assert raised.message == "Unknown DUT unknown host"
    assert isinstance(exc, errors.NotFound)
    assert exc.message == "Unknown DUT unknown host"
    assert done is True and cancelled is False


@on_both_servers
def test_future_wait_false_then_true_and_done(aio: bool) -> None:
    """wait(timeout) is False while running, True once finished; done() follows."""
    with lab_server(aio) as (srv, servicer):

        async def main() -> list[object]:
            async with lab(srv, servicer) as lb:
                fut = await lb.start("slow host")
                assert await until(servicer.reported)
                seen: list[object] = [await fut.wait(0.1), await fut.done()]
                servicer.release()
                seen += [await fut.wait(20), await fut.done(), await fut.result()]
                return seen

        seen = run(main())
    assert seen == [False, False, True, True, R120]


@on_both_servers
def test_future_metadata_shows_the_reported_progress(aio: bool) -> None:
    """metadata is the handler's latest report, unpacked, once the future has looked."""
    with lab_server(aio) as (srv, servicer):

        async def main() -> tuple[Any, Any, operations_pb2.Operation, str]:
            async with lab(srv, servicer) as lb:
                fut = await lb.start("slow host")
                before = fut.metadata  # the create RPC's answer: nothing reported yet
                assert await until(servicer.reported)
                assert not await fut.done()
                return before, fut.metadata, fut.operation, fut.name

        before, metadata, operation, name = run(main())
    assert before is None
    assert metadata == Metadata(stage="flashing", percent=40)
    assert operation.name == name and not operation.done


@on_both_servers
def test_future_cancel_running_operation(aio: bool) -> None:
    """cancel() on a running op returns True; it is cancelled and result() raises."""
    with lab_server(aio) as (srv, servicer):

        async def main() -> tuple[bool, bool, bool, BaseException, Any, str]:
            async with lab(srv, servicer) as lb:
                fut = await lb.start("slow host")
                assert await until(servicer.reported)
                cancelled = await fut.cancel()
                with pytest.raises(lrofw.OperationCancelled) as info:
                    await fut.result(timeout=5)
                return (
                    cancelled,
                    fut.cancelled(),
                    await fut.done(),
                    info.value,
                    await fut.exception(timeout=5),
                    fut.name,
                )

        cancelled, is_cancelled, done, raised, exc, name = run(main())
        server_side = srv.manager.get(name)
        assert servicer.stopped.wait(LONG)  # the handler was signalled
    assert cancelled is True and is_cancelled is True and done is True
    assert isinstance(raised, lrofw.OperationCancelled)
    assert raised.code is grpc.StatusCode.CANCELLED
    assert isinstance(exc, lrofw.OperationCancelled)
    assert server_side.error.code == grpc.StatusCode.CANCELLED.value[0]


@on_both_servers
def test_future_cancel_finished_operation_is_false(aio: bool) -> None:
    """cancel() after success returns False and leaves the result alone."""
    with lab_server(aio) as (srv, servicer):

        async def main() -> list[object]:
            async with lab(srv, servicer) as lb:
                fut = await lb.start("some host")
                first = await fut.result(timeout=20)
                return [first, await fut.cancel(), fut.cancelled(), await fut.result()]

        seen = run(main())
    assert seen == [R120, False, False, R120]


@on_both_servers
def test_future_cancel_of_a_deleted_operation_is_not_found(aio: bool) -> None:
    """cancel() of an op the server no longer has raises errors.NotFound, chained to the call."""
    with serve(aio=aio) as srv:
        op = srv.manager.new_operation()
        srv.manager.delete(op.name)

        async def main() -> None:
            async with aio_channel(srv) as channel:
                await lrofw.aio.OperationFuture(channel, op, Response).cancel()

        with pytest.raises(errors.NotFound) as info:
            run(main())
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    assert isinstance(info.value.__cause__, grpc.RpcError)


@on_both_servers
def test_future_done_callback_runs_once_on_completion(aio: bool) -> None:
    """add_done_callback runs the callback once, on the loop, when the operation finishes."""
    with lab_server(aio) as (srv, servicer):

        async def main() -> tuple[list[Any], list[threading.Thread], bool, Any]:
            async with lab(srv, servicer) as lb:
                fut = await lb.start("slow host")
                called = asyncio.Event()
                calls: list[Any] = []
                threads: list[threading.Thread] = []

                def callback(f: lrofw.aio.OperationFuture) -> None:
                    calls.append(f)
                    threads.append(threading.current_thread())
                    called.set()

                fut.add_done_callback(callback)
                assert await until(servicer.reported)
                early = called.is_set()
                servicer.release()
                await asyncio.wait_for(called.wait(), LONG)
                result = await fut.result(timeout=20)
                assert await fut.wait(1)
                for _ in range(10):  # let any second call that was queued happen
                    await asyncio.sleep(0)
                assert calls == [fut]
                return calls, threads, early, result

        calls, threads, early, result = run(main())
    assert len(calls) == 1
    assert threads == [threading.current_thread()]  # the loop's thread: asyncio.run runs here
    assert early is False
    assert result == R120


@on_both_servers
def test_future_done_callback_runs_at_once_when_done(aio: bool) -> None:
    """add_done_callback on a finished future calls back at once, before add_done_callback
    returns."""
    with lab_server(aio) as (srv, servicer):

        async def main() -> list[Any]:
            async with lab(srv, servicer) as lb:
                fut = await lb.start("some host")
                await fut.result(timeout=20)
                calls: list[Any] = []
                fut.add_done_callback(calls.append)
                assert calls == [fut]
                return calls

        assert len(run(main())) == 1


@on_both_servers
def test_future_result_timeout_on_blocked_op(aio: bool) -> None:
    """result(timeout=0.1) on a blocked op raises OperationTimeout with the latest state."""
    with lab_server(aio) as (srv, servicer):

        async def main() -> tuple[lrofw.OperationTimeout, str]:
            async with lab(srv, servicer) as lb:
                fut = await lb.start("slow host")
                with pytest.raises(lrofw.OperationTimeout) as info:
                    await fut.result(timeout=0.1)
                with pytest.raises(lrofw.OperationTimeout):
                    await fut.exception(timeout=0.1)
                return info.value, fut.name

        raised, name = run(main())
    assert isinstance(raised, lrofw.OperationTimeout)
    assert isinstance(raised, TimeoutError)
    assert raised.operation is not None
    assert raised.operation.name == name
    assert not raised.operation.done


@on_both_servers
def test_future_accepts_a_stub_and_copies_the_operation(aio: bool) -> None:
    """OperationFuture takes an aio OperationsStub too, and keeps its own copy of the op."""
    with lab_server(aio) as (srv, _):

        async def main() -> tuple[Any, lrofw.aio.OperationFuture]:
            async with aio_channel(srv) as channel:
                stub = tls_pb2_grpc.CommonStub(channel)
                op = await stub.ProvisionDut(Request(name="some host", image_path="R9"))
                ops = operations_pb2_grpc.OperationsStub(channel)
                fut = lrofw.aio.OperationFuture(ops, op, Response)
                op.name = "operations/changed"
                op.response.CopyFrom(any_pb2.Any())
                return await fut.result(timeout=20), fut

        result, fut = run(main())
    assert result == Response(installed_image="R9")
    assert fut.name != "operations/changed"
    assert fut.metadata is None  # no metadata_type given


@on_both_servers
def test_future_timeout_hands_out_a_copy_of_the_operation(aio: bool) -> None:
    """The OperationTimeout from result() carries a copy: changing it leaves the future alone."""
    with lab_server(aio) as (srv, servicer):

        async def main() -> tuple[bool, bool]:
            async with lab(srv, servicer) as lb:
                fut = await lb.start("slow host")
                with pytest.raises(lrofw.OperationTimeout) as info:
                    await fut.result(timeout=0.1)
                assert info.value.operation is not None
                info.value.operation.done = True
                return fut.operation.done, await fut.wait(0.05)

        assert run(main()) == (False, False)


@on_both_servers
def test_future_callback_added_after_the_op_was_deleted_is_not_dropped(aio: bool) -> None:
    """Every callback is called when the watched op is deleted; result() then raises NotFound."""
    with serve(aio=aio) as srv:
        op = srv.manager.new_operation()

        async def main() -> tuple[bool, errors.NotFound]:
            async with aio_channel(srv) as channel:
                fut = lrofw.aio.OperationFuture(channel, op, Response)
                first = asyncio.Event()
                seconds: list[Any] = []
                fut.add_done_callback(lambda f: first.set())
                srv.manager.delete(op.name)
                await asyncio.wait_for(first.wait(), LONG)
                fut.add_done_callback(seconds.append)
                with pytest.raises(errors.NotFound) as info:
                    await fut.result(timeout=5)
                return seconds == [fut], info.value

        at_once, raised = run(main())
    assert at_once
    assert raised.code is grpc.StatusCode.NOT_FOUND


@on_both_servers
def test_future_from_a_finished_operation_needs_no_call(aio: bool) -> None:
    """A future made from an op that is already done answers without asking the server."""
    with serve(aio=aio) as srv:
        op = srv.manager.new_operation()
        srv.manager.set_result(op.name, R120)
        done = srv.manager.get(op.name)
        srv.manager.delete(op.name)  # any call to the server would now be NOT_FOUND

        async def main() -> list[object]:
            async with aio_channel(srv) as channel:
                fut = lrofw.aio.OperationFuture(channel, done, Response)
                return [await fut, await fut.done(), await fut.cancel(), await fut.exception()]

        seen = run(main())
    assert seen == [R120, True, False, None]
