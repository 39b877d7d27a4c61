"""Tests for lrofw.client: the wait_plan decision core, wait, and OperationFuture."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import tls_pb2
from factories import (
    Metadata,
    Provisioner,
    Response,
    WaitWatchingManager,
    create,
    ops_stub,
    raw_served,
)
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import any_pb2

import lrofw
from lrofw import errors
from lrofw.client import DEFAULT_POLICY, Call, Sleep, WaitPolicy, wait_plan
from lrofw.testing import Served, serve

NAME = "operations/test"
Plan = Generator[Any, object, operations_pb2.Operation]


# --- helpers ----------------------------------------------------------------------------------


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeRpcError(grpc.RpcError):
    """A failed RPC as the client library raises it: a code and details."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def pending(stage: str = "") -> operations_pb2.Operation:
    """Returns an unfinished Operation, optionally with metadata naming a stage."""
    op = operations_pb2.Operation(name=NAME)
    if stage:
        op.metadata.Pack(tls_pb2.ProvisionDutMetadata(stage=stage))
    return op


def finished(image: str = "img") -> operations_pb2.Operation:
    """Returns a done Operation with a ProvisionDutResponse."""
    op = operations_pb2.Operation(name=NAME, done=True)
    op.response.Pack(tls_pb2.ProvisionDutResponse(installed_image=image))
    return op


def plan_for(
    timeout: float | None,
    clock: FakeClock,
    *,
    jitter: Callable[[], float] = lambda: 1.0,
    policy: WaitPolicy | None = None,
) -> Plan:
    """Starts a wait_plan driven by a fake clock and fixed jitter."""
    return wait_plan(NAME, timeout, policy=policy or WaitPolicy(), clock=clock, jitter=jitter)


def reply(plan: Plan, clock: FakeClock, result: object, held: float = 0.0) -> Any:
    """Lets ``held`` seconds pass during the call, sends its result, returns the next action."""
    clock.advance(held)
    return plan.send(result)


def slept(plan: Plan, clock: FakeClock, action: Any) -> Any:
    """Carries out a Sleep on the fake clock and returns the next action."""
    assert isinstance(action, Sleep)
    clock.advance(action.seconds)
    return plan.send(None)


# --- wait_plan ----------------------------------------------------------------------------------


def test_plan_first_call_waits_with_the_timeout_as_hold() -> None:
    """The first action is a WaitOperation holding for the timeout; its deadline is just past it."""
    clock = FakeClock()
    plan = plan_for(10.0, clock)
    assert next(plan) == Call("wait", 10.0, 10.0 + DEFAULT_POLICY.late_answer)


def test_plan_returns_the_done_operation() -> None:
    """Sending a done Operation ends the plan with that Operation."""
    clock = FakeClock()
    plan = plan_for(10.0, clock)
    next(plan)
    done = finished("R120")
    with pytest.raises(StopIteration) as stop:
        reply(plan, clock, done, held=0.2)
    assert stop.value.value == done


def test_plan_full_hold_not_done_calls_again_without_sleep() -> None:
    """A not-done wait the server held for the whole hold is followed at once by another call."""
    clock = FakeClock()
    policy = WaitPolicy(hold=5.0)
    plan = plan_for(None, clock, policy=policy)
    first = next(plan)
    assert first == Call("wait", 5.0, 10.0)
    assert reply(plan, clock, pending(), held=5.0) == Call("wait", 5.0, 10.0)


