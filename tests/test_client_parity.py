"""Tests for what lrofw.OperationFuture and lrofw.aio.OperationFuture offer alike: futures made
from a name, running(), per-call gRPC metadata on every call, one timeout rule (shared with
Manager.wait), argument checks, and WaitPolicy exported where the futures are. Each test runs
the sync client and the asyncio client through one small adapter, against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import math
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import grpc
import pytest
import tls_pb2_grpc
from factories import LONG, Metadata, Provisioner, Request, Response, on_both_servers, raw_served
from google.longrunning import operations_pb2

import lrofw
import lrofw.aio
import lrofw.client
from lrofw import errors
from lrofw.testing import Served, serve

ALICE = (("x-user", "alice"),)
BOB = (("x-user", "bob"),)

#: Runs a test once with the sync client and once with the asyncio client.
on_both_clients = pytest.mark.parametrize("kind", ["sync", "aio"])


# --- one adapter over both clients ----------------------------------------------------------------


class Client:
    """The sync client: ``call(fut, "result", 5)`` is ``fut.result(5)``."""

    future_class: type[Any] = lrofw.OperationFuture

    def __init__(self, target: str) -> None:
        self.channel: Any = grpc.insecure_channel(target)

    def future(self, operation: Any, **options: Any) -> Any:
        """A future on this client's channel for ``operation`` (an Operation or a name)."""
        return self.future_class(self.channel, operation, Response, Metadata, **options)

    def call(self, fut: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        """Calls a method of ``fut`` that makes RPCs (awaited on the asyncio client)."""
        return getattr(fut, method)(*args, **kwargs)

    def wait(self, name: str, **kwargs: Any) -> Any:
        """``lrofw.wait`` (or ``lrofw.aio.wait``) on this client's channel."""
        return lrofw.wait(self.channel, name, **kwargs)

    def close(self) -> None:
        self.channel.close()


class AioClient(Client):
    """The asyncio client, driven from the test's thread on an event loop of its own."""

    future_class = lrofw.aio.OperationFuture

    def __init__(self, target: str) -> None:
        self.loop = asyncio.new_event_loop()

        async def open_channel() -> grpc.aio.Channel:
            return grpc.aio.insecure_channel(target)

        self.channel = self.loop.run_until_complete(open_channel())

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, LONG))

    def call(self, fut: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._run(getattr(fut, method)(*args, **kwargs))

    def wait(self, name: str, **kwargs: Any) -> Any:
        return self._run(lrofw.aio.wait(self.channel, name, **kwargs))

    def close(self) -> None:
        self.loop.run_until_complete(self.channel.close())
        self.loop.close()


@contextlib.contextmanager
def client(kind: str, srv: Served) -> Iterator[Client]:
    """The ``kind`` ("sync" or "aio") client connected to ``srv``, closed on the way out."""
    made = AioClient(srv.target) if kind == "aio" else Client(srv.target)
    try:
        yield made
    finally:
        made.close()


@contextlib.contextmanager
def provisioner(aio: bool = False, **options: Any) -> Iterator[tuple[Served, Provisioner]]:
    """Serves a Provisioner ("slow*" DUTs block until released; released before it stops)."""
    servicer = Provisioner()
    with serve(servicer, grace=0.5, aio=aio, **options) as srv:
        try:
            yield srv, servicer
        finally:
            servicer.release()


def start(srv: Served, dut: str, metadata: Any = ()) -> operations_pb2.Operation:
    """Creates a ProvisionDut operation over the wire (image "R120"), sending ``metadata``."""
    stub = tls_pb2_grpc.CommonStub(srv.channel)
    return stub.ProvisionDut(Request(name=dut, image_path="R120"), timeout=LONG, metadata=metadata)


# --- WaitPolicy -----------------------------------------------------------------------------------


def test_wait_policy_is_exported_where_the_futures_are() -> None:
    """lrofw.WaitPolicy and lrofw.aio.WaitPolicy are the class lrofw.client defines."""
    assert lrofw.WaitPolicy is lrofw.client.WaitPolicy
    assert lrofw.aio.WaitPolicy is lrofw.client.WaitPolicy
    assert "WaitPolicy" in lrofw.__all__
    assert "WaitPolicy" in lrofw.aio.__all__


# --- futures made from a name, running() ----------------------------------------------------------


@on_both_clients
def test_future_from_a_name_learns_the_state_from_the_server(kind: str) -> None:
    """A future made from a name knows only the name until asked; then it has the result."""
    with provisioner() as (srv, servicer), client(kind, srv) as c:
        op = start(srv, "slow-1")
        fut = c.future(op.name)
        assert fut.name == op.name
        assert fut.operation == operations_pb2.Operation(name=op.name)  # nothing known yet
        assert fut.metadata is None
        assert c.call(fut, "running") is True
        assert fut.metadata == Metadata(stage="flashing", percent=40)  # learnt by asking
        servicer.release()
        assert c.call(fut, "result", LONG) == Response(installed_image="R120")
        assert fut.operation.done


@on_both_clients
def test_running_is_not_done_and_a_cancelled_operation_is_not_running(kind: str) -> None:
    """running() is True while the op is not done, False once it is cancelled (done)."""
    with provisioner() as (srv, _), client(kind, srv) as c:
        fut = c.future(start(srv, "slow-1"))
        assert (c.call(fut, "running"), c.call(fut, "done")) == (True, False)
        assert c.call(fut, "cancel") is True
        assert (c.call(fut, "running"), c.call(fut, "done"), fut.cancelled()) == (False, True, True)


@on_both_clients
def test_running_of_a_finished_operation_is_false(kind: str) -> None:
    """A finished op is not running, from an Operation or from its name."""
    with provisioner() as (srv, _), client(kind, srv) as c:
        op = start(srv, "quick")
        c.wait(op.name, timeout=LONG)
        assert c.call(c.future(op.name), "running") is False
        assert c.call(c.future(op), "running") is False


@on_both_clients
def test_future_from_an_unknown_name_raises_not_found(kind: str) -> None:
    """running(), done() and result() of a future for a name the server does not know: NotFound."""
    with provisioner() as (srv, _), client(kind, srv) as c:
        fut = c.future("operations/no-such-op")
        for method in ("running", "done", "result"):
            with pytest.raises(errors.NotFound):
                c.call(fut, method)


# --- argument checks ------------------------------------------------------------------------------

BAD_FUTURES: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"operation": b"operations/x"}, TypeError, "got bytes"),
    ({"operation": 42}, TypeError, "Operation or an operation's name"),
    ({"operation": ""}, ValueError, "must not be empty"),
    ({"operation": operations_pb2.Operation()}, ValueError, "must not be empty"),
    ({"response_type": Response()}, TypeError, "response_type must be a protobuf message class"),
    ({"response_type": dict}, TypeError, "response_type must be a protobuf message class"),
    ({"metadata_type": "Metadata"}, TypeError, "metadata_type must be a protobuf message class"),
    ({"channel": "localhost:1"}, TypeError, "must be a grpc channel"),
    ({"metadata": {"x-user": "alice"}}, TypeError, "sequence of (key, value) pairs"),
    ({"metadata": "x-user=alice"}, TypeError, "sequence of (key, value) pairs"),
    ({"metadata": [("x-user",)]}, TypeError, "(key, value) pairs with str keys"),
    ({"metadata": [("X-User", "alice")]}, ValueError, "metadata key 'X-User' is not valid"),
    ({"metadata": [("x-user", 7)]}, TypeError, "must have a str value, got int"),
    ({"metadata": [("x-token-bin", "abc")]}, TypeError, "must have a bytes value, got str"),
]


