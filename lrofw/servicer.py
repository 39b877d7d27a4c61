"""The ``google.longrunning.Operations`` service over a Manager, and server registration."""

from __future__ import annotations

import inspect
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

import grpc
from google.longrunning import operations_pb2_grpc
from google.longrunning import operations_proto_pb2 as operations_pb2
from google.protobuf import empty_pb2, message_factory
from google.protobuf.message import Message

from . import _core, _rpc, decorator
from ._access import Authorize, Caller
from ._rpc import DEADLINE_MARGIN, Identify
from .manager import Manager

T = TypeVar("T")

#: Options for every server that serves operations:
#: ``grpc.server(executor, options=lrofw.SERVER_OPTIONS)``.
#:
#: - grpc's defaults cancel calls beyond about 1,000 pending at once; lrofw servers hold many
#:   waiting clients, so the limits are raised.
#: - SO_REUSEPORT is off: with it (grpc's default), a second server started on a busy port binds
#:   without error and silently takes some of the connections, whose clients then cannot find
#:   operations kept by the first.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 40_000),
    ("grpc.so_reuseport", 0),
)


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
        if max_blocking_waits is not None and max_blocking_waits < 0:
            raise ValueError(f"max_blocking_waits must not be negative, got {max_blocking_waits}")
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
            code, message = _rpc.status_of(exc, what)
        context.abort(code, message)

    def WaitOperation(
        self, request: operations_pb2.WaitOperationRequest, context: grpc.ServicerContext
    ) -> operations_pb2.Operation:
        def run() -> operations_pb2.Operation:
            caller = _rpc.caller_of(self.hooks, context)
            name, budget = self._wait_for(request, context)
            op = self.manager.get(name, caller=caller)
            if op.done or budget <= 0:
                return op  # nothing to hold for: no thread, no callback, no slot
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
            code, message = _rpc.status_of(exc, "WaitOperation")
        await context.abort(code, message)
        raise AssertionError("abort returned")  # pragma: no cover - abort always raises


# --- registration ---------------------------------------------------------------------------------

_operations_served: weakref.WeakKeyDictionary[Any, Manager] = weakref.WeakKeyDictionary()
#: Beside each server's manager, its identify/authorize pair (one per server, as the manager).
_hooks_served: weakref.WeakKeyDictionary[Any, _rpc.Hooks] = weakref.WeakKeyDictionary()


def _generated(servicer: object) -> tuple[Callable[[Any, Any], None], str, Any]:
    """Find the generated ``add_XServicer_to_server`` of a servicer, its service's full name and
    its ServiceDescriptor (None if the generated module does not lead to it)."""
    for cls in type(servicer).__mro__:
        module = sys.modules.get(cls.__module__)
        add = getattr(module, f"add_{cls.__name__}_to_server", None)
        if module is None or not callable(add):
            continue
        short = cls.__name__.removesuffix("Servicer")
        for value in vars(module).values():
            descriptor = getattr(getattr(value, "DESCRIPTOR", None), "services_by_name", {})
            service = descriptor.get(short) if hasattr(descriptor, "get") else None
            if service is not None:
                return add, str(service.full_name), service
        return add, short, None
    raise TypeError(
        f"{type(servicer).__name__} does not derive from a generated *Servicer class "
        "(from a *_pb2_grpc module); lrofw needs it to register the service"
    )


def _request_type(descriptor: Any, method: str) -> type[Message] | None:
    found = getattr(descriptor, "methods_by_name", {}).get(method) if descriptor else None
    if found is None:
        return None
    return message_factory.GetMessageClass(found.input_type)