def test_plan_early_return_sleeps_with_growing_capped_pauses() -> None:
    """Early not-done answers pause first_pause, x2 each time, capped at max_pause."""
    clock = FakeClock()
    policy = WaitPolicy(hold=5.0, first_pause=0.05, multiplier=2.0, max_pause=1.0)
    plan = plan_for(None, clock, policy=policy)
    action = next(plan)
    pauses = []
    for _ in range(8):
        action = reply(plan, clock, pending(), held=0.001)
        assert isinstance(action, Sleep)
        pauses.append(action.seconds)
        action = slept(plan, clock, action)
        assert action == Call("wait", 5.0, 10.0)
    assert pauses == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_plan_pause_resets_after_a_full_hold() -> None:
    """After a wait that was held fully, the next early answer pauses first_pause again."""
    clock = FakeClock()
    policy = WaitPolicy(hold=5.0, first_pause=0.05)
    plan = plan_for(None, clock, policy=policy)
    next(plan)
    slept(plan, clock, reply(plan, clock, pending()))
    second = reply(plan, clock, pending())
    assert second == Sleep(pytest.approx(0.1))
    assert isinstance(slept(plan, clock, second), Call)
    assert isinstance(reply(plan, clock, pending(), held=5.0), Call)
    assert reply(plan, clock, pending()) == Sleep(pytest.approx(0.05))


@pytest.mark.parametrize(("jitter", "fraction"), [(0.0, 0.5), (0.5, 0.75), (1.0, 1.0)])
def test_plan_jitter_scales_the_pause_between_half_and_full(jitter: float, fraction: float) -> None:
    """A jitter draw j gives a pause of (0.5 + j/2) times the base pause."""
    clock = FakeClock()
    policy = WaitPolicy(first_pause=0.2)
    plan = plan_for(None, clock, jitter=lambda: jitter, policy=policy)
    next(plan)
    assert reply(plan, clock, pending()) == Sleep(pytest.approx(0.2 * fraction))


def test_plan_random_jitter_stays_within_half_to_full() -> None:
    """With random jitter every pause lies in [50%, 100%] of its base pause."""
    clock = FakeClock()
    policy = WaitPolicy(first_pause=0.05, multiplier=2.0, max_pause=2.0)
    plan = plan_for(None, clock, jitter=random.Random(7).random, policy=policy)
    next(plan)
    base = 0.05
    seen = set()
    for _ in range(30):
        action = reply(plan, clock, pending())
        assert isinstance(action, Sleep)
        assert base * 0.5 <= action.seconds <= base
        seen.add(round(action.seconds / base, 6))
        slept(plan, clock, action)
        base = min(base * 2.0, 2.0)
    assert len(seen) > 1  # the jitter really varied the pauses


def test_plan_unimplemented_wait_switches_to_get() -> None:
    """UNIMPLEMENTED on WaitOperation switches to GetOperation at once, then polls with pauses."""
    clock = FakeClock()
    plan = plan_for(None, clock, policy=WaitPolicy(hold=5.0, first_pause=0.05))
    assert next(plan).method == "wait"
    get = reply(plan, clock, FakeRpcError(grpc.StatusCode.UNIMPLEMENTED, "no wait"))
    assert isinstance(get, Call)
    assert get.method == "get"
    # A poll answers at once and is never "held": it must pause before the next poll.
    pause = reply(plan, clock, pending(), held=5.0)
    assert pause == Sleep(pytest.approx(0.05))
    assert slept(plan, clock, pause).method == "get"
    with pytest.raises(StopIteration) as stop:
        reply(plan, clock, finished())
    assert stop.value.value.done


