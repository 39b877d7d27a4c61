"""The ``google.longrunning.Operations`` service over a Manager: the sync and asyncio servicers,
and :func:`add_operations`, which registers one on a server. Registering a servicer of your own
(with the Operations service beside it) is :mod:`lrofw.registration`'s."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.longrunning import operations_pb2_grpc
from google.longrunning import operations_proto_pb2 as operations_pb2
from google.protobuf import empty_pb2, message_factory
from google.protobuf.message import Message

from . import _check, _core, _rpc
from ._access import Authorize, Caller
from ._rpc import DEADLINE_MARGIN, Identify
from .manager import Manager

T = TypeVar("T")

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 40_000),
    ("grpc.so_reuseport", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
)
"""Options for every server that serves operations.

- grpc's defaults cancel calls beyond about 1,000 pending at once; lrofw servers hold many
  waiting clients, so the limits are raised.
- SO_REUSEPORT is off: with it (grpc's default), a second server started on a busy port binds
  without error and silently takes some of the connections, whose clients then cannot find
  operations kept by the first; and a server restarted in place binds its port again as
  soon as the old process has exited.
- Keepalive pings are accepted every 20 s while calls are in flight (grpc's default is one per
  5 minutes without data), so clients with ``lrofw.CHANNEL_OPTIONS`` (a ping every 30 s) are
  never told GOAWAY too_many_pings during a long WaitOperation.

Example:
    >>> server = grpc.server(ThreadPoolExecutor(32), options=lrofw.SERVER_OPTIONS)
    >>> server = grpc.aio.server(options=lrofw.SERVER_OPTIONS)
"""


def _timeout(request: operations_pb2.WaitOperationRequest) -> float | None:
    if not request.HasField("timeout"):
        return None
    return float(request.timeout.seconds) + request.timeout.nanos / 1e9


def _get(manager: Manager, request: Any, caller: Caller | None) -> operations_pb2.Operation:
    return manager.get(request.name, caller=caller)


def _list(
    manager: Manager, request: Any, caller: Caller | None
) -> operations_pb2.ListOperationsResponse:
    ops, token = manager.list(
        request.filter, request.page_size, request.page_token, request.name, caller=caller
    )
    return operations_pb2.ListOperationsResponse(operations=ops, next_page_token=token)


def _cancel(manager: Manager, request: Any, caller: Caller | None) -> empty_pb2.Empty:
    manager.cancel(request.name, caller=caller)
    return empty_pb2.Empty()


def _delete(manager: Manager, request: Any, caller: Caller | None) -> empty_pb2.Empty:
    manager.delete(request.name, caller=caller)
    return empty_pb2.Empty()


# The RPCs that answer at once are these functions of the manager and the caller; both servicers
# are built from them and differ only in how they answer (return or await, abort or await abort).
# Each request first passes _rpc.decoded: add_operations parses leniently, so bytes that did not
# parse arrive here as a placeholder and are refused with INVALID_ARGUMENT.
_Answer = Callable[[Manager, Any, "Caller | None"], Message]


def _sync_rpc(what: str, fn: _Answer) -> Callable[..., Message]:
    def rpc(self: OperationsServicer, request: Any, context: grpc.ServicerContext) -> Message:
        def run() -> Message:
            caller = _rpc.caller_of(self.hooks, context)  # first: an unknown caller gets nothing
            return fn(self.manager, _rpc.decoded(request), caller)

        return self._serve(what, context, run)

    rpc.__name__ = rpc.__qualname__ = what
    return rpc


def _async_rpc(what: str, fn: _Answer) -> Callable[..., Awaitable[Message]]:
    async def rpc(self: AsyncOperationsServicer, request: Any, context: Any) -> Message:
        async def run() -> Message:
            caller = _rpc.caller_of(self.hooks, context)
            # From a thread when the store blocks: the event loop never waits for it.
            return await self.manager.run_blocking(fn, self.manager, _rpc.decoded(request), caller)

        return await self._serve(what, context, run)

    rpc.__name__ = rpc.__qualname__ = what
    return rpc


class _Operations(operations_pb2_grpc.OperationsServicer):
    def __init__(
        self,
        manager: Manager,
        *,
        identify: Identify | None = None,
        authorize: Authorize | None = None,
    ) -> None:
        _check.instance("manager", manager, Manager, "an lrofw.Manager")
        self.manager = manager
        #: The server's identify/authorize pair (see :func:`add_servicer_to_server`).
        self.hooks = _rpc.hooks(identify, authorize)

    def _wait_for(
        self, request: operations_pb2.WaitOperationRequest, context: Any
    ) -> tuple[str, float]:
        """The name a WaitOperation waits on, and for how long at most."""
        request = _rpc.decoded(request)
        budget = _core.wait_budget(
            _timeout(request), self.manager.max_wait, _rpc.deadline(context), DEADLINE_MARGIN
        )
        return request.name, budget


class OperationsServicer(_Operations):
    """Serves all five ``google.longrunning.Operations`` RPCs from a :class:`Manager`, on a
    ``grpc.server``.

    Each blocking WaitOperation holds one of the server's threads, so at most
    ``max_blocking_waits`` block at once; a wait past that answers at once with the latest state
    (WaitOperation is best-effort) and clients such as :func:`lrofw.wait` back off before asking
    again. :func:`lrofw.add_servicer_to_server` registers it for you, with half the server's
    threads as the bound. ``identify`` and ``authorize`` are as for
    :func:`lrofw.add_servicer_to_server`. Register it yourself with :func:`add_operations`
    (grpc's generated ``add_OperationsServicer_to_server`` works too, but answers request bytes
    that do not parse with INTERNAL instead of INVALID_ARGUMENT).

    Example:
        >>> lrofw.servicer.add_operations(
        ...     lrofw.OperationsServicer(manager, max_blocking_waits=16), server)
    """

    def __init__(
        self,
        manager: Manager,
        *,
        max_blocking_waits: int | None = None,
        identify: Identify | None = None,
        authorize: Authorize | None = None,
    ) -> None:
        super().__init__(manager, identify=identify, authorize=authorize)
        if max_blocking_waits is not None:
            max_blocking_waits = _check.count("max_blocking_waits", max_blocking_waits, 0)
        self.max_blocking_waits = max_blocking_waits
        self._blocking: threading.Semaphore | None = None
        if max_blocking_waits is not None:  # 0: every wait answers at once
            self._blocking = threading.Semaphore(max_blocking_waits)

    # Built from the shared table above (the stubs type each method's request exactly).
    GetOperation = _sync_rpc("GetOperation", _get)  # type: ignore[assignment]
    ListOperations = _sync_rpc("ListOperations", _list)  # type: ignore[assignment]
    CancelOperation = _sync_rpc("CancelOperation", _cancel)  # type: ignore[assignment]
    DeleteOperation = _sync_rpc("DeleteOperation", _delete)  # type: ignore[assignment]

    def _serve(self, what: str, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:
            self.manager.events.failed(exc)
            code, message = _rpc.status_of(exc, what)
        context.abort(code, message)

    def WaitOperation(
        self, request: operations_pb2.WaitOperationRequest, context: grpc.ServicerContext
    ) -> operations_pb2.Operation:
        def run() -> operations_pb2.Operation:
            caller = _rpc.caller_of(self.hooks, context)
            name, budget = self._wait_for(request, context)
            if budget <= 0:  # nothing to hold for: no callback, no slot
                return self.manager.wait(name, 0.0, caller=caller)
            # No read first: an operation running here is waited for without reading the store
            # (the manager reads it when it is not, and answers at once when it is done).
            gone = threading.Event()  # the client cancelled or the call ended: stop holding
            if not context.add_callback(gone.set):
                budget = 0.0
            if self._blocking is None:
                return self.manager.wait(name, budget, wake=gone, caller=caller)
            if not self._blocking.acquire(blocking=False):
                # All blocking slots taken: answer at once.
                return self.manager.wait(name, 0.0, caller=caller)
            try:
                return self.manager.wait(name, budget, wake=gone, caller=caller)
            finally:
                self._blocking.release()

        return self._serve("WaitOperation", context, run)


class AsyncOperationsServicer(_Operations):
    """:class:`OperationsServicer` for ``grpc.aio`` servers: WaitOperation awaits the operation
    without holding a thread, so one server holds thousands of waiting clients.

    Example:
        >>> lrofw.servicer.add_operations(lrofw.AsyncOperationsServicer(manager), aio_server)
    """

    GetOperation = _async_rpc("GetOperation", _get)  # type: ignore[assignment]
    ListOperations = _async_rpc("ListOperations", _list)  # type: ignore[assignment]
    CancelOperation = _async_rpc("CancelOperation", _cancel)  # type: ignore[assignment]
    DeleteOperation = _async_rpc("DeleteOperation", _delete)  # type: ignore[assignment]

    async def _serve(
        self, what: str, context: grpc.aio.ServicerContext[Any, Any], fn: Callable[[], Awaitable[T]]
    ) -> T:
        try:
            return await fn()
        except Exception as exc:
            self.manager.events.failed(exc)
            code, message = _rpc.status_of(exc, what)
        await context.abort(code, message)
        raise AssertionError("abort returned")  # pragma: no cover - abort always raises

    async def WaitOperation(
        self,
        request: operations_pb2.WaitOperationRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> operations_pb2.Operation:
        # Not through _serve: one waiting call should hold as little as it can.
        try:
            caller = _rpc.caller_of(self.hooks, context)
            name, budget = self._wait_for(request, context)
            return await self.manager.wait_async(name, budget, caller=caller)
        except Exception as exc:
            self.manager.events.failed(exc)
            code, message = _rpc.status_of(exc, "WaitOperation")
        await context.abort(code, message)
        raise AssertionError("abort returned")  # pragma: no cover - abort always raises


_OPERATIONS = operations_pb2.DESCRIPTOR.services_by_name["Operations"]


def add_operations(servicer: _Operations, server: Any) -> None:
    """Register an Operations servicer as the generated function does, and also as registered
    method handlers: grpc gives those a queue of their own, so Gets and Cancels are not stuck
    behind thousands of waiting WaitOperations on a busy sync server. Request bytes that do not
    parse are refused with INVALID_ARGUMENT (grpc's generated function would answer INTERNAL or
    UNKNOWN).

    Example:
        >>> add_operations(lrofw.OperationsServicer(manager), server)
    """
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=_rpc.lenient(
                message_factory.GetMessageClass(method.input_type).FromString,
                method.input_type.full_name,
            ),
            response_serializer=message_factory.GetMessageClass(
                method.output_type
            ).SerializeToString,
        )
        for method in _OPERATIONS.methods
    }
    generic = grpc.method_handlers_generic_handler(_OPERATIONS.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
    register = getattr(server, "add_registered_method_handlers", None)
    if callable(register):
        register(_OPERATIONS.full_name, handlers)