def add_servicer_to_server(
    servicer: object,
    server: Any,
    *,
    manager: Manager,
    max_blocking_waits: int | None = None,
    identify: Identify | None = None,
    authorize: Authorize | None = None,
) -> None:
    """Register a servicer with ``@long_running`` methods, and the Operations service, on a server.

    Works with ``grpc.server`` and ``grpc.aio.server``. The generated ``add_XServicer_to_server``
    is found from the servicer's base class. The Operations service is registered once per server
    however many servicers are added (:class:`AsyncOperationsServicer` on an aio server, where a
    WaitOperation holds no thread); every servicer on one server must use the same manager. On an
    aio server, ``async def`` handlers run as tasks on its event loop and plain ones on the
    manager's threads. Request bytes that do not parse are refused with INVALID_ARGUMENT on the
    ``@long_running`` methods and the Operations RPCs; other methods of the servicer keep grpc's
    own answer (INTERNAL on a ``grpc.server``, UNKNOWN on a ``grpc.aio`` server).

    Args:
        servicer: an instance of a class derived from a generated ``XServicer``.
        server: the ``grpc.server`` or ``grpc.aio.server`` to register on.
        manager: the manager that runs and keeps the operations.
        max_blocking_waits: on a ``grpc.server``, how many WaitOperation calls may block at once
            (each holds a server thread); by default half the server's threads. Past it a wait
            answers at once with the latest state and clients back off.
        identify: ``identify(context) -> principal``, called first on every RPC lrofw serves
            on this server (each create and the five Operations RPCs) with the call's
            ``grpc.ServicerContext`` (``grpc.aio.ServicerContext`` on an aio server), a plain
            function on both. It returns the caller's principal, a non-empty str, or raises
            ``lrofw.errors.Unauthenticated("...")`` (any :class:`lrofw.OperationError` keeps
            its code and message; anything else is INTERNAL, logged). Each operation then
            records its creator, other callers get NOT_FOUND for it and do not list it, and
            request ids are scoped per principal. None: one trusted caller sees everything.
        authorize: ``authorize(principal, owner) -> bool``: may ``principal`` see and act on
            an operation created by ``owner`` (None: created without a principal)? By
            default ``principal == owner``. Needs ``identify``.

    Raises:
        TypeError: the servicer does not derive from a generated servicer class, or has
            ``async def`` handlers but the server is not a ``grpc.aio`` server; or a hook is
            not a plain function.
        ValueError: the server already serves operations from another manager or with
            another identify/authorize pair; or ``authorize`` is given without ``identify``.

    Example:
        >>> manager = lrofw.Manager()
        >>> server = grpc.server(ThreadPoolExecutor(16), options=lrofw.SERVER_OPTIONS)
        >>> lrofw.add_servicer_to_server(Common(), server, manager=manager)
        >>> def identify(context):
        ...     token = dict(context.invocation_metadata()).get("authorization", "")
        ...     if token not in TOKENS:
        ...         raise lrofw.errors.Unauthenticated("send authorization: Bearer TOKEN")
        ...     return TOKENS[token]
        >>> lrofw.add_servicer_to_server(Common(), aio_server, manager=lrofw.Manager(),
        ...     identify=identify, authorize=lambda who, owner: who == "admin" or who == owner)
    """
    if not isinstance(manager, Manager):
        raise TypeError(f"manager must be an lrofw.Manager, got {manager!r}")
    hooks = _rpc.hooks(identify, authorize)
    add, service, descriptor = _generated(servicer)
    served = _operations_served.get(server)
    if served is not None and served is not manager:
        raise ValueError(
            "this server already serves google.longrunning.Operations from another Manager; "
            "use one Manager per server"
        )
    if served is not None and _hooks_served.get(server) != hooks:
        raise ValueError(
            "this server already serves google.longrunning.Operations with another "
            "identify/authorize pair; pass the same functions to every add_servicer_to_server "
            "on one server"
        )
    bound = decorator.binding_of(servicer)
    if bound is not None and bound.manager is not manager:
        raise ValueError(
            f"this {type(servicer).__name__} instance is already registered with another Manager; "
            "create one servicer instance per Manager"
        )
    if bound is not None and bound.hooks != hooks:
        raise ValueError(
            f"this {type(servicer).__name__} instance is already registered with another "
            "identify/authorize pair; create one servicer instance per pair"
        )
    aio = isinstance(server, grpc.aio.Server)
    binding = decorator.Binding(manager, service, weakref.ref(servicer), hooks=hooks)
    long_running: set[str] = set()
    for attr in dir(type(servicer)):
        spec = decorator.spec_of(inspect.getattr_static(type(servicer), attr, None))
        if spec is None:
            continue
        if spec.is_async and not aio:
            raise TypeError(
                f"{attr} is an async def handler: serve {type(servicer).__name__} with "
                "grpc.aio.server(), or define the handler with def"
            )
        request_type = _request_type(descriptor, attr)
        if spec.resumable and request_type is None:
            raise TypeError(
                f"{attr} is resumable, but its request type cannot be found from the generated "
                "service descriptor, so a stored request could not be read back"
            )
        binding.runners[spec] = spec.runner(servicer, f"/{service}/{attr}", request_type)
        long_running.add(attr)
    decorator.bind(servicer, binding)
    for runner in binding.runners.values():
        manager.register(runner)
    _add_leniently(add, _AioEntries(servicer) if aio else servicer, server, long_running)
    if served is None:
        operations: _Operations
        if aio:
            operations = AsyncOperationsServicer(manager, identify=identify, authorize=authorize)
        else:
            workers = _thread_count(server)
            if max_blocking_waits is None and workers is not None:
                max_blocking_waits = max(1, workers // 2)
            operations = OperationsServicer(
                manager,
                max_blocking_waits=max_blocking_waits,
                identify=identify,
                authorize=authorize,
            )
        add_operations(operations, server)
        _operations_served[server] = manager
        _hooks_served[server] = hooks


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


class _Recorder:
    """Stands in for the server while a generated ``add_XServicer_to_server`` runs, and records
    the handlers it registers (anything else it asks of the server goes to the real one)."""

    def __init__(self, server: Any) -> None:
        self._server = server
        self.generic: list[grpc.GenericRpcHandler[Any, Any]] = []
        self.registered: list[tuple[str, dict[str, grpc.RpcMethodHandler[Any, Any]]]] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.registered.append((service, dict(handlers)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def _add_leniently(
    add: Callable[[Any, Any], None], servicer: object, server: Any, methods: Collection[str]
) -> None:
    """Run the generated ``add``, then register what it registered on ``server``, with
    :func:`_rpc.lenient` request deserializers for the ``@long_running`` methods: bytes that do
    not parse reach their entry as a placeholder, which refuses them with INVALID_ARGUMENT.
    Other methods keep grpc's own (their handlers would not know the placeholder)."""
    recorder = _Recorder(server)
    add(servicer, recorder)
    if recorder.generic:
        server.add_generic_rpc_handlers(
            tuple(_rpc.LenientMethods(handler, methods) for handler in recorder.generic)
        )
    for service, handlers in recorder.registered:
        server.add_registered_method_handlers(
            service,
            {
                name: _rpc.lenient_handler(handler, f"/{service}/{name}")
                if name in methods
                else handler
                for name, handler in handlers.items()
            },
        )


def _thread_count(server: Any) -> int | None:
    """The thread count of a ``grpc.server``'s executor, when it can be read (grpc keeps it in
    private attributes, so this is best-effort)."""
    pool = getattr(getattr(server, "_state", None), "thread_pool", None)
    count = getattr(pool, "_max_workers", None)
    return count if isinstance(count, int) else None


class _AioEntries:
    """What the generated ``add_XServicer_to_server`` sees on an aio server: the servicer, with
    each ``@long_running`` method replaced by a coroutine entry point (so even a plain ``def``
    handler's create RPC answers from the event loop, and errors are awaited aborts)."""

    def __init__(self, servicer: object) -> None:
        self._servicer = servicer

    def __getattr__(self, name: str) -> Any:
        spec = decorator.spec_of(inspect.getattr_static(type(self._servicer), name, None))
        if spec is None:
            return getattr(self._servicer, name)
        servicer = self._servicer

        async def entry(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await decorator.start_async(spec, servicer, request, context)

        return entry
