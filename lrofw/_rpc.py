"""The RPC boundary, shared by every servicer path (decorated methods and the Operations service,
sync and asyncio): what an exception becomes on the wire, request parsing and validation.

Expected failures (:class:`lrofw.OperationError`) keep their code and message; a store that cannot
be used now is UNAVAILABLE and a damaged one DATA_LOSS; anything else is an internal error whose
text and traceback go to the log only, never to the client.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from . import _check, errors
from ._access import Authorize, Caller
from .stores.base import StoreCorrupted, StoreUnavailable

logger = logging.getLogger("lrofw")

T = TypeVar("T")

if TYPE_CHECKING:
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _GenericHandler = grpc.GenericRpcHandler[Any, Any]
else:  # generic only in the type stubs
    _GenericHandler = grpc.GenericRpcHandler


#: What a client is told when the store is found damaged.
STORE_CORRUPTED = (
    "the operation store is corrupt; the server's operator must restore it (details are in the"
    " server log)"
)


def status_of(exc: BaseException, what: str) -> tuple[grpc.StatusCode, str]:
    """The (code, message) a client gets for ``exc`` raised while serving ``what``."""
    if isinstance(exc, errors.OperationError):
        return exc.code, exc.message
    if isinstance(exc, StoreUnavailable):
        logger.warning("%s: %s", what, exc)
        return grpc.StatusCode.UNAVAILABLE, f"{exc}; retry later"
    if isinstance(exc, StoreCorrupted):
        # Not retryable and not a bug: the operator has a file to restore. The message (with the
        # file's path) is for the log.
        logger.error("%s: %s", what, exc)
        return grpc.StatusCode.DATA_LOSS, STORE_CORRUPTED
    logger.error("internal error in %s", what, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error in {what}; details are in the server log"


def validate(check: Callable[[object], object] | None, request: object) -> None:
    """Run a method's ``validate`` hook: ValueError becomes INVALID_ARGUMENT with its message,
    an OperationError keeps its code, anything else is an internal error.

    Raises:
        errors.OperationError: the request is refused.
    """
    if check is None:
        return
    try:
        check(request)
    except errors.OperationError:
        raise
    except ValueError as exc:
        raise errors.InvalidArgument(str(exc) or "invalid request") from exc


#: How long before the caller's deadline a held call answers, so the answer arrives in time.
DEADLINE_MARGIN = 0.05


def deadline(context: Any) -> float | None:
    """Seconds left before the caller's deadline, or None when the call has none."""
    remaining = context.time_remaining()
    # grpc reports "no deadline" as a huge number (or None on some versions).
    return None if remaining is None or remaining > 10**8 else float(remaining)


#: ``identify(context) -> principal``: who makes a call (see ``lrofw.add_servicer_to_server``).
Identify = Callable[[Any], str]


@dataclass(frozen=True)
class Hooks:
    """A server's ``identify`` and ``authorize`` hooks (one pair per server)."""

    identify: Identify | None = None
    authorize: Authorize | None = None


_HOOK_SHAPES = {"identify": "context -> principal", "authorize": "(principal, owner) -> bool"}


def hooks(identify: Identify | None, authorize: Authorize | None) -> Hooks:
    """Check a registration's hooks and pair them.

    Raises:
        TypeError: a hook is not a plain callable.
        ValueError: ``authorize`` without ``identify`` (it would never be asked).
    """
    for what, hook in (("identify", identify), ("authorize", authorize)):
        if hook is None:
            continue
        _check.function(what, hook, _HOOK_SHAPES[what])
        if inspect.iscoroutinefunction(hook):
            raise TypeError(f"{what} must be a plain function (def), not async def")
    if authorize is not None and identify is None:
        raise ValueError("authorize needs identify: without identify there are no principals")
    return Hooks(identify, authorize)


