"""The lrofw exception tree: one class per gRPC status code, found through one registry.

Handlers raise :class:`OperationError` (or a subclass) to end an operation with an error; clients
receive the same classes when an operation they wait on ended with an error, or when an RPC they
made failed. Every path that turns a status into an exception goes through :func:`from_status`.

Example:
    >>> import grpc, lrofw
    >>> err = lrofw.OperationError(grpc.StatusCode.NOT_FOUND, "Unknown DUT x")
    >>> type(lrofw.errors.from_code(err.code, err.message)).__name__
    'NotFound'
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2

__all__ = [
    "Aborted",
    "AlreadyExists",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OperationCancelled",
    "OperationError",
    "OperationTimeout",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "code_from_int",
    "from_code",
    "from_rpc_error",
    "from_status",
]

_BY_INT: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def code_from_int(value: int) -> grpc.StatusCode:
    """Return the :class:`grpc.StatusCode` for a ``google.rpc.Code`` number (UNKNOWN if unknown).

    Example:
        >>> code_from_int(5)
        <StatusCode.NOT_FOUND: (5, 'not found')>
    """
    return _BY_INT.get(value, grpc.StatusCode.UNKNOWN)


class OperationError(Exception):
    """An operation (or an RPC about one) ended with a non-OK status.

    Raise it from a ``@long_running`` handler to end the operation with that status; clients get the
    subclass for the code (:class:`NotFound` for NOT_FOUND, and so on).

    Args:
        code: the gRPC status code; OK is not an error and is refused.
        message: a message a person can act on; it is sent to clients as is, except that
            characters UTF-8 cannot carry (lone surrogates, as in file names read with
            ``os.listdir``) are written as ``\\udcXX`` escapes.
        details: messages for ``google.rpc.Status.details`` (packed into ``Any`` if needed).

    Raises:
        TypeError: ``code`` is not a ``grpc.StatusCode`` or ``message`` is not a ``str``.
        ValueError: ``code`` is OK.

    Example:
        >>> import grpc
        >>> raise OperationError(grpc.StatusCode.NOT_FOUND, "Unknown DUT foo")
        Traceback (most recent call last):
        lrofw.errors.OperationError: NOT_FOUND: Unknown DUT foo
    """

    #: The code of a subclass; the base class takes it as an argument.
    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str = "",
        details: Iterable[Message] = (),
    ) -> None:
        if not isinstance(code, grpc.StatusCode):
            raise TypeError(f"code must be a grpc.StatusCode, got {code!r}")
        if code is grpc.StatusCode.OK:
            raise ValueError("OperationError needs a non-OK status code")
        if not isinstance(message, str):
            raise TypeError(
                f"message must be a str, got {type(message).__name__} {message!r:.80}; "
                "pass details as messages in details="
            )
        message = _wire_text(message)
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: tuple[any_pb2.Any, ...] = tuple(_pack(d) for d in details)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __reduce__(self) -> tuple[object, ...]:
        # Pickle and copy by what the error is, not by Exception.args (the message only).
        return (_rebuild, (type(self), self.code, self.message, self.details))

    def to_status(self) -> status_pb2.Status:
        """Return this error as a ``google.rpc.Status``.

        Example:
            >>> NotFound("gone").to_status().code
            5
        """
        return status_pb2.Status(
            code=self.code.value[0], message=self.message, details=list(self.details)
        )


def _wire_text(text: str) -> str:
    """``text`` as a protobuf string can carry it: lone surrogates become escapes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _pack(detail: Message) -> any_pb2.Any:
    if isinstance(detail, any_pb2.Any):
        return detail
    if not isinstance(detail, Message):
        raise TypeError(f"details must be protobuf messages, got {type(detail).__name__}")
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


def _rebuild(
    cls: type[OperationError],
    code: grpc.StatusCode,
    message: str,
    details: tuple[any_pb2.Any, ...],
) -> OperationError:
    if issubclass(cls, _CodedError):
        return cls(message, details)
    return cls(code, message, details)


class _CodedError(OperationError):
    """Base of the per-code classes: the code is fixed by the class."""

    def __init__(self, message: str = "", details: Iterable[Message] = ()) -> None:
        super().__init__(self.default_code, message, details)


class OperationCancelled(_CodedError):
    """CANCELLED: the operation was cancelled. A handler may raise it to stop early.

    Example:
        >>> OperationCancelled("stopped by the user").code.name
        'CANCELLED'
    """

    default_code = grpc.StatusCode.CANCELLED


