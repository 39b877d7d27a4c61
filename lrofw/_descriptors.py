"""What the generated code says about a servicer: its ``add_XServicer_to_server``, its service's
full name and descriptor, and each long-running method's types from the proto's
``google.longrunning.operation_info`` option.

No threads, no server: functions of classes and descriptors, used at registration (and by
:func:`lrofw.decorator.types_of`), so a method's types are decided once, in one place.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.longrunning import operations_pb2
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

#: The message a long-running method's RPC returns.
OPERATION = "google.longrunning.Operation"

#: What the decorator's TypeErrors suggest as the explicit form.
_EXPLICIT = "@lrofw.long_running(ResponseType, metadata_type=MetadataType)"


@dataclass(frozen=True)
class OperationTypes:
    """The message classes of one long-running method's operations.

    Attributes:
        response_type: what the handler returns (packed into ``Operation.response``).
        metadata_type: what ``op.report()`` accepts (any message when None).

    Example:
        >>> OperationTypes(tls_pb2.ProvisionDutResponse, tls_pb2.ProvisionDutMetadata)
    """

    response_type: type[Message]
    metadata_type: type[Message] | None


@dataclass(frozen=True)
class Service:
    """A servicer's generated service: its ``add_XServicer_to_server``, full name (e.g.
    ``pkg.Common``) and descriptor (None when the generated module does not lead to it)."""

    add: Callable[[Any, Any], None]
    name: str
    descriptor: ServiceDescriptor | None


class _NameProbe:
    """Stands in for a server while a generated ``add_XServicer_to_server`` runs, and records
    the service names it registers handlers for (nothing is served)."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        for handler in handlers:
            name = getattr(handler, "service_name", None)  # grpc.ServiceRpcHandler
            if callable(name):
                self.names.add(str(name()))

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.names.add(service)


def _probed_name(add: Callable[[Any, Any], None], servicer: object) -> str | None:
    """The full service name ``add`` registers ``servicer`` under, or None if it cannot tell."""
    probe = _NameProbe()
    try:
        add(servicer, probe)
    except AttributeError:  # generated code from a grpc that asks the server for more
        return None
    return probe.names.pop() if len(probe.names) == 1 else None


def _file_descriptors(module: Any) -> list[Any]:
    """The FileDescriptors of the ``_pb2`` modules a generated ``_pb2_grpc`` module imports,
    its own (``x_pb2_grpc`` -> ``x_pb2``) first."""
    own = sys.modules.get(module.__name__.removesuffix("_grpc"))
    found = []
    for value in [own, *vars(module).values()]:
        file = getattr(value, "DESCRIPTOR", None)
        if hasattr(getattr(file, "services_by_name", None), "get") and file not in found:
            found.append(file)
    return found


def _descriptor(module: Any, short: str, full: str | None) -> ServiceDescriptor | None:
    """The descriptor of service ``full`` (or, when its full name is unknown, of the first
    service called ``short``) among the files ``module`` imports, or in the default pool."""
    for file in _file_descriptors(module):
        service = file.services_by_name.get(short)
        if service is not None and (full is None or service.full_name == full):
            return service  # type: ignore[no-any-return]
    if full is not None:
        try:
            return descriptor_pool.Default().FindServiceByName(full)
        except KeyError:
            pass
    return None


def generated_service(servicer: object) -> Service | None:
    """The generated service ``servicer`` implements (found from the first base class in its
    MRO that a ``_pb2_grpc`` module's ``add_XServicer_to_server`` goes with), or None.

    The full name is the one the generated ``add`` function registers (so a ``_pb2_grpc``
    module that imports two files each with a service of that short name is not ambiguous).

    Example:
        >>> generated_service(Common()).name
        'chromiumos.config.api.test.tls.Common'
    """
    for cls in type(servicer).__mro__:
        module = sys.modules.get(cls.__module__)
        add = getattr(module, f"add_{cls.__name__}_to_server", None)
        if module is None or not callable(add):
            continue
        short = cls.__name__.removesuffix("Servicer")
        full = _probed_name(add, servicer)
        service = _descriptor(module, short, full)
        name = full or (str(service.full_name) if service is not None else short)
        return Service(add, name, service)
    return None


def method_descriptor(service: ServiceDescriptor | None, method: str) -> MethodDescriptor | None:
    """The descriptor of ``method`` in ``service``, or None (no service, or no such RPC)."""
    if service is None:
        return None
    return service.methods_by_name.get(method)


def request_type(method: MethodDescriptor | None) -> type[Message] | None:
    """The request message class of ``method``, or None."""
    return None if method is None else message_factory.GetMessageClass(method.input_type)


def _candidates(name: str, package: str) -> list[str]:
    """The full names a type name in an option may mean, innermost scope first, as protoc
    resolves names: ``.a.B`` is absolute; ``B`` in package ``x.y`` is ``x.y.B``, ``x.B``, ``B``."""
    if name.startswith("."):
        return [name[1:]]
    scopes = package.split(".") if package else []
    return [".".join([*scopes[:i], name]) for i in range(len(scopes), -1, -1)]


