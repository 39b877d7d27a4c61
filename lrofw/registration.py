"""Registering a servicer with ``@long_running`` methods on a server, with the Operations service
beside it, once per server: :func:`add_servicer_to_server`."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Collection
from typing import Any

import grpc
from google.protobuf.message import Message

from . import _check, _descriptors, _rpc, decorator
from . import servicer as operations_service
from ._access import Authorize
from ._descriptors import OperationTypes
from ._health import HEALTH_SERVICE, add_health
from ._reflection import add_reflection
from ._rpc import Identify
from .manager import Manager
from .servicer import AsyncOperationsServicer, OperationsServicer

#: The Operations service's full name, as health reports it.
_OPERATIONS_SERVICE = "google.longrunning.Operations"

_operations_served: weakref.WeakKeyDictionary[Any, Manager] = weakref.WeakKeyDictionary()
#: Beside each server's manager, its identify/authorize pair (one per server, as the manager).
_hooks_served: weakref.WeakKeyDictionary[Any, _rpc.Hooks] = weakref.WeakKeyDictionary()


def _generated(servicer: object) -> _descriptors.Service:
    """The generated service ``servicer`` implements; TypeError when it derives from none."""
    service = _descriptors.generated_service(servicer)
    if service is None:
        raise TypeError(
            "servicer must be an instance of a class derived from a generated *Servicer class "
            f"(from a *_pb2_grpc module), got {_check.shown(servicer)}; lrofw needs that class "
            "to register the service"
        )
    return service


def add_servicer_to_server(
    servicer: object,
    server: Any,
    *,
    manager: Manager,
    max_blocking_waits: int | None = None,
    identify: Identify | None = None,
    authorize: Authorize | None = None,
    health: bool = False,
    reflection: bool = False,
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
        health: also serve the standard health service, ``grpc.health.v1.Health``
            (grpcio-health-checking, ``pip install 'lrofw[health]'``), once per server: the
            overall server (``""``), this servicer's service and
            ``google.longrunning.Operations`` are SERVING, and all turn NOT_SERVING when the
            manager begins to close (:meth:`lrofw.Manager.close`; docs/deploying.md). On a
            ``grpc.aio`` server, call this from a coroutine on the server's event loop.
        reflection: also serve gRPC server reflection (grpcio-reflection,
            ``pip install 'lrofw[reflection]'``), once per server, so ``grpcurl -plaintext
            HOST:PORT list`` shows this servicer's service, ``google.longrunning.Operations``,
            ``grpc.health.v1.Health`` (with ``health=True``) and the reflection service.

    Raises:
        TypeError: the servicer does not derive from a generated servicer class, or has
            ``async def`` handlers but the server is not a ``grpc.aio`` server; a hook is not a
            plain function; an argument is of the wrong type (the message names it); or a
            ``@long_running`` method's types differ from its RPC's
            ``google.longrunning.operation_info`` in the proto, or neither gives them (see
            :func:`lrofw.long_running`).
        ValueError: the server already serves operations from another manager or with
            another identify/authorize pair; ``authorize`` is given without ``identify``; or
            ``max_blocking_waits`` is negative.
        ImportError: ``health=True`` without grpcio-health-checking installed, or
            ``reflection=True`` without grpcio-reflection.
        RuntimeError: ``health=True`` on a ``grpc.aio`` server with no event loop running.

    Example:
        >>> manager = lrofw.Manager()
        >>> server = grpc.server(ThreadPoolExecutor(16), options=lrofw.SERVER_OPTIONS)
        >>> lrofw.add_servicer_to_server(Common(), server, manager=manager, health=True,
        ...                              reflection=True)
        >>> def identify(context):
        ...     token = dict(context.invocation_metadata()).get("authorization", "")
        ...     if token not in TOKENS:
        ...         raise lrofw.errors.Unauthenticated("send authorization: Bearer TOKEN")
        ...     return TOKENS[token]
        >>> lrofw.add_servicer_to_server(Common(), aio_server, manager=lrofw.Manager(),
        ...     identify=identify, authorize=lambda who, owner: who == "admin" or who == owner)
    """
    _check.instance("manager", manager, Manager, "an lrofw.Manager")
    _check.instance(
        "server", server, (grpc.Server, grpc.aio.Server), "a grpc.server() or grpc.aio.server()"
    )
    if isinstance(servicer, type):
        raise TypeError(
            f"servicer must be an instance, got the class {servicer.__name__} itself; "
            f"pass {servicer.__name__}()"
        )
    if max_blocking_waits is not None:
        max_blocking_waits = _check.count("max_blocking_waits", max_blocking_waits, 0)
    _check.flag("health", health)
    _check.flag("reflection", reflection)
    hooks = _rpc.hooks(identify, authorize)
    generated = _generated(servicer)
    add, service, descriptor = generated.add, generated.name, generated.descriptor
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
    binding = decorator.Binding(
        manager, service, weakref.ref(servicer), hooks=hooks, descriptor=descriptor
    )
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
        types = _descriptors.resolve(
            type(servicer), attr, service, descriptor, spec.response_type, spec.metadata_type
        )
        request_type = _descriptors.request_type(_descriptors.method_descriptor(descriptor, attr))
        if spec.resumable and request_type is None:
            raise TypeError(
                f"{attr} is resumable, but its request type cannot be found from the generated "
                "service descriptor, so a stored request could not be read back"
            )
        binding.runners[spec] = spec.runner(servicer, f"/{service}/{attr}", request_type, types)
        long_running.add(attr)
    decorator.bind(servicer, binding)
    for runner in binding.runners.values():
        manager.register(runner)
    _add_leniently(add, _AioEntries(servicer) if aio else servicer, server, long_running)
    if served is None:
        operations: OperationsServicer | AsyncOperationsServicer
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
        operations_service.add_operations(operations, server)  # looked up here: tests wrap it
        _operations_served[server] = manager
        _hooks_served[server] = hooks
    if health:
        add_health(server, manager, [service, _OPERATIONS_SERVICE])
    if reflection:
        health_service = [HEALTH_SERVICE] if health else []
        add_reflection(server, [service, _OPERATIONS_SERVICE, *health_service])