def test_plan_unimplemented_get_raises() -> None:
    """UNIMPLEMENTED on GetOperation too is an error, not another switch."""
    clock = FakeClock()
    plan = plan_for(None, clock)
    next(plan)
    reply(plan, clock, FakeRpcError(grpc.StatusCode.UNIMPLEMENTED))
    with pytest.raises(errors.Unimplemented):
        reply(plan, clock, FakeRpcError(grpc.StatusCode.UNIMPLEMENTED, "no get"))


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED],
)
def test_plan_transient_error_backs_off_then_retries(code: grpc.StatusCode) -> None:
    """UNAVAILABLE (CANCELLED: grpc/grpc#41785; DEADLINE_EXCEEDED) pause with backoff, then wait
    again."""
    clock = FakeClock()
    plan = plan_for(None, clock, policy=WaitPolicy(hold=5.0, first_pause=0.05))
    next(plan)
    first = reply(plan, clock, FakeRpcError(code))
    assert first == Sleep(pytest.approx(0.05))
    assert slept(plan, clock, first) == Call("wait", 5.0, 10.0)
    second = reply(plan, clock, FakeRpcError(code))
    assert second == Sleep(pytest.approx(0.1))
    assert slept(plan, clock, second).method == "wait"


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.INTERNAL, errors.Internal),
    ],
)
def test_plan_other_errors_raise_their_class_with_cause(
    code: grpc.StatusCode, cls: type[errors.OperationError]
) -> None:
    """Any other code raises the OperationError subclass for it, chained to the RpcError."""
    clock = FakeClock()
    plan = plan_for(10.0, clock)
    next(plan)
    rpc_error = FakeRpcError(code, "operation operations/test not found")
    with pytest.raises(cls) as info:
        reply(plan, clock, rpc_error)
    assert info.value.code is code
    assert info.value.message == "operation operations/test not found"
    assert info.value.__cause__ is rpc_error


def test_plan_rejects_something_that_is_neither_op_nor_error() -> None:
    """Sending anything but an Operation or an RpcError is a TypeError."""
    clock = FakeClock()
    plan = plan_for(10.0, clock)
    next(plan)
    with pytest.raises(TypeError):
        plan.send("not an operation")


def test_plan_timeout_raises_with_the_latest_operation() -> None:
    """When the time is up the plan raises OperationTimeout carrying the latest state seen."""
    clock = FakeClock()
    plan = plan_for(2.0, clock)
    next(plan)
    action = reply(plan, clock, pending("downloading"), held=1.5)
    assert action == Call("wait", pytest.approx(0.5), pytest.approx(0.75))
    latest = pending("flashing")
    with pytest.raises(errors.OperationTimeout) as info:
        reply(plan, clock, latest, held=0.5)
    assert isinstance(info.value, TimeoutError)
    assert info.value.operation == latest


def test_plan_timeout_after_an_error_keeps_the_last_operation() -> None:
    """A timeout reached on an UNAVAILABLE still carries the last Operation the server sent."""
    clock = FakeClock()
    plan = plan_for(1.0, clock)
    next(plan)
    latest = pending("flashing")
    action = slept(plan, clock, reply(plan, clock, latest))
    assert isinstance(action, Call)
    with pytest.raises(errors.OperationTimeout) as info:
        reply(plan, clock, FakeRpcError(grpc.StatusCode.UNAVAILABLE), held=1.0)
    assert info.value.operation == latest


def test_plan_never_sleeps_past_the_timeout() -> None:
    """A pause that would cross the deadline ends at it, for one last look with hold 0."""
    clock = FakeClock()
    plan = plan_for(0.3, clock, policy=WaitPolicy(first_pause=1.0))
    next(plan)
    action = reply(plan, clock, pending())
    assert isinstance(action, Sleep)
    assert action.seconds == pytest.approx(0.3)
    last = slept(plan, clock, action)
    assert isinstance(last, Call)
    assert last.hold == 0.0
    with pytest.raises(errors.OperationTimeout):
        reply(plan, clock, pending())


def test_plan_last_look_at_the_deadline_can_still_succeed() -> None:
    """An op that finished during the final pause is returned, not timed out."""
    clock = FakeClock()
    plan = plan_for(0.3, clock, policy=WaitPolicy(first_pause=1.0))
    next(plan)
    slept(plan, clock, reply(plan, clock, pending()))
    done = operations_pb2.Operation(name=NAME, done=True)
    with pytest.raises(StopIteration) as stop:
        plan.send(done)
    assert stop.value.value == done