def _lookup(pool: Any, candidates: list[str]) -> Descriptor | None:
    for candidate in candidates:
        try:
            return pool.FindMessageTypeByName(candidate)  # type: ignore[no-any-return]
        except KeyError:
            continue
    return None


def _declared(
    label: str,
    what: str,
    given: type[Message] | None,
    declared: str,
    method: MethodDescriptor,
) -> type[Message] | None:
    """One of the two types: ``given`` (from the decorator) checked against ``declared`` (the
    proto's name, "" when it names none), or the class the proto names."""
    if not declared:
        return given
    file = method.containing_service.file
    candidates = _candidates(declared, file.package)
    found = _lookup(file.pool, candidates)
    if given is not None:
        given_name = given.DESCRIPTOR.full_name
        if (found.full_name if found is not None else None) == given_name or (
            found is None and given_name in candidates
        ):
            return given
        meaning = found.full_name if found is not None else "not a message lrofw can find"
        raise TypeError(
            f"{label}: @long_running gives {what}={given_name}, but the proto's "
            f'google.longrunning.operation_info says {what}: "{declared}" ({meaning}); make '
            f"them agree: fix the decorator or the .proto (and regenerate), or leave {what} "
            "out of the decorator to take the proto's"
        )
    if found is None:
        raise TypeError(
            f'{label}: the proto\'s google.longrunning.operation_info names {what} "{declared}", '
            f"which is not a message in the descriptor pool (looked for {', '.join(candidates)}); "
            "fix the name in the .proto (a type from another package needs its full name), or "
            "import the _pb2 module that defines it before registering"
        )
    return message_factory.GetMessageClass(found)


def operation_types(
    label: str,
    response_type: type[Message] | None,
    metadata_type: type[Message] | None,
    method: MethodDescriptor | None,
) -> OperationTypes:
    """The types of a long-running method: the decorator's (``response_type``/``metadata_type``,
    None when not given) checked against the method's ``operation_info``, a type the decorator
    leaves out taken from it. ``label`` names the method in errors.

    Raises:
        TypeError: the decorator's and the proto's types differ; the decorator gives no
            response type and the proto none either (or there is no descriptor to read); the
            proto names a type that cannot be found; the RPC does not return an Operation.

    Example:
        >>> method = tls_pb2.DESCRIPTOR.services_by_name["Common"].methods_by_name["ProvisionDut"]
        >>> operation_types("Common.ProvisionDut", None, None, method).response_type
        <class 'tls_pb2.ProvisionDutResponse'>
    """
    if method is None:
        if response_type is None:
            raise TypeError(
                f"{label}: @long_running gives no response type, and lrofw finds no generated "
                "service descriptor with this method to read google.longrunning.operation_info "
                "from (derive the servicer from the generated *Servicer class of a service that "
                f"has this RPC), so give the types: {_EXPLICIT}"
            )
        return OperationTypes(response_type, metadata_type)
    if method.output_type.full_name != OPERATION:
        raise TypeError(
            f"{label} is @long_running, but the proto declares it to return "
            f"{method.output_type.full_name}, not {OPERATION}; change the rpc's return type "
            "in the .proto and regenerate"
        )
    options = method.GetOptions()
    if options.HasExtension(operations_pb2.operation_info):
        info = options.Extensions[operations_pb2.operation_info]
        declared_response, declared_metadata = info.response_type, info.metadata_type
    else:
        declared_response = declared_metadata = ""
    response = _declared(label, "response_type", response_type, declared_response, method)
    if response is None:
        raise TypeError(
            f"{label}: @long_running gives no response type and the proto declares none (no "
            "google.longrunning.operation_info response_type on this rpc); add "
            '`option (google.longrunning.operation_info) = { response_type: "..." '
            'metadata_type: "..." };` to the rpc and regenerate, or give the types: '
            f"{_EXPLICIT}"
        )
    metadata = _declared(label, "metadata_type", metadata_type, declared_metadata, method)
    return OperationTypes(response, metadata)


def resolve(
    owner: type,
    attr: str,
    service: str | None,
    descriptor: ServiceDescriptor | None,
    response_type: type[Message] | None,
    metadata_type: type[Message] | None,
) -> OperationTypes:
    """:func:`operation_types` for method ``attr`` of class ``owner`` serving ``service``
    (None: no generated service), its RPC looked up in ``descriptor``; errors name all three.

    Example:
        >>> resolve(Common, "ProvisionDut", "chromiumos.config.api.test.tls.Common",
        ...         tls_pb2.DESCRIPTOR.services_by_name["Common"], None, None).metadata_type
        <class 'tls_pb2.ProvisionDutMetadata'>
    """
    label = f"{owner.__name__}.{attr}"
    if service is not None:
        label += f" (rpc /{service}/{attr})"
    return operation_types(label, response_type, metadata_type, method_descriptor(descriptor, attr))