@pytest.mark.parametrize("future_class", [lrofw.OperationFuture, lrofw.aio.OperationFuture])
@pytest.mark.parametrize(("bad", "error", "message"), BAD_FUTURES)
def test_future_refuses_bad_arguments(
    future_class: type[Any], bad: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Each wrong argument of either future is a TypeError or ValueError saying what is wrong."""
    with grpc.insecure_channel("localhost:1") as channel:  # never connects: nothing is called
        arguments: dict[str, Any] = {
            "channel": channel,
            "operation": "operations/x",
            "response_type": Response,
            "metadata_type": Metadata,
        }
        arguments.update(bad)
        with pytest.raises(error) as info:
            future_class(**arguments)
    assert message in str(info.value)


BAD_WAITS: list[tuple[Any, dict[str, Any], type[Exception], str]] = [
    (42, {}, TypeError, "an operation name must be a str, got int"),
    ("", {}, ValueError, "an operation name must not be empty"),
    ("operations/x", {"policy": "fast"}, TypeError, "policy must be a lrofw.WaitPolicy"),
    ("operations/x", {"metadata": {"x-user": "a"}}, TypeError, "sequence of (key, value) pairs"),
]


@on_both_clients
@pytest.mark.parametrize(("name", "options", "error", "message"), BAD_WAITS)
def test_wait_refuses_bad_arguments(
    kind: str, name: Any, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    """lrofw.wait and lrofw.aio.wait: a bad name, policy or metadata fails before any call."""
    with provisioner() as (srv, _), client(kind, srv) as c, pytest.raises(error) as info:
        c.wait(name, timeout=1, **options)
    assert message in str(info.value)


def test_wait_refuses_something_that_is_not_a_channel() -> None:
    """A target string where a channel belongs is a TypeError, not an AttributeError."""
    with pytest.raises(TypeError, match="must be a grpc channel"):
        lrofw.wait("localhost:50051", "operations/x")
    with pytest.raises(TypeError, match="must be a grpc channel"):
        asyncio.run(lrofw.aio.wait("localhost:50051", "operations/x"))


# --- per-call metadata ----------------------------------------------------------------------------


class Identify:
    """An identify hook: the principal is the ``x-user`` metadata; a call without it is refused
    UNAUTHENTICATED. Every call's ``x-user`` is recorded (None when it had none)."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def __call__(self, context: Any) -> str:
        user = dict(context.invocation_metadata()).get("x-user")
        self.seen.append(user)
        if user is None:
            raise lrofw.OperationError(grpc.StatusCode.UNAUTHENTICATED, "who are you?")
        return str(user)


@on_both_servers
@on_both_clients
def test_metadata_goes_with_every_call_of_wait_and_the_future(kind: str, aio: bool) -> None:
    """wait and the future send metadata= on their Wait and Cancel calls; the server's identify
    hook refuses calls without it, and another principal's calls do not see the op."""
    identify = Identify()
    with provisioner(aio=aio, identify=identify) as (srv, servicer), client(kind, srv) as c:
        quick = start(srv, "quick", metadata=ALICE)
        assert c.wait(quick.name, timeout=LONG, metadata=ALICE).done
        with pytest.raises(errors.Unauthenticated):
            c.wait(quick.name, timeout=LONG)  # no metadata: refused
        with pytest.raises(errors.NotFound):
            c.wait(quick.name, timeout=LONG, metadata=BOB)  # not bob's

        slow = start(srv, "slow-1", metadata=ALICE)
        del identify.seen[:]
        fut = c.future(slow.name, metadata=ALICE)
        assert fut.call_metadata == ALICE
        assert c.call(fut, "wait", 0) is False  # a WaitOperation as alice
        assert c.call(fut, "cancel") is True  # a CancelOperation as alice, then a wait
        assert fut.cancelled()
        assert len(identify.seen) >= 3
        assert set(identify.seen) == {"alice"}

        anonymous = c.future(slow.name)
        with pytest.raises(errors.Unauthenticated):
            c.call(anonymous, "done")
        with pytest.raises(errors.NotFound):
            c.call(c.future(slow.name, metadata=BOB), "result", LONG)
        servicer.release()


class NoWaitOperations(lrofw.OperationsServicer):
    """lrofw's Operations servicer without WaitOperation: clients poll GetOperation."""

    def WaitOperation(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "WaitOperation is not implemented")


@on_both_clients
def test_metadata_goes_with_get_polls_too(kind: str) -> None:
    """Against a server without WaitOperation, every GetOperation poll carries the metadata."""
    identify = Identify()
    manager = lrofw.Manager()
    # The op is made without a principal: the authorize hook lets alice see it.
    operations = NoWaitOperations(
        manager, identify=identify, authorize=lambda who, _owner: who == "alice"
    )
    with raw_served(operations=operations, manager=manager) as srv:
        op = srv.manager.new_operation()
        srv.manager.set_result(op.name, Response(installed_image="R1"))
        with client(kind, srv) as c:
            fut = c.future(op.name, metadata=ALICE)
            assert c.call(fut, "result", LONG) == Response(installed_image="R1")
            polls = len(identify.seen)
            with pytest.raises(errors.Unauthenticated):
                c.wait(op.name, timeout=LONG)
    assert polls >= 1
    assert identify.seen[:polls] == ["alice"] * polls
    assert identify.seen[polls:] == [None]


# --- one timeout rule -----------------------------------------------------------------------------

BAD_TIMEOUTS: list[tuple[Any, type[Exception], str]] = [
    (-1, ValueError, "timeout must not be negative, got -1"),
    (-0.5, ValueError, "timeout must not be negative, got -0.5"),
    (math.nan, ValueError, "got nan"),
    ("5", TypeError, "timeout must be a number of seconds or None, got str"),
    (True, TypeError, "got bool"),
    (datetime.timedelta(seconds=5), TypeError, "got timedelta"),
]


@on_both_clients
@pytest.mark.parametrize(("timeout", "error", "message"), BAD_TIMEOUTS)
def test_every_wait_refuses_the_same_bad_timeouts(
    kind: str, timeout: Any, error: type[Exception], message: str
) -> None:
    """wait, future.wait/result/exception (even on a done future) and Manager.wait/wait_async
    refuse a negative, NaN or non-number timeout with the same error and message."""
    with provisioner() as (srv, _), client(kind, srv) as c:
        op = start(srv, "quick")
        done = c.wait(op.name, timeout=LONG)
        calls: list[Callable[[], Any]] = [
            lambda: c.wait(op.name, timeout=timeout),
            lambda: c.call(c.future(done), "wait", timeout),
            lambda: c.call(c.future(op.name), "result", timeout),
            lambda: c.call(c.future(op.name), "exception", timeout),
            lambda: srv.manager.wait(op.name, timeout),
            lambda: asyncio.run(srv.manager.wait_async(op.name, timeout)),
        ]
        for call in calls:
            with pytest.raises(error) as info:
                call()
            assert message in str(info.value)


@on_both_clients
def test_timeout_zero_looks_once_and_each_wait_answers_by_its_rule(kind: str) -> None:
    """timeout=0 on a running op: Manager.wait returns it not done, future.wait False, lrofw.wait
    and future.result raise OperationTimeout carrying the latest state."""
    with provisioner() as (srv, _), client(kind, srv) as c:
        op = start(srv, "slow-1")
        assert srv.manager.wait(op.name, 0).done is False
        assert asyncio.run(srv.manager.wait_async(op.name, 0)).done is False
        fut = c.future(op.name)
        assert c.call(fut, "wait", 0) is False
        assert fut.metadata == Metadata(stage="flashing", percent=40)
        for call in (lambda: c.wait(op.name, timeout=0), lambda: c.call(fut, "result", 0)):
            with pytest.raises(lrofw.OperationTimeout) as info:
                call()
            assert info.value.operation is not None
            assert info.value.operation.name == op.name
            assert not info.value.operation.done
        with pytest.raises(lrofw.OperationTimeout):
            c.call(fut, "exception", 0)


@on_both_clients
@pytest.mark.parametrize("timeout", [None, math.inf, 0])
def test_no_limit_and_zero_timeouts_return_a_done_operation(kind: str, timeout: Any) -> None:
    """None and math.inf mean no limit, and 0 still sees an op that is already done."""
    with provisioner() as (srv, _), client(kind, srv) as c:
        op = start(srv, "quick")
        srv.manager.wait(op.name, LONG)
        assert srv.manager.wait(op.name, timeout).done
        assert asyncio.run(srv.manager.wait_async(op.name, timeout)).done
        assert c.wait(op.name, timeout=timeout).done
        assert c.call(c.future(op.name), "wait", timeout) is True
        assert c.call(c.future(op.name), "result", timeout) == Response(installed_image="R120")
