"""``long_running``: turn an ordinary function into a servicer method that returns an Operation."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import wrapt
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from . import _check, _core, _descriptors, _rpc, errors
from ._descriptors import OperationTypes
from ._runs import MethodRunner
from .context import OperationContext
from .manager import Manager

Operation = _core.Operation

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, eq=False)
class MethodSpec:
    """What ``@long_running`` knows about one method, fixed at decoration time.

    ``response_type``/``metadata_type`` are the decorator's own (None when not given); the
    types a registered method runs with are resolved against its proto at registration (see
    :func:`lrofw.registration.types_of`) and carried by its :class:`MethodRunner`, never
    written back here.
    """

    fn: Callable[..., Any]
    response_type: type[Message] | None
    metadata_type: type[Message] | None
    validate: Callable[[Any], object] | None
    timeout: float | None
    takes_self: bool
    resumable: bool = False
    request_id: Callable[[Any], str | None] | None = None
    inline_timeout: float | None = None
    #: ``fn`` is an ``async def`` (fixed at decoration; read on every call, so not recomputed).
    is_async: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_async", inspect.iscoroutinefunction(self.fn))

    @property
    def name(self) -> str:
        return str(getattr(self.fn, "__name__", "method"))

    def runner(
        self,
        instance: object,
        method: str,
        request_type: type[Message] | None,
        types: OperationTypes,
    ) -> MethodRunner:
        """How the manager runs this method for one servicer instance, with ``types``."""
        fn = self.fn
        if self.takes_self:

            def call(request: Message, op: OperationContext) -> object:
                return fn(instance, request, op)
        else:

            def call(request: Message, op: OperationContext) -> object:
                return fn(request, op)

        return MethodRunner(
            method,
            call,
            types.response_type,
            types.metadata_type,
            self.timeout,
            request_type,
            self.resumable,
            self.request_id,
            self.is_async,
        )


@dataclass(eq=False)
class Binding:
    """How a registered servicer instance reaches its manager, and its methods' runners."""

    manager: Manager
    service: str
    servicer: weakref.ReferenceType[object]
    runners: dict[MethodSpec, MethodRunner] = field(default_factory=dict)
    #: The server's identify/authorize pair: who creates each operation.
    hooks: _rpc.Hooks = field(default_factory=_rpc.Hooks)
    #: The service's descriptor (None: not found), where later methods' types are read.
    descriptor: ServiceDescriptor | None = None

    def runner(self, spec: MethodSpec) -> MethodRunner:
        runner = self.runners.get(spec)
        if runner is None:  # a method the registration did not see (added to the class later)
            servicer = self.servicer()
            types = _descriptors.resolve(
                type(servicer),
                spec.name,
                self.service,
                self.descriptor,
                spec.response_type,
                spec.metadata_type,
            )
            runner = spec.runner(servicer, f"/{self.service}/{spec.name}", None, types)
        return runner


_bindings: weakref.WeakKeyDictionary[object, Binding] = weakref.WeakKeyDictionary()


def bind(servicer: object, binding: Binding) -> None:
    """Tie a servicer instance to a manager (done by :func:`lrofw.add_servicer_to_server`)."""
    try:
        _bindings[servicer] = binding
    except TypeError as exc:
        raise TypeError(
            f"{type(servicer).__name__} instances cannot be weakly referenced; "
            "remove __slots__ or add '__weakref__' to them"
        ) from exc


def binding_of(servicer: object) -> Binding | None:
    """The binding of a registered servicer instance, or None."""
    try:
        return _bindings.get(servicer)
    except TypeError:  # not weakly referenceable: never bound
        return None


def spec_of(attribute: object) -> MethodSpec | None:
    """The spec of a ``@long_running`` attribute (as found with ``inspect.getattr_static``)."""
    spec = getattr(attribute, "_self_lrofw_spec", None)
    return spec if isinstance(spec, MethodSpec) else None


if TYPE_CHECKING:
    _Wrapper = wrapt.FunctionWrapper[..., Any]
else:
    _Wrapper = wrapt.FunctionWrapper


class _LongRunning(_Wrapper):
    def __init__(self, spec: MethodSpec, wrapper: Callable[..., Any]) -> None:
        super().__init__(spec.fn, wrapper)
        self._self_lrofw_spec = spec


def _message_class(value: object, what: str) -> type[Message]:
    if isinstance(value, type) and issubclass(value, Message) and value is not Message:
        return value
    if callable(value) and not isinstance(value, type):
        raise TypeError(
            "@long_running needs parentheses: @lrofw.long_running() takes the types from the "
            "proto's google.longrunning.operation_info, @lrofw.long_running(MyResponse) gives "
            f"them; got {what}={value!r}"
        )
    raise TypeError(f"{what} must be a protobuf message class, got {value!r}")