def test_plan_timeout_zero_makes_exactly_one_call() -> None:
    """timeout=0 asks once (hold 0) and then raises OperationTimeout."""
    clock = FakeClock()
    plan = plan_for(0.0, clock)
    assert next(plan) == Call("wait", 0.0, DEFAULT_POLICY.late_answer)
    with pytest.raises(errors.OperationTimeout) as info:
        reply(plan, clock, pending("queued"))
    assert info.value.operation == pending("queued")


def test_plan_timeout_zero_returns_an_already_done_operation() -> None:
    """timeout=0 still returns the operation when the one call finds it done."""
    clock = FakeClock()
    plan = plan_for(0.0, clock)
    next(plan)
    with pytest.raises(StopIteration) as stop:
        reply(plan, clock, finished())
    assert stop.value.value == finished()


def test_plan_negative_timeout_is_a_value_error() -> None:
    """A negative timeout is refused before any call."""
    with pytest.raises(ValueError, match="negative"):
        next(plan_for(-0.5, FakeClock()))


def test_plan_hold_never_exceeds_the_time_left() -> None:
    """Every Call's hold is at most the policy's hold and the time left before the timeout."""
    clock = FakeClock()
    policy = WaitPolicy(hold=3.0, first_pause=0.05, rpc_grace=5.0)
    timeout = 10.0
    end = clock() + timeout
    plan = plan_for(timeout, clock, jitter=random.Random(3).random, policy=policy)
    helds = random.Random(11)
    holds = []
    action = next(plan)
    with pytest.raises(errors.OperationTimeout):
        for _ in range(1000):
            if isinstance(action, Sleep):
                action = slept(plan, clock, action)
                continue
            assert action.hold <= min(policy.hold, end - clock())
            left = end - clock()
            assert action.deadline == pytest.approx(
                min(action.hold + policy.rpc_grace, left + policy.late_answer)
            )
            holds.append(action.hold)
            action = reply(plan, clock, pending(), held=action.hold * helds.random())
    assert max(holds) == policy.hold  # the policy's cap was reached ...
    assert min(holds) < policy.hold  # ... and the time left limited a later hold
    assert clock() <= end


# --- wait over a real server ------------------------------------------------------------------


def finish_later(manager: lrofw.Manager, name: str, when: threading.Event) -> threading.Thread:
    """Starts a thread that finishes ``name`` with a response once ``when`` is set."""

    def run() -> None:
        if when.wait(30):
            manager.set_result(name, tls_pb2.ProvisionDutResponse(installed_image="R120"))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_wait_returns_done_op_finished_from_another_thread() -> None:
    """wait returns promptly once another thread finishes the op while the wait is held."""
    manager = WaitWatchingManager()
    with serve(manager=manager) as srv:
        op = manager.new_operation()
        thread = finish_later(manager, op.name, manager.waiting)
        started = time.monotonic()
        done = lrofw.wait(srv.channel, op.name, timeout=20)
        elapsed = time.monotonic() - started
        thread.join(5)
    assert done.done
    assert done.name == op.name
    response = tls_pb2.ProvisionDutResponse()
    assert done.response.Unpack(response)
    assert response.installed_image == "R120"
    assert elapsed < 5  # no polling lag: the held wait was woken


