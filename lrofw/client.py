"""Clients: :func:`wait` and :class:`OperationFuture`, for any server of google.longrunning.

Each decision (which call next, how long to ask the server to hold, how long to pause, when to
give up, which errors to retry) is made by :func:`wait_plan`, a generator that yields actions and
is sent their results; the sync driver here and the asyncio one only carry them out.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from google.longrunning import operations_pb2_grpc
from google.longrunning import operations_proto_pb2 as operations_pb2
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from . import _check, _core, errors
from ._client_args import CallMetadata, call_metadata, check_message_class, check_name

Operation = operations_pb2.Operation

#: The message class a future's ``result()`` returns: ``OperationFuture[ProvisionDutResponse]``.
ResponseT = TypeVar("ResponseT", bound=Message)


@dataclass(frozen=True)
class WaitPolicy:
    """Timings of :func:`wait`. The defaults suit most servers.

    Attributes:
        hold: the longest single WaitOperation asked for, in seconds.
        first_pause: the first pause after a wait that came back early and not done, or an
            UNAVAILABLE, or a poll; pauses grow by ``multiplier`` up to ``max_pause``, with jitter.
        rpc_grace: extra time on each RPC's deadline beyond the hold asked for, when there is
            no timeout; with one, an RPC's deadline is at most ``late_answer`` past it.
    """

    hold: float = 60.0
    first_pause: float = 0.05
    multiplier: float = 2.0
    max_pause: float = 2.0
    rpc_grace: float = 5.0
    late_answer: float = 0.25


DEFAULT_POLICY = WaitPolicy()


@dataclass(frozen=True)
class Call:
    """Action: make one RPC. ``method`` is "wait" (WaitOperation) or "get" (GetOperation)."""

    method: str
    hold: float
    deadline: float


@dataclass(frozen=True)
class Sleep:
    """Action: pause before the next call."""

    seconds: float


Action = Call | Sleep


#: Errors a wait retries (with backoff, within its timeout): a server stopping, draining,
#: restarting or unreachable answers UNAVAILABLE; a call it accepted but had not dispatched
#: when it stopped comes back CANCELLED (grpc/grpc#41785); an RPC deadline passes when a server
#: does not answer in time. Waiting is idempotent, so asking again is always safe.
_RETRIED = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)


def _backoff(pause: float, policy: WaitPolicy, jitter: Callable[[], float]) -> tuple[float, float]:
    """This pause (jittered to 50-100%) and the next, longer one."""
    return pause * (0.5 + jitter() / 2), min(pause * policy.multiplier, policy.max_pause)


def wait_plan(
    name: str,
    timeout: float | None,
    *,
    policy: WaitPolicy = DEFAULT_POLICY,
    clock: Callable[[], float] = time.monotonic,
    jitter: Callable[[], float] = random.random,
) -> Generator[Action, object, Operation]:
    """Decide every step of waiting for ``name``: yields :class:`Call` (send back the Operation or
    the ``grpc.RpcError``) and :class:`Sleep` (send back None); returns the done Operation.

    Raises:
        OperationTimeout: ``timeout`` passed first (carrying the latest state seen).
        OperationError: the server answered an error that waiting longer will not mend.
    """
    timeout = _check.timeout(timeout)
    if not isinstance(policy, WaitPolicy):
        raise TypeError(f"policy must be a lrofw.WaitPolicy, got {type(policy).__name__}")
    end = None if timeout is None else clock() + timeout
    method = "wait"
    pause = policy.first_pause
    latest: Operation | None = None
    while True:
        left = None if end is None else max(0.0, end - clock())
        hold = policy.hold if left is None else min(left, policy.hold)
        started = clock()
        # The RPC's own deadline leaves room for the answer, but never runs far past the
        # caller's timeout (a server may ignore the hold it was asked for).
        deadline = hold + policy.rpc_grace
        if left is not None:
            deadline = min(deadline, left + policy.late_answer)
        result = yield Call(method, hold, deadline)
        held = clock() - started
        if isinstance(result, Operation):
            if result.done:
                return result
            latest = result
            # A wait the server held for what we asked (or a good while) needs no pause; one
            # that came back early (a busy server, a best-effort answer) must not be retried
            # at once, or a client spins.
            if method == "wait" and held >= min(hold, 1.0) * 0.9:
                pause = policy.first_pause
                delay = 0.0
            else:
                delay, pause = _backoff(pause, policy, jitter)
        else:
            code = getattr(result, "code", lambda: None)()
            if code is grpc.StatusCode.UNIMPLEMENTED and method == "wait":
                method, delay = "get", 0.0  # a server without WaitOperation: poll GetOperation
            elif code in _RETRIED:
                delay, pause = _backoff(pause, policy, jitter)
            elif isinstance(result, grpc.RpcError):
                raise errors.from_rpc_error(result) from result
            else:
                raise TypeError(f"wait_plan was sent {result!r}")
        if end is not None:
            remaining = end - clock()
            if remaining <= 0:
                raise errors.OperationTimeout(f"{name} was not done after {timeout:g} s", latest)
            # A pause that would cross the deadline ends at it, for one last look.
            delay = min(delay, remaining)
        if delay > 0:
            yield Sleep(delay)


def advance(plan: Generator[Action, object, Operation], result: object) -> Action | Operation:
    """Send ``result`` to a :func:`wait_plan` (None to start it): its next action, or the done
    Operation once it has one. The sync and asyncio drivers both step the plan with it."""
    try:
        return plan.send(result)
    except StopIteration as stop:
        op: Operation = stop.value
        return op


def _is_channel(value: object) -> bool:
    """A grpc channel, or anything that makes calls as one does (a wrapper, say)."""
    return callable(getattr(value, "unary_unary", None))


def _stub(channel_or_stub: Any, what: str = "channel_or_stub") -> Any:
    """An OperationsStub for a channel (made once per channel: making one costs more than a
    wait's own work), or the stub given; TypeError for anything else."""
    if hasattr(channel_or_stub, "WaitOperation"):
        return channel_or_stub
    if not _is_channel(channel_or_stub):
        raise TypeError(
            f"{what} must be a grpc channel (grpc.insecure_channel(target), say) or an "
            f"OperationsStub, got {_check.shown(channel_or_stub)}"
        )
    stub = getattr(channel_or_stub, "_lrofw_operations_stub", None)
    if stub is None:
        stub = operations_pb2_grpc.OperationsStub(channel_or_stub)
        with contextlib.suppress(AttributeError):  # a channel that takes no attributes
            channel_or_stub._lrofw_operations_stub = stub
    return stub


def _duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def rpc_of(stub: Any, call: Call) -> Any:
    """The stub method for one :class:`Call` of :func:`wait_plan`."""
    return stub.WaitOperation if call.method == "wait" else stub.GetOperation


def request_for(call: Call, name: str) -> Message:
    """The request message for one :class:`Call` of :func:`wait_plan`."""
    if call.method == "wait":
        return operations_pb2.WaitOperationRequest(name=name, timeout=_duration(call.hold))
    return operations_pb2.GetOperationRequest(name=name)


def wait(
    channel_or_stub: Any,
    name: str,
    *,
    timeout: float | None = None,
    policy: WaitPolicy = DEFAULT_POLICY,
    metadata: CallMetadata | None = None,
) -> Operation:
    """Block until the operation is done and return it (done, with its response or error).

    Loops on WaitOperation (no polling lag), pauses with backoff when a wait comes back early,
    polls GetOperation on servers without WaitOperation, and retries UNAVAILABLE (a server
    stopping, restarting or unreachable; CANCELLED too, grpc/grpc#41785) with backoff within the
    timeout, so a wait rides through a server's drain or restart.

    Args:
        channel_or_stub: a ``grpc.Channel`` or an ``OperationsStub``.
        name: the operation's name.
        timeout: seconds to wait at most: None (or ``math.inf``) no limit, 0 one look; negative
            or NaN is a ValueError, a non-number a TypeError (docs/clients.md#timeouts).
        policy: the timings of holds and pauses (see :class:`WaitPolicy`).
        metadata: gRPC metadata sent with every call, e.g. ``[("x-user", "alice")]``.

    Raises:
        OperationTimeout: not done within ``timeout``; ``.operation`` holds the latest state.
        OperationError: the subclass for the RPC's code (e.g. ``NotFound``), if a call failed.

    Example:
        >>> op = stub.ProvisionDut(request)
        >>> done = lrofw.wait(channel, op.name, timeout=600)
        >>> done.HasField("error")
        False
    """
    stub = _stub(channel_or_stub)
    name, sent = check_name(name), call_metadata(metadata)
    plan = wait_plan(name, timeout, policy=policy)
    step = advance(plan, None)
    while not isinstance(step, Operation):
        step = advance(plan, _carry_out(stub, name, step, sent))
    return step


def _carry_out(stub: Any, name: str, step: Action, metadata: CallMetadata | None) -> object:
    if isinstance(step, Sleep):
        time.sleep(step.seconds)
        return None
    try:
        return rpc_of(stub, step)(
            request_for(step, name), timeout=step.deadline, metadata=metadata
        )
    except grpc.RpcError as exc:
        return exc


# --- futures --------------------------------------------------------------------------------------


def result_of(op: Operation, response_type: type[ResponseT]) -> ResponseT:
    """The response of a done operation, or raise its error as the OperationError subclass."""
    if op.HasField("error"):
        raise errors.from_status(op.error)
    return _core.unpack(op.response, response_type)


def metadata_of(op: Operation, metadata_type: type[Message] | None) -> Message | None:
    """The operation's metadata unpacked, or None when it has none or no type was given."""
    if metadata_type is None or not op.HasField("metadata"):
        return None
    return _core.unpack(op.metadata, metadata_type)


class FutureState(Generic[ResponseT]):
    """What the sync and asyncio futures share: the latest operation and every decision about it
    (done, cancelled, result, error, metadata); the subclasses only wait and call.

    Example:
        ``lrofw.OperationFuture`` and ``lrofw.aio.OperationFuture`` derive from it.
    """

    def __init__(
        self,
        channel: Any,
        operation: Operation | str,
        response_type: type[ResponseT],
        metadata_type: type[Message] | None = None,
        *,
        metadata: CallMetadata | None = None,
    ) -> None:
        self._stub = _stub(channel, "channel")
        if isinstance(operation, Operation):
            self._op = _core.copy(operation)
            check_name(self._op.name)
        elif isinstance(operation, str):
            self._op = Operation(name=check_name(operation))  # its state unknown until asked
        else:
            raise TypeError(
                "operation must be an Operation or an operation's name (str), "
                f"got {type(operation).__name__}"
            )
        check_message_class(response_type, "response_type")
        if metadata_type is not None:
            check_message_class(metadata_type, "metadata_type")
        self._response_type = response_type
        self._metadata_type = metadata_type
        self._sent = call_metadata(metadata)
        self._failure: Exception | None = None
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Any], object]] = []
        self._watcher: object = None  # the thread or task that waits for the callbacks

    @property
    def name(self) -> str:
        """The operation's name."""
        return self._op.name

    @property
    def operation(self) -> Operation:
        """The latest Operation seen (a copy); made from a name, only the name until asked."""
        return _core.copy(self._op)

    @property
    def metadata(self) -> Message | None:
        """The latest progress metadata seen (refreshed by ``wait``, ``done`` and ``result``).
        Not the gRPC ``metadata=`` the future sends: that is :attr:`call_metadata`."""
        return metadata_of(self._op, self._metadata_type)

    @property
    def call_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The gRPC metadata sent with every call this future makes (``metadata=``)."""
        return self._sent or ()

    def cancelled(self) -> bool:
        """True if the operation is done with CANCELLED (code 1)."""
        return self._op.done and self._op.error.code == grpc.StatusCode.CANCELLED.value[0]

    def _seen(self, op: object) -> None:
        """Keep ``op`` (the answer of a wait, or the latest state a timeout carried)."""
        if isinstance(op, Operation) and not self._op.done:
            self._op = op

    def _settled(self) -> bool:
        """Done, or unable ever to finish (callbacks run then)."""
        return self._op.done or self._failure is not None

    def _result(self, done: bool, timeout: float | None) -> ResponseT:
        if not done:
            raise errors.OperationTimeout(
                f"{self.name} was not done after {timeout:g} s", self.operation
            )
        return result_of(self._op, self._response_type)

    def _error(self, done: bool, timeout: float | None) -> errors.OperationError | None:
        try:
            self._result(done, timeout)
        except errors.OperationTimeout:
            raise
        except errors.OperationError as exc:
            return exc
        return None

    @staticmethod
    def _cancel_request(name: str) -> operations_pb2.CancelOperationRequest:
        return operations_pb2.CancelOperationRequest(name=name)


class OperationFuture(FutureState[ResponseT]):
    """A future for one operation, over any google.longrunning server; generic in the response
    type: ``OperationFuture[ProvisionDutResponse]``, whose ``result()`` is typed as it.

    Args:
        channel: the channel to the server (or an ``OperationsStub``).
        operation: the Operation the creating RPC returned, or an operation's name (a str, e.g.
            one saved earlier): then nothing is known of it until a ``wait``, ``done``,
            ``running`` or ``result`` asks the server.
        response_type: the message class of the result.
        metadata_type: the message class of progress metadata, if any.
        metadata: gRPC metadata sent with every call the future makes (WaitOperation,
            GetOperation, CancelOperation), as a stub's ``metadata=``; not :attr:`metadata`,
            which is the operation's progress.

    Raises:
        TypeError: ``channel``, ``operation``, a type or ``metadata`` of the wrong kind.
        ValueError: an empty name, or a metadata key gRPC refuses.

    Timeouts follow one rule (docs/clients.md#timeouts): ``wait`` answers False, ``result`` and
    ``exception`` raise :class:`~lrofw.OperationTimeout`.

    Example:
        >>> op = stub.ProvisionDut(tls_pb2.ProvisionDutRequest(name="some host"))
        >>> fut = lrofw.OperationFuture(channel, op, tls_pb2.ProvisionDutResponse,
        ...                             metadata_type=tls_pb2.ProvisionDutMetadata)
        >>> while not fut.wait(timeout=1.0):
        ...     print(fut.metadata)
        >>> fut.result()
        >>> later = lrofw.OperationFuture(channel, op.name, tls_pb2.ProvisionDutResponse)
    """

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the operation; True if it is done, False if
        ``timeout`` passed first (0: ask once; None: no limit).

        Example:
            >>> while not fut.wait(timeout=1.0):
            ...     show(fut.metadata)
        """
        timeout = _check.timeout(timeout)
        if not self._op.done:
            try:
                self._seen(wait(self._stub, self.name, timeout=timeout, metadata=self._sent))
            except errors.OperationTimeout as exc:
                self._seen(exc.operation)
            if self._op.done:
                self._run_callbacks()
        return self._op.done

    def done(self) -> bool:
        """True if the operation is done (asks the server once if not known yet)."""
        return self.wait(timeout=0)

    def running(self) -> bool:
        """True while the operation is not done: ``not done()``, asking the server once if not
        known yet. As in ``concurrent.futures``, a cancelled operation is not running (it is
        done, with CANCELLED); a client cannot tell a queued operation from one that runs.

        Example:
            >>> if fut.running():
            ...     fut.cancel()
        """
        return not self.done()

    def result(self, timeout: float | None = None) -> ResponseT:
        """The response; raises the operation's error as an OperationError subclass.

        Raises:
            OperationTimeout: not done within ``timeout``.
            OperationError: the operation failed, e.g. ``NotFound``, ``OperationCancelled``.
        """
        return self._result(self.wait(timeout), timeout)

    def exception(self, timeout: float | None = None) -> errors.OperationError | None:
        """The operation's error as an OperationError, or None if it succeeded."""
        return self._error(self.wait(timeout), timeout)

    def cancel(self) -> bool:
        """Ask the server to cancel; True if the operation ended cancelled."""
        if not self._op.done:
            try:
                self._stub.CancelOperation(self._cancel_request(self.name), metadata=self._sent)
            except grpc.RpcError as exc:
                raise errors.from_rpc_error(exc) from exc
            self.done()
        return self.cancelled()

    def add_done_callback(self, fn: Callable[[OperationFuture[ResponseT]], object]) -> None:
        """Call ``fn(self)`` once the operation is done (at once if it already is), from a
        background thread that waits with WaitOperation. If the operation can no longer finish
        (it was deleted, or waiting failed for good) the callbacks run too; ``result()`` then
        raises why."""
        with self._lock:
            if not self._settled():
                self._callbacks.append(fn)
                if self._watcher is None:
                    self._watcher = threading.Thread(target=self._watch, daemon=True)
                    self._watcher.start()
                return
        fn(self)

    def _watch(self) -> None:
        try:
            self.wait()
        except Exception as exc:
            # The op can no longer finish (deleted, say): the future is settled without being
            # done, so callbacks run now and later ones at once; result() raises the error.
            self._failure = exc
        self._run_callbacks()

    def _run_callbacks(self) -> None:
        with self._lock:
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)
