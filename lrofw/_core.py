"""Pure decisions on ``google.longrunning.Operation`` messages.

No threads, no I/O, no gRPC server code: everything here is a function of its arguments, so the
sync and asyncio paths, the manager and every store make the same decision the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.longrunning import operations_proto_pb2 as operations_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2

from . import _check, errors

Operation = operations_pb2.Operation
M = TypeVar("M", bound=Message)

#: Longest operation name accepted by the Operations RPCs.
MAX_NAME_LENGTH = 1024
#: The largest metadata ``op.report()`` accepts, serialized (the Manager's default).
MAX_METADATA_BYTES = 1 << 20
#: The largest response a handler may end with, serialized (the Manager's default).
MAX_RESPONSE_BYTES = 2 << 20


def pack(message: Message) -> any_pb2.Any:
    """Pack ``message`` into an ``Any`` (an ``Any`` is returned unchanged)."""
    if isinstance(message, any_pb2.Any):
        return message
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def unpack(packed: any_pb2.Any, message_type: type[M]) -> M:
    """Unpack ``packed`` into a new ``message_type``; TypeError if it holds another type."""
    out = message_type()
    if not packed.Unpack(out):
        raise TypeError(
            f"expected {message_type.DESCRIPTOR.full_name}, got {packed.TypeName() or 'nothing'}"
        )
    return out


def status(code: grpc.StatusCode, message: str) -> status_pb2.Status:
    """Build a ``google.rpc.Status`` from a gRPC code and message."""
    return status_pb2.Status(code=code.value[0], message=message)


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, or None."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def call_on_loop(
    loop: asyncio.AbstractEventLoop, callback: Any, *args: Any, direct: bool = False
) -> None:
    """Have ``loop`` run ``callback(*args)``, from any thread. On that loop's own thread it is
    ``call_soon`` (no wake-up write to the self-pipe), or with ``direct`` a plain call now (for
    callbacks that only settle a future: one turn of the loop fewer); from other threads it is
    ``call_soon_threadsafe``."""
    if running_loop() is not loop:
        loop.call_soon_threadsafe(callback, *args)
    elif direct:
        callback(*args)
    else:
        loop.call_soon(callback, *args)


class _RandomIds:
    """Random (version 4) UUIDs, as :func:`uuid.uuid4` makes them, from ``os.urandom`` bytes
    drawn 256 ids at a time: each ``os.urandom`` call lets go of the GIL, and on a busy server
    getting it back waits behind the other threads (an event loop's writer thread, say)."""

    _BATCH = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = b""
        self._at = 0
        # A child process must not hand out its parent's ids.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()  # the parent may have held it at the fork
        self._pool, self._at = b"", 0

    def __call__(self) -> str:
        with self._lock:
            if self._at == len(self._pool):
                self._pool, self._at = os.urandom(16 * self._BATCH), 0
            raw = self._pool[self._at : self._at + 16]
            self._at += 16
        return str(uuid.UUID(bytes=raw, version=4))


#: A new random UUID's text (``str(uuid.uuid4())``), for operation names.
random_id = _RandomIds()


def copy(op: Operation) -> Operation:
    """Return a deep copy: stored operations are never handed out."""
    out = Operation()
    out.CopyFrom(op)
    return out


def with_metadata(op: Operation, metadata: any_pb2.Any) -> Operation:
    """Return ``op`` with new metadata; the caller checks it is not done."""
    out = copy(op)
    out.metadata.CopyFrom(metadata)
    return out


def finished(
    op: Operation,
    *,
    response: any_pb2.Any | None = None,
    error: status_pb2.Status | None = None,
) -> Operation:
    """Return ``op`` done with exactly one of ``response`` / ``error``.

    Raises:
        ValueError: both or neither were given, or ``op`` is already done (a done op never changes).
    """
    if (response is None) == (error is None):
        raise ValueError("an operation finishes with exactly one of response or error")
    if op.done:
        raise ValueError(f"{op.name} is already done")
    out = copy(op)
    out.done = True
    if response is not None:
        out.response.CopyFrom(response)
    else:
        assert error is not None
        out.error.CopyFrom(error)
    return out


def error_code(op: Operation) -> int:
    """The op's ``error.code``, 0 when it has none (unfinished, or finished with a response)."""
    return op.error.code if op.HasField("error") else 0


# --- from handler outcome to Operation.error (DESIGN section 4) -------------------------------


def about(name: str, method: str = "") -> dict[str, str]:
    """The ``extra`` of a log line about operation ``name`` (of ``method``, "" when unknown):
    its records carry ``operation`` and ``method`` attributes, for structured logging.

    Example:
        >>> logger.warning("%s: completion refused", name, extra=about(name, "/pkg.S/M"))
    """
    return {"operation": name, "method": method}


@dataclass(frozen=True)
class Outcome:
    """What a handler's run turns into: exactly one of ``response`` / ``error``.

    ``log`` is a message for the server log (never sent to clients); ``log_traceback`` says the
    exception's traceback belongs with it.
    """

    response: any_pb2.Any | None = None
    error: status_pb2.Status | None = None
    log: str | None = None
    log_level: int = logging.ERROR
    log_traceback: bool = False


CANCELLED_MESSAGE = "the operation was cancelled"
ABORTED_MESSAGE = "the server stopped before the operation finished"


def cancelled_status(message: str = CANCELLED_MESSAGE) -> status_pb2.Status:
    """The error of a cancelled operation: code 1, as AIP-151 and api-core's cancelled() expect."""
    return status(grpc.StatusCode.CANCELLED, message)


def aborted_status() -> status_pb2.Status:
    """The error of an operation the server stopped before it finished."""
    return status(grpc.StatusCode.ABORTED, ABORTED_MESSAGE)


def deadline_status(timeout: float) -> status_pb2.Status:
    """The error of an operation that ran past its method's own timeout."""
    return status(
        grpc.StatusCode.DEADLINE_EXCEEDED, f"the operation did not finish within {timeout:g} s"
    )


def outcome_of_return(value: object, response_type: type[Message], name: str) -> Outcome:
    """Map a handler's return value: the response type is the result, anything else INTERNAL."""
    if isinstance(value, response_type):
        return Outcome(response=pack(value))
    got = "None" if value is None else type(value).__qualname__
    message = f"handler returned {got}, expected {response_type.DESCRIPTOR.full_name}"
    return Outcome(error=status(grpc.StatusCode.INTERNAL, message), log=f"{name}: {message}")


def outcome_of_exception(exc: BaseException, name: str) -> Outcome:
    """Map an exception raised by a handler to the op's error (DESIGN section 4)."""
    if isinstance(exc, errors.OperationError):
        return Outcome(error=exc.to_status())
    if isinstance(exc, asyncio.CancelledError):
        return Outcome(error=cancelled_status())
    if isinstance(exc, grpc.RpcError):
        err = errors.from_rpc_error(exc)
        return Outcome(
            error=err.to_status(),
            log=f"{name}: a downstream call failed with {err.code.name}",
            log_level=logging.INFO,
        )
    message = f"internal error in operation {name}"
    return Outcome(
        error=status(grpc.StatusCode.INTERNAL, message),
        log=f"{name}: handler raised {type(exc).__qualname__}",
        log_traceback=True,
    )


def internal_outcome(name: str, why: str) -> Outcome:
    """INTERNAL with a safe message, for an outcome that cannot be built or stored."""
    return Outcome(
        error=status(grpc.StatusCode.INTERNAL, f"internal error in operation {name}"),
        log=f"{name}: {why}; it ends with INTERNAL instead",
        log_traceback=True,
    )


def safe_outcome(
    value: object, exc: BaseException | None, response_type: type[Message], name: str
) -> Outcome:
    """The outcome of a run that returned ``value`` or raised ``exc``, always one that can be
    stored: when the intended one cannot even be built (a status message that is not text, a
    code out of range), INTERNAL with a safe message."""
    try:
        if exc is not None:
            return outcome_of_exception(exc, name)
        return outcome_of_return(value, response_type, name)
    except Exception:
        return internal_outcome(name, "its outcome could not be turned into a status")


def capped(outcome: Outcome, max_response_bytes: int, name: str) -> Outcome:
    """``outcome``, unless its response is over ``max_response_bytes``: then INVALID_ARGUMENT
    saying so (a response that large would not reach most clients)."""
    if outcome.response is None:
        return outcome
    size = outcome.response.ByteSize()
    if size <= max_response_bytes:
        return outcome
    return Outcome(
        error=status(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the response is {size} bytes, over the limit of {max_response_bytes} "
            "(Manager max_response_bytes)",
        ),
        log=f"{name}: the handler's response of {size} bytes is over the limit",
    )


def run_outcome(
    value: object,
    exc: BaseException | None,
    response_type: type[Message],
    name: str,
    *,
    stopped: bool,
    max_response_bytes: int,
    on_loop: bool = False,
) -> Outcome | None:
    """What a handler's finished run ends its operation with: the run returned ``value`` or
    raised ``exc``. Every driver of a handler decides here (the manager's threads and tasks,
    and :func:`lrofw.testing.call_handler`).

    Args:
        value: what the handler returned (ignored when ``exc`` is set).
        exc: what the handler raised, or None.
        response_type: the method's response type.
        name: the operation's name, for messages and the log.
        stopped: the handler had been told to stop. Its operation ended already, with the
            status of what stopped it (a cancel: CANCELLED; its timeout: DEADLINE_EXCEEDED;
            a closing server: ABORTED); what the handler returned or raised since is dropped.
        max_response_bytes: a larger response ends the operation INVALID_ARGUMENT (:func:`capped`).
        on_loop: the handler ran as a task on an event loop, where a ``CancelledError`` that is
            not a stop of ours means the loop is going away under it: ABORTED.

    Returns:
        None when ``stopped``; else the outcome to store (see :func:`safe_outcome`).

    Example:
        >>> run_outcome(None, ValueError("x"), MyResponse, "operations/1", stopped=False,
        ...             max_response_bytes=MAX_RESPONSE_BYTES).error.code
        13
    """
    if stopped:
        return None
    if on_loop and isinstance(exc, asyncio.CancelledError):
        exc = errors.Aborted(ABORTED_MESSAGE)
    return capped(safe_outcome(value, exc, response_type, name), max_response_bytes, name)


def packed_metadata(metadata: Message, max_bytes: int) -> any_pb2.Any:
    """``metadata`` packed for the store, as ``op.report()`` publishes it.

    Raises:
        errors.InvalidArgument: it is over ``max_bytes`` serialized (raised in the handler that
            reported it).
    """
    packed = pack(metadata)
    size = packed.ByteSize()
    if size > max_bytes:
        raise errors.InvalidArgument(
            f"metadata of {size} bytes is over the limit of {max_bytes} "
            "(Manager max_metadata_bytes); report a summary and keep bulk data elsewhere"
        )
    return packed


def check_name(name: str, prefix: str) -> None:
    """Refuse a malformed operation name with INVALID_ARGUMENT (an RPC error, not NOT_FOUND).

    Raises:
        errors.InvalidArgument: ``name`` is empty, longer than 1,024 characters, or not under
            ``prefix/``.
        TypeError: ``name`` is not a str.
    """
    if not isinstance(name, str):  # a caller's mistake in code, not a client's request
        raise TypeError(f"name must be a str, got {_check.shown(name)}")
    if not name:
        raise errors.InvalidArgument("name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise errors.InvalidArgument(
            f"name is {len(name)} characters long; at most {MAX_NAME_LENGTH} are allowed"
        )
    if not name.startswith(prefix + "/") or len(name) == len(prefix) + 1:
        raise errors.InvalidArgument(
            f"name {name[:80]!r} is not an operation name: expected {prefix}/<id>"
        )


def wait_budget(
    requested: float | None, max_wait: float, time_remaining: float | None, margin: float
) -> float:
    """How long a WaitOperation may hold: the least of the request's timeout, the server's maximum,
    and (less ``margin``, so the answer arrives in time) the caller's deadline.

    Raises:
        errors.InvalidArgument: ``requested`` is negative.
    """
    if requested is not None and requested < 0:
        raise errors.InvalidArgument(f"timeout must not be negative, got {requested:g} s")
    budget = max_wait if requested is None else min(requested, max_wait)
    if time_remaining is not None:
        budget = min(budget, time_remaining - margin)
    return max(0.0, budget)