def types_of(method: Callable[..., Any]) -> OperationTypes:
    """The response and metadata types of a ``@long_running`` method's operations, as
    :func:`add_servicer_to_server` resolves them: the decorator's, checked against and
    completed from the RPC's ``google.longrunning.operation_info`` in the generated code of the
    servicer's base class (for a registered servicer, the types it was registered with).

    ``method`` is a bound method (``servicer.ProvisionDut``; the servicer need not be
    registered), or a decorated ``(request, op)`` function, which has no proto to read, so its
    decorator must give the types.

    Raises:
        TypeError: ``method`` is not a ``@long_running`` method, or its types cannot be
            resolved (the same errors as :func:`add_servicer_to_server`).

    Example:
        >>> types = lrofw.registration.types_of(Common().ProvisionDut)
        >>> types.response_type, types.metadata_type
        (<class 'tls_pb2.ProvisionDutResponse'>, <class 'tls_pb2.ProvisionDutMetadata'>)
    """
    spec = decorator.spec_of(method)
    if spec is None:
        raise TypeError(f"{method!r} is not a @long_running method")
    servicer = getattr(method, "__self__", None) if spec.takes_self else None
    if servicer is None or isinstance(servicer, type):
        label = str(getattr(spec.fn, "__qualname__", spec.name))
        return _descriptors.operation_types(label, spec.response_type, spec.metadata_type, None)
    binding = decorator.binding_of(servicer)
    runner = binding.runners.get(spec) if binding is not None else None
    if runner is not None:
        return OperationTypes(runner.response_type, runner.metadata_type)
    owner = type(servicer)
    attr = next(
        (
            a
            for a in dir(owner)
            if decorator.spec_of(inspect.getattr_static(owner, a, None)) is spec
        ),
        spec.name,
    )
    generated = _descriptors.generated_service(servicer)
    service, descriptor = (generated.name, generated.descriptor) if generated else (None, None)
    return _descriptors.resolve(
        owner, attr, service, descriptor, spec.response_type, spec.metadata_type
    )


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


def method_info(servicer: object, attr: str) -> tuple[str, type[Message] | None]:
    """The full RPC name (``/pkg.Service/Method``) registration gives a servicer's method
    ``attr``, and its request type (None when the generated service descriptor does not lead
    to it).

    Raises:
        TypeError: the servicer does not derive from a generated servicer class.

    Example:
        >>> method, request_type = method_info(Common(), "ProvisionDut")
        >>> method, request_type.__name__
        ('/chromiumos.config.api.test.tls.Common/ProvisionDut', 'ProvisionDutRequest')
    """
    service = _generated(servicer)
    method = _descriptors.method_descriptor(service.descriptor, attr)
    return f"/{service.name}/{attr}", _descriptors.request_type(method)