def caller_of(server_hooks: Hooks | None, context: Any) -> Caller | None:
    """Who makes this call: the one place every RPC lrofw serves (sync and asyncio) asks the
    server's ``identify`` hook. None when the server identifies nobody (one trusted caller).

    Raises:
        errors.OperationError: ``identify`` refused the call (UNAUTHENTICATED, say).
        TypeError: ``identify`` returned something other than a non-empty str.
        Exception: whatever else ``identify`` raised (an internal error for the client).
    """
    if server_hooks is None or server_hooks.identify is None:
        return None
    principal = server_hooks.identify(context)
    if not isinstance(principal, str) or not principal:
        # Only the type goes into the message (the log): the value may be a credential.
        got = "an empty str" if principal == "" else type(principal).__name__
        raise TypeError(f"identify must return a non-empty str principal, got {got}")
    return Caller(principal, server_hooks.authorize)


# --- request bytes that do not parse --------------------------------------------------------------
# grpc answers a deserializer that raises with INTERNAL "Exception deserializing request!" (sync)
# or UNKNOWN carrying the parser's text (aio), and logs a traceback for every such call. Every
# method lrofw serves parses leniently instead: bytes that do not parse become an Undecodable
# placeholder, and the handler, which can abort the call, refuses it with INVALID_ARGUMENT.


class Undecodable:
    """Stands in for a request whose bytes did not parse (made by :func:`lenient`); handlers
    pass every request through :func:`decoded`, which refuses it."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"Undecodable({self.type_name!r})"


def lenient(deserialize: Callable[[bytes], Any], type_name: str) -> Callable[[bytes], Any]:
    """A request deserializer that never raises into grpc: what ``deserialize`` cannot parse
    comes out as an :class:`Undecodable` naming ``type_name``."""
    placeholder = Undecodable(type_name)

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or anything a custom deserializer raises
            # DEBUG only: any caller can send bytes, and a log line per bad call is theirs to fill.
            logger.debug("a %s request did not parse: %s", type_name, exc)
            return placeholder

    return parse


def decoded(request: T) -> T:
    """``request`` itself, unless it is an :class:`Undecodable` placeholder.

    Raises:
        errors.InvalidArgument: the request's bytes did not parse.
    """
    if isinstance(request, Undecodable):
        raise errors.InvalidArgument(
            f"the request is not a valid {request.type_name}: it could not be parsed"
        )
    return request


def _type_name(deserialize: Callable[[bytes], Any], method: str) -> str:
    # Generated code passes Message.FromString, a class method: its class names the type.
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "") or f"request for {method}")


def lenient_handler(handler: _Handler, method: str) -> _Handler:
    """``handler`` with a :func:`lenient` request deserializer (unary-unary handlers only; any
    other handler is returned as it is)."""
    deserialize, behaviour = handler.request_deserializer, handler.unary_unary
    if deserialize is None or behaviour is None:  # streaming, or a handler given raw bytes
        return handler
    return grpc.unary_unary_rpc_method_handler(
        behaviour,
        request_deserializer=lenient(deserialize, _type_name(deserialize, method)),
        response_serializer=handler.response_serializer,
    )


class LenientMethods(_GenericHandler):
    """A generic handler that serves what ``inner`` serves, with :func:`lenient_handler` for the
    methods (short names, e.g. ``ProvisionDut``) in ``methods``."""

    def __init__(self, inner: _GenericHandler, methods: Collection[str]) -> None:
        self._inner = inner
        self._methods = frozenset(methods)
        # Built once per (method, handler): service() runs on every call grpc routes here.
        self._made: dict[str, tuple[_Handler, _Handler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> _Handler | None:
        handler = self._inner.service(handler_call_details)
        method = handler_call_details.method
        if isinstance(method, bytes):  # typed str, but let a server that passes bytes through
            method = method.decode("utf-8", "replace")
        if handler is None or method.rpartition("/")[2] not in self._methods:
            return handler
        made = self._made.get(method)
        if made is None or made[0] is not handler:
            made = (handler, lenient_handler(handler, method))
            self._made[method] = made
        return made[1]