def test_wait_times_out_with_the_latest_state() -> None:
    """An op not done in time raises OperationTimeout (a TimeoutError) with its latest state."""
    with serve() as srv:
        op = srv.manager.new_operation(metadata=tls_pb2.ProvisionDutMetadata(stage="queued"))
        srv.manager.set_metadata(op.name, tls_pb2.ProvisionDutMetadata(stage="flashing"))
        with pytest.raises(lrofw.OperationTimeout) as info:
            lrofw.wait(srv.channel, op.name, timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    latest = info.value.operation
    assert isinstance(latest, operations_pb2.Operation)
    assert latest.name == op.name
    assert not latest.done
    metadata = tls_pb2.ProvisionDutMetadata()
    assert latest.metadata.Unpack(metadata)
    assert metadata.stage == "flashing"


def test_wait_timeout_zero_on_running_op_times_out() -> None:
    """timeout=0 on an unfinished op raises OperationTimeout at once."""
    with serve() as srv:
        op = srv.manager.new_operation()
        with pytest.raises(lrofw.OperationTimeout) as info:
            lrofw.wait(srv.channel, op.name, timeout=0)
    assert info.value.operation.name == op.name


def test_wait_negative_timeout_is_a_value_error() -> None:
    """wait refuses a negative timeout."""
    with serve() as srv, pytest.raises(ValueError):
        lrofw.wait(srv.channel, "operations/x", timeout=-1)


def test_wait_unknown_operation_is_not_found() -> None:
    """An unknown name raises lrofw.errors.NotFound, chained to the RpcError."""
    with serve() as srv, pytest.raises(errors.NotFound) as info:
        lrofw.wait(srv.channel, "operations/does-not-exist", timeout=10)
    assert isinstance(info.value, lrofw.OperationError)
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    assert "operations/does-not-exist" in info.value.message
    assert isinstance(info.value.__cause__, grpc.RpcError)


@pytest.mark.parametrize("via", ["channel", "stub"])
def test_wait_accepts_a_channel_or_a_stub(via: str) -> None:
    """wait works given a grpc channel or an OperationsStub."""
    with serve() as srv:
        op = srv.manager.new_operation()
        srv.manager.set_error(op.name, lrofw.OperationError(grpc.StatusCode.ABORTED, "stopped"))
        target = (
            srv.channel if via == "channel" else operations_pb2_grpc.OperationsStub(srv.channel)
        )
        done = lrofw.wait(target, op.name, timeout=10)
    assert done.done
    assert done.error.code == grpc.StatusCode.ABORTED.value[0]
    assert done.error.message == "stopped"


class CountingServicer(lrofw.OperationsServicer):
    """OperationsServicer that counts calls; subclasses change WaitOperation."""

    def __init__(self, manager: lrofw.Manager) -> None:
        super().__init__(manager)
        self.lock = threading.Lock()
        self.waits = 0
        self.gets = 0
        self.got = threading.Event()

    def count_wait(self) -> int:
        with self.lock:
            self.waits += 1
            return self.waits

    def GetOperation(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            self.gets += 1
        self.got.set()
        return super().GetOperation(request, context)


class NoWaitServicer(CountingServicer):
    """A server without WaitOperation."""

    def WaitOperation(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.count_wait()
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "WaitOperation is not implemented")


class EagerServicer(CountingServicer):
    """A best-effort WaitOperation that answers at once with the current state."""

    def WaitOperation(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.count_wait()
        return super().GetOperation(request, context)


class FlakyServicer(CountingServicer):
    """A WaitOperation that fails UNAVAILABLE twice, then works."""

    def WaitOperation(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self.count_wait() <= 2:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return super().WaitOperation(request, context)


@dataclass
class Custom:
    """A server with a custom Operations servicer: its channel, manager and servicer."""

    channel: grpc.Channel
    manager: lrofw.Manager
    servicer: Any


@contextlib.contextmanager
def custom_server(servicer_class: type[CountingServicer]) -> Iterator[Custom]:
    """Serves ``servicer_class`` over a fresh Manager on localhost:0."""
    manager = lrofw.Manager()
    servicer = servicer_class(manager)
    with raw_served(operations=servicer, manager=manager) as srv:
        yield Custom(srv.channel, manager, servicer)


def test_wait_polls_get_when_wait_is_unimplemented() -> None:
    """Against a server without WaitOperation, wait polls GetOperation and returns the done op."""
    with custom_server(NoWaitServicer) as srv:
        op = srv.manager.new_operation()
        thread = finish_later(srv.manager, op.name, srv.servicer.got)
        done = lrofw.wait(srv.channel, op.name, timeout=20)
        thread.join(5)
    assert done.done
    assert done.HasField("response")
    assert srv.servicer.waits == 1  # it switched after the first UNIMPLEMENTED
    assert srv.servicer.gets >= 1


def test_wait_backs_off_when_wait_returns_early() -> None:
    """A WaitOperation that answers at once, not done, is called a few times, not in a spin."""
    with custom_server(EagerServicer) as srv:
        op = srv.manager.new_operation()
        with pytest.raises(lrofw.OperationTimeout):
            lrofw.wait(srv.channel, op.name, timeout=0.5)
    assert 2 <= srv.servicer.waits < 20


def test_wait_retries_unavailable() -> None:
    """UNAVAILABLE answers are retried with backoff until the wait succeeds."""
    with custom_server(FlakyServicer) as srv:
        op = srv.manager.new_operation()
        srv.manager.set_result(op.name, tls_pb2.ProvisionDutResponse(installed_image="R1"))
        done = lrofw.wait(srv.channel, op.name, timeout=20)
    assert done.done
    assert srv.servicer.waits == 3


# --- OperationFuture ----------------------------------------------------------------------------


@dataclass
class Lab:
    """A served Provisioner: server, servicer and a way to start operations as futures."""

    srv: Served
    servicer: Provisioner

    def start(self, dut: str, image: str = "R120") -> lrofw.OperationFuture:
        """Calls ProvisionDut and wraps the returned Operation in an OperationFuture."""
        op = create(self.srv, dut, image_path=image)
        assert not op.done
        return lrofw.OperationFuture(self.srv.channel, op, Response, metadata_type=Metadata)


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    """Serves a Provisioner; blocked handlers are released before the server stops."""
    servicer = Provisioner()
    with serve(servicer, grace=0.5) as srv:
        try:
            yield Lab(srv, servicer)
        finally:
            servicer.release()


def test_future_result_returns_the_unpacked_response() -> None:
    """result() returns the response message of a successful operation."""
    with lab() as lb:
        fut = lb.start("some host", "R120-15662.0.0")
        result = fut.result(timeout=20)
    assert result == Response(installed_image="R120-15662.0.0")
    assert fut.done()
    assert fut.exception() is None
    assert not fut.cancelled()


def test_future_result_raises_the_handlers_error() -> None:
    """A handler's NOT_FOUND surfaces as lrofw.errors.NotFound from result() and exception()."""
    with lab() as lb:
        fut = lb.start("unknown host")
        with pytest.raises(errors.NotFound) as info:
            fut.result(timeout=20)
        exc = fut.exception()
    assert isinstance(info.value, lrofw.OperationError)
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    assert info.value.message == "Unknown DUT unknown host"
    assert isinstance(exc, errors.NotFound)
    assert exc.message == "Unknown DUT unknown host"
    assert fut.done()
    assert not fut.cancelled()


def test_future_wait_false_then_true_and_done() -> None:
    """wait(timeout) is False while running, True once finished; done() follows."""
    with lab() as lb:
        fut = lb.start("slow host")
        assert lb.servicer.reported.wait(20)
        assert fut.wait(0.1) is False
        assert fut.done() is False
        lb.servicer.release()
        assert fut.wait(20) is True
        assert fut.done() is True
        assert fut.result() == Response(installed_image="R120")


def test_future_metadata_shows_the_reported_progress() -> None:
    """metadata is the handler's latest report, unpacked, once the future has looked."""
    with lab() as lb:
        fut = lb.start("slow host")
        assert lb.servicer.reported.wait(20)
        assert not fut.done()
        metadata = fut.metadata
        operation = fut.operation
    assert metadata == Metadata(stage="flashing", percent=40)
    assert operation.name == fut.name
    assert not operation.done


def test_future_cancel_running_operation() -> None:
    """cancel() on a running op returns True; it is cancelled and result() raises."""
    with lab() as lb:
        fut = lb.start("slow host")
        assert lb.servicer.reported.wait(20)
        assert fut.cancel() is True
        assert fut.cancelled()
        assert fut.done()
        with pytest.raises(lrofw.OperationCancelled) as info:
            fut.result(timeout=5)
        exc = fut.exception(timeout=5)
        server_side = lb.srv.manager.get(fut.name)
        assert lb.servicer.stopped.wait(20)  # the handler was signalled
    assert info.value.code is grpc.StatusCode.CANCELLED
    assert isinstance(exc, lrofw.OperationCancelled)
    assert server_side.error.code == grpc.StatusCode.CANCELLED.value[0]


def test_future_cancel_finished_operation_is_false() -> None:
    """cancel() after success returns False and leaves the result alone."""
    with lab() as lb:
        fut = lb.start("some host")
        assert fut.result(timeout=20) == Response(installed_image="R120")
        assert fut.cancel() is False
        assert not fut.cancelled()
        assert fut.result() == Response(installed_image="R120")


def test_future_done_callback_runs_once_on_completion() -> None:
    """add_done_callback runs the callback once, when the operation finishes."""
    with lab() as lb:
        fut = lb.start("slow host")
        called = threading.Event()
        calls: list[lrofw.OperationFuture] = []

        def callback(f: lrofw.OperationFuture) -> None:
            calls.append(f)
            called.set()

        fut.add_done_callback(callback)
        assert not called.is_set()
        lb.servicer.release()
        assert called.wait(20)
        assert fut.result(timeout=20) == Response(installed_image="R120")
        assert fut.wait(1)
    assert calls == [fut]


def test_future_done_callback_runs_at_once_when_done() -> None:
    """add_done_callback on a finished future calls back at once, in the calling thread."""
    with lab() as lb:
        fut = lb.start("some host")
        fut.result(timeout=20)
        threads: list[threading.Thread] = []
        fut.add_done_callback(lambda f: threads.append(threading.current_thread()))
        assert threads == [threading.current_thread()]


def test_future_result_timeout_on_blocked_op() -> None:
    """result(timeout=0.1) on a blocked op raises OperationTimeout with the latest state."""
    with lab() as lb:
        fut = lb.start("slow host")
        with pytest.raises(lrofw.OperationTimeout) as info:
            fut.result(timeout=0.1)
        with pytest.raises(lrofw.OperationTimeout):
            fut.exception(timeout=0.1)
    assert isinstance(info.value, TimeoutError)
    assert info.value.operation.name == fut.name
    assert not info.value.operation.done


def test_future_accepts_a_stub_and_copies_the_operation() -> None:
    """OperationFuture takes an OperationsStub too, and keeps its own copy of the Operation."""
    with lab() as lb:
        op = create(lb.srv, "some host", image_path="R9")
        fut = lrofw.OperationFuture(ops_stub(lb.srv), op, Response)
        op.name = "operations/changed"
        op.response.CopyFrom(any_pb2.Any())
        assert fut.result(timeout=20) == Response(installed_image="R9")
    assert fut.name != "operations/changed"
    assert fut.metadata is None  # no metadata_type given


def test_future_timeout_hands_out_a_copy_of_the_operation() -> None:
    """The OperationTimeout from result() carries a copy: changing it leaves the future alone."""
    with lab() as lb:
        fut = lb.start("slow host")
        with pytest.raises(lrofw.OperationTimeout) as info:
            fut.result(timeout=0.1)
        info.value.operation.done = True
        assert not fut.operation.done
        assert fut.wait(0.05) is False


def test_future_callback_added_after_the_op_was_deleted_is_not_dropped() -> None:
    """Every callback is called when the watched op is deleted, not only the first one."""
    with serve() as srv:
        op = srv.manager.new_operation()
        fut = lrofw.OperationFuture(srv.channel, op, Response)
        first, second = threading.Event(), threading.Event()
        fut.add_done_callback(lambda f: first.set())
        srv.manager.delete(op.name)
        assert first.wait(20)
        fut.add_done_callback(lambda f: second.set())
        assert second.wait(2)