class Unknown(_CodedError):
    """UNKNOWN. Example: ``raise lrofw.errors.Unknown("...")``."""

    default_code = grpc.StatusCode.UNKNOWN


class InvalidArgument(_CodedError):
    """INVALID_ARGUMENT. Example: ``raise lrofw.errors.InvalidArgument("name is empty")``."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(_CodedError):
    """DEADLINE_EXCEEDED. Example: ``raise lrofw.errors.DeadlineExceeded("took too long")``."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(_CodedError):
    """NOT_FOUND. Example: ``raise lrofw.errors.NotFound("Unknown DUT x")``."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(_CodedError):
    """ALREADY_EXISTS. Example: ``raise lrofw.errors.AlreadyExists("dut x is taken")``."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(_CodedError):
    """PERMISSION_DENIED. Example: ``raise lrofw.errors.PermissionDenied("not yours")``."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(_CodedError):
    """RESOURCE_EXHAUSTED. Example: ``raise lrofw.errors.ResourceExhausted("queue full")``."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(_CodedError):
    """FAILED_PRECONDITION. Example: ``raise lrofw.errors.FailedPrecondition("dut busy")``."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(_CodedError):
    """ABORTED. Example: ``raise lrofw.errors.Aborted("server stopped")``."""

    default_code = grpc.StatusCode.ABORTED


class OutOfRange(_CodedError):
    """OUT_OF_RANGE. Example: ``raise lrofw.errors.OutOfRange("percent > 100")``."""

    default_code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(_CodedError):
    """UNIMPLEMENTED. Example: ``raise lrofw.errors.Unimplemented("no such method")``."""

    default_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(_CodedError):
    """INTERNAL. Example: ``raise lrofw.errors.Internal("invariant broken")``."""

    default_code = grpc.StatusCode.INTERNAL


class Unavailable(_CodedError):
    """UNAVAILABLE. Example: ``raise lrofw.errors.Unavailable("server closing")``."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DataLoss(_CodedError):
    """DATA_LOSS. Example: ``raise lrofw.errors.DataLoss("disk corrupt")``."""

    default_code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(_CodedError):
    """UNAUTHENTICATED. Example: ``raise lrofw.errors.Unauthenticated("no token")``."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


_REGISTRY: dict[grpc.StatusCode, type[_CodedError]] = {
    cls.default_code: cls
    for cls in (
        OperationCancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def from_code(
    code: grpc.StatusCode, message: str = "", details: Sequence[any_pb2.Any] = ()
) -> OperationError:
    """Return the exception for ``code``: the one place a code becomes a class.

    Example:
        >>> import grpc
        >>> from_code(grpc.StatusCode.ABORTED, "server stopped")
        Aborted('server stopped')
    """
    cls = _REGISTRY.get(code, Unknown)
    return cls(message, details)


def from_status(status: status_pb2.Status) -> OperationError:
    """Return the exception for a ``google.rpc.Status`` (an operation's ``error``).

    Example:
        >>> from google.rpc import status_pb2
        >>> from_status(status_pb2.Status(code=5, message="gone")).code.name
        'NOT_FOUND'
    """
    return from_code(code_from_int(status.code), status.message, list(status.details))


def from_rpc_error(exc: grpc.RpcError) -> OperationError:
    """Return the exception for a failed RPC (a ``grpc.RpcError`` that is also a ``grpc.Call``).

    Example:
        ``raise from_rpc_error(exc) from exc`` in an ``except grpc.RpcError as exc:`` block.
    """
    # Duck-typed: sync calls are grpc.Call, grpc.aio's AioRpcError is not, both have these.
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode) or code is grpc.StatusCode.OK:
        code = grpc.StatusCode.UNKNOWN
    return from_code(code, details if isinstance(details, str) else "")


class OperationTimeout(TimeoutError):
    """A client gave up waiting: the operation was not done within the timeout.

    Attributes:
        operation: the latest state seen (a ``google.longrunning.Operation``), or None.

    Example:
        >>> try:
        ...     raise OperationTimeout("operations/x not done after 1.0 s")
        ... except TimeoutError as e:
        ...     print(e)
        operations/x not done after 1.0 s
    """

    def __init__(self, message: str, operation: object = None) -> None:
        super().__init__(message)
        self.operation = operation