def _takes_self(fn: Callable[..., Any]) -> bool:
    """True for ``(self, request, op)``, False for ``(request, op)``; TypeError otherwise."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot read the signature of {fn!r}") from exc
    required = [
        p
        for p in params
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    positional = [p for p in required if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    shape_ok = len(required) == len(positional) and (
        len(positional) == 3 or (len(positional) == 2 and positional[0].name != "self")
    )
    if not shape_ok:
        names = ", ".join(p.name for p in required)
        raise TypeError(
            "a @long_running handler takes (request, op) or (self, request, op); "
            f"{getattr(fn, '__qualname__', fn)} requires ({names})"
        )
    return len(positional) == 3


def long_running(
    response_type: type[Message] | None = None,
    *,
    metadata_type: type[Message] | None = None,
    validate: Callable[[Any], object] | None = None,
    timeout: float | None = None,
    resumable: bool = False,
    request_id: Callable[[Any], str | None] | None = None,
    inline_timeout: float | None = None,
) -> Callable[[F], F]:
    """Make a function a servicer method that starts a long-running operation.

    The decorated method answers its RPC at once with a new ``google.longrunning.Operation``
    (``done`` false) and runs the body on the manager's executor, with ``(request, op)`` (plus
    ``self`` for methods): ``op`` is an :class:`lrofw.OperationContext`. Returning a
    ``response_type`` finishes the operation with that response; raising
    :class:`lrofw.OperationError` finishes it with that status (see the docs' outcome table).

    The types may be left out: at registration (:func:`lrofw.add_servicer_to_server`) they
    are read from the RPC's ``google.longrunning.operation_info`` option in the proto. Types
    that are given must agree with that option (a TypeError at registration otherwise).

    Args:
        response_type: the message class the handler returns; None: the proto's
            ``operation_info.response_type``.
        metadata_type: the message class ``op.report()`` accepts; None: the proto's
            ``operation_info.metadata_type`` (any message when the proto names none either).
        validate: called with the request before any operation exists; raising ``ValueError``
            refuses the RPC with INVALID_ARGUMENT (an ``OperationError`` with its own code).
        timeout: seconds the body may run; past it the operation ends DEADLINE_EXCEEDED and the
            handler is signalled (``op.cancelled`` becomes true).
        resumable: on a durable store, when the server running an operation stops before it
            finishes, run the handler again from the stored request (at least once semantics:
            a handler may run more than once for one operation) instead of ending it ABORTED.
        request_id: ``request_id(request)`` gives the request's AIP-155 idempotency key (e.g.
            ``lambda r: r.request_id``); a repeated create with the same key for the same
            method returns the operation the first one created and starts nothing; the same key
            with a different request is refused with ALREADY_EXISTS. An empty key opts out.
        inline_timeout: seconds the create RPC itself may wait for the operation: when the
            work finishes by then, the RPC returns the operation already done (one round trip
            instead of two); otherwise it returns it unfinished, as without the option.

    Raises:
        TypeError: at decoration (import) time, for a bad ``response_type``/``metadata_type``, a
            bare ``@long_running`` without parentheses (write ``@long_running()``), a function
            of the wrong shape, or an option of the wrong type (the message names it). At
            registration, for types that differ from the proto's ``operation_info``, or none
            given where the proto declares none.
        ValueError: an option of the right type out of range (``timeout=0``, say).

    Example:
        >>> class Common(tls_pb2_grpc.CommonServicer):
        ...     @lrofw.long_running()  # types from tls.proto's operation_info
        ...     def ProvisionDut(self, request, op):
        ...         op.report(tls_pb2.ProvisionDutMetadata(stage="flashing", percent=40))
        ...         return tls_pb2.ProvisionDutResponse()
        >>> class Explicit(tls_pb2_grpc.CommonServicer):
        ...     @lrofw.long_running(tls_pb2.ProvisionDutResponse,
        ...                         metadata_type=tls_pb2.ProvisionDutMetadata)
        ...     def ProvisionDut(self, request, op):
        ...         return tls_pb2.ProvisionDutResponse()
    """
    if response_type is not None:
        response_type = _message_class(response_type, "response_type")
    if metadata_type is not None:
        metadata_type = _message_class(metadata_type, "metadata_type")
    if validate is not None:
        _check.function("validate", validate, "request -> None, raising ValueError to refuse it")
    timeout = _check.optional(_check.positive_seconds, "timeout", timeout)
    if request_id is not None:
        _check.function("request_id", request_id, "request -> str")
    inline_timeout = _check.optional(_check.non_negative_seconds, "inline_timeout", inline_timeout)
    _check.flag("resumable", resumable)

    def decorate(fn: F) -> F:
        if not callable(fn):
            raise TypeError(f"@long_running decorates functions, got {fn!r}")
        spec = MethodSpec(
            fn,
            response_type,
            metadata_type,
            validate,
            timeout,
            _takes_self(fn),
            resumable,
            request_id,
            inline_timeout,
        )

        # The method as a servicer attribute: a coroutine for async handlers (grpc.aio awaits
        # it), a plain call otherwise. add_servicer_to_server on an aio server serves every
        # decorated method through start_async instead.
        def wrapper(
            wrapped: Any, instance: object, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> Any:
            request, context = _rpc_args(spec, args, kwargs)
            if spec.is_async:
                return start_async(spec, instance, request, context)
            try:
                op, manager, inline = start(spec, instance, request, context)
                return manager.wait(op.name, inline) if inline > 0 else op
            except Exception as exc:
                code, message = _failure(spec, exc)
            context.abort(code, message)

        return _LongRunning(spec, wrapper)  # type: ignore[return-value]

    return decorate


def _rpc_args(spec: MethodSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    if len(args) == 2 and not kwargs:
        return args[0], args[1]
    raise TypeError(
        f"{spec.name} is a gRPC method: call it as method(request, context), "
        f"got {len(args)} positional and {sorted(kwargs)} keyword arguments"
    )


def _failure(spec: MethodSpec, exc: Exception) -> tuple[grpc.StatusCode, str]:
    return _rpc.status_of(exc, f"{spec.name} (creating an operation)")


async def start_async(
    spec: MethodSpec, instance: object, request: Any, context: grpc.aio.ServicerContext[Any, Any]
) -> Any:
    """:func:`start` for a ``grpc.aio`` server: the same decisions, with the store written from
    a thread (never on the event loop) and an awaited abort."""
    try:
        binding, principal = _prepared(spec, instance, request, context)
        manager = binding.manager
        op = await manager.launch_async(
            binding.runner(spec),
            request,
            invocation_metadata=tuple(context.invocation_metadata() or ()),
            peer=context.peer(),
            principal=principal,
        )
        inline = _inline_budget(spec, op, context)
        return await manager.wait_async(op.name, inline) if inline > 0 else op
    except Exception as exc:
        code, message = _failure(spec, exc)
    await context.abort(code, message)


def _prepared(
    spec: MethodSpec, instance: object, request: Any, context: Any
) -> tuple[Binding, str | None]:
    """The binding of a decorated method's servicer and the caller's principal (None: no
    identify hook), once the caller was identified and the request passed validation."""
    binding = binding_of(instance) if instance is not None else None
    if binding is None:
        raise errors.FailedPrecondition(
            f"{spec.name} is a @long_running method, but its servicer was not registered with "
            "lrofw.add_servicer_to_server(servicer, server, manager=...); register it that way"
        )
    caller = _rpc.caller_of(binding.hooks, context)  # before the request is even looked at
    # Bytes that did not parse arrive as a placeholder (add_servicer_to_server parses
    # leniently), refused here, on the path both the sync and the aio entry take.
    _rpc.decoded(request)
    _rpc.validate(spec.validate, request)
    return binding, None if caller is None else caller.principal


def _inline_budget(spec: MethodSpec, op: Operation, context: Any) -> float:
    """How long the create RPC may still wait for ``op`` (``inline_timeout``), or 0."""
    if not spec.inline_timeout or op.done:
        return 0.0
    return _core.wait_budget(
        spec.inline_timeout, spec.inline_timeout, _rpc.deadline(context), _rpc.DEADLINE_MARGIN
    )


def start(
    spec: MethodSpec, instance: object, request: Any, context: Any
) -> tuple[Operation, Manager, float]:
    """Create the operation for one call of a decorated method and start its handler; returns
    it, its manager, and how long the create RPC may still wait for it (``inline_timeout``)."""
    binding, principal = _prepared(spec, instance, request, context)
    op = binding.manager.launch(
        binding.runner(spec),
        request,
        invocation_metadata=tuple(context.invocation_metadata() or ()),
        peer=context.peer(),
        principal=principal,
    )
    return op, binding.manager, _inline_budget(spec, op, context)
