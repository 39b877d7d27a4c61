"""The ``google.longrunning.Operations`` service over a Manager, and server registration."""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.longrunning import operations_pb2_grpc
from google.longrunning import operations_proto_pb2 as operations_pb2
from google.protobuf import empty_pb2, message_factory
from google.protobuf.message import Message

from . import _core, _rpc, decorator
from .manager import Manager

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

#: How long before the caller's deadline a WaitOperation answers, so the answer arrives in time.
DEADLINE_MARGIN = 0.05

T = TypeVar("T")


def _deadline(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    # grpc reports "no deadline" as a huge number (or None on some versions).
    return None if remaining is None or remaining > 10**8 else float(remaining)


def _timeout(request: operations_pb2.WaitOperationRequest) -> float | None:
    if not request.HasField("timeout"):
        return None
    return float(request.timeout.seconds) + request.timeout.nanos / 1e9


class OperationsServicer(operations_pb2_grpc.OperationsServicer):
    """Serves all five ``google.longrunning.Operations`` RPCs from a :class:`Manager`.

    :func:`lrofw.add_servicer_to_server` registers it for you; register it yourself only to serve
    operations without any decorated method.

    Example:
        >>> operations_pb2_grpc.add_OperationsServicer_to_server(
        ...     lrofw.OperationsServicer(manager), server)
    """

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    def _serve(self, what: str, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:
            code, message = _rpc.status_of(exc, what)
        context.abort(code, message)

    def GetOperation(
        self, request: operations_pb2.GetOperationRequest, context: grpc.ServicerContext
    ) -> operations_pb2.Operation:
        return self._serve("GetOperation", context, lambda: self.manager.get(request.name))

    def ListOperations(
        self, request: operations_pb2.ListOperationsRequest, context: grpc.ServicerContext
    ) -> operations_pb2.ListOperationsResponse:
        def run() -> operations_pb2.ListOperationsResponse:
            ops, token = self.manager.list(
                request.filter, request.page_size, request.page_token, request.name
            )
            return operations_pb2.ListOperationsResponse(operations=ops, next_page_token=token)

        return self._serve("ListOperations", context, run)

    def WaitOperation(
        self, request: operations_pb2.WaitOperationRequest, context: grpc.ServicerContext
    ) -> operations_pb2.Operation:
        def run() -> operations_pb2.Operation:
            budget = _core.wait_budget(
                _timeout(request), self.manager.max_wait, _deadline(context), DEADLINE_MARGIN
            )
            return self.manager.wait(request.name, budget)

        return self._serve("WaitOperation", context, run)

    def CancelOperation(
        self, request: operations_pb2.CancelOperationRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        def run() -> empty_pb2.Empty:
            self.manager.cancel(request.name)
            return empty_pb2.Empty()

        return self._serve("CancelOperation", context, run)

    def DeleteOperation(
        self, request: operations_pb2.DeleteOperationRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        def run() -> empty_pb2.Empty:
            self.manager.delete(request.name)
            return empty_pb2.Empty()

        return self._serve("DeleteOperation", context, run)


# --- registration ---------------------------------------------------------------------------------

_operations_served: weakref.WeakKeyDictionary[Any, Manager] = weakref.WeakKeyDictionary()


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


def add_servicer_to_server(servicer: object, server: Any, *, manager: Manager) -> None:
    """Register a servicer with ``@long_running`` methods, and the Operations service, on a server.

    The generated ``add_XServicer_to_server`` is found from the servicer's base class. The
    Operations service is registered once per server however many servicers are added; every
    servicer on one server must use the same manager.

    Raises:
        TypeError: the servicer does not derive from a generated servicer class.
        ValueError: the server already serves operations from another manager.

    Example:
        >>> manager = lrofw.Manager()
        >>> server = grpc.server(ThreadPoolExecutor(16), options=lrofw.SERVER_OPTIONS)
        >>> lrofw.add_servicer_to_server(Common(), server, manager=manager)
    """
    if not isinstance(manager, Manager):
        raise TypeError(f"manager must be an lrofw.Manager, got {manager!r}")
    add, service, descriptor = _generated(servicer)
    served = _operations_served.get(server)
    if served is not None and served is not manager:
        raise ValueError(
            "this server already serves google.longrunning.Operations from another Manager; "
            "use one Manager per server"
        )
    bound = decorator.binding_of(servicer)
    if bound is not None and bound.manager is not manager:
        raise ValueError(
            f"this {type(servicer).__name__} instance is already registered with another Manager; "
            "create one servicer instance per Manager"
        )
    binding = decorator.Binding(manager, service, weakref.ref(servicer))
    for attr in dir(type(servicer)):
        spec = decorator.spec_of(inspect.getattr_static(type(servicer), attr, None))
        if spec is None:
            continue
        request_type = _request_type(descriptor, attr)
        if spec.resumable and request_type is None:
            raise TypeError(
                f"{attr} is resumable, but its request type cannot be found from the generated "
                "service descriptor, so a stored request could not be read back"
            )
        binding.runners[spec] = spec.runner(servicer, f"/{service}/{attr}", request_type)
    decorator.bind(servicer, binding)
    for runner in binding.runners.values():
        manager.register(runner)
    add(servicer, server)
    if served is None:
        operations_pb2_grpc.add_OperationsServicer_to_server(OperationsServicer(manager), server)
        _operations_served[server] = manager
