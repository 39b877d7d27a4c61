"""Tests for lrofw.decorator (long_running) and lrofw.add_servicer_to_server."""

from __future__ import annotations

import contextvars
import inspect
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import tls_pb2_grpc
from factories import METHOD, Metadata, Request, Response, create, listed_names, raw_served
from google.protobuf.message import Message

import lrofw
from lrofw import decorator
from lrofw import servicer as lrofw_servicer
from lrofw.testing import serve

#: Set by the code that calls a servicer method; read by handlers on the worker thread.
CALLER_TAG: contextvars.ContextVar[str] = contextvars.ContextVar("caller_tag", default="unset")


class MethodServicer(tls_pb2_grpc.CommonServicer):
    """Provisions through a decorated method ``(self, request, op)``."""

    def __init__(self) -> None:
        self.seen: dict[str, object] = {}

    @lrofw.long_running(Response, metadata_type=Metadata)
    def ProvisionDut(self, request: Any, op: lrofw.OperationContext) -> Any:
        """Installs the image, reporting progress once."""
        self.seen.update(
            tag=CALLER_TAG.get(),
            thread=threading.current_thread().name,
            method=op.method,
            invocation_metadata=op.invocation_metadata,
            peer=op.peer,
        )
        CALLER_TAG.set("changed by the handler")
        op.report(Metadata(stage="flashing", percent=40))
        return Response(installed_image=request.image_path)


def provision(request: Any, op: lrofw.OperationContext) -> Any:
    """Installs the image (a plain function, no self)."""
    return Response(installed_image=f"{request.image_path} by {op.method}")


class PlainServicer(tls_pb2_grpc.CommonServicer):
    """Provisions through a plain ``(request, op)`` function assigned as a class attribute."""

    ProvisionDut = lrofw.long_running(Response)(provision)


class FakeContext:
    """The parts of grpc.ServicerContext a decorated method uses when called directly."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """Returns the metadata the caller sent."""
        return (("x-request-id", "req-7"),)

    def peer(self) -> str:
        """Returns the caller's address."""
        return "ipv4:10.1.2.3:4567"

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        """Records the status and raises, as grpc's abort does."""
        self.aborted = (code, details)
        raise RuntimeError(f"aborted: {code.name}")


def bare_server() -> Any:
    """A grpc server that is never started: enough for registration tests."""
    return grpc.server(ThreadPoolExecutor(1))


# --- decoration-time errors ---------------------------------------------------------------------


def test_bare_decorator_on_a_function_is_a_type_error() -> None:
    """@long_running without parentheses fails when applied, naming the fix."""
    with pytest.raises(TypeError, match=r"parentheses: @lrofw\.long_running\(\) takes the types"):

        @lrofw.long_running  # type: ignore[arg-type]
        def ProvisionDut(request: Any, op: Any) -> Any:
            """Never decorated."""
            return Response()


def test_bare_decorator_on_a_method_is_a_type_error() -> None:
    """@long_running without parentheses on a servicer method fails when the class is defined."""
    with pytest.raises(TypeError, match="parentheses"):

        class Servicer(tls_pb2_grpc.CommonServicer):
            """Never defined."""

            @lrofw.long_running  # type: ignore[arg-type]
            def ProvisionDut(self, request: Any, op: Any) -> Any:
                """Never decorated."""
                return Response()


@pytest.mark.parametrize("value", [3, Response(), Message, str, "ProvisionDutResponse"], ids=repr)
def test_response_type_must_be_a_message_class(value: object) -> None:
    """A response_type that is not a concrete message class is refused at decoration time."""
    with pytest.raises(TypeError, match="response_type"):
        lrofw.long_running(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [3, Metadata(), Message, dict, "ProvisionDutMetadata"], ids=repr)
def test_metadata_type_must_be_a_message_class(value: object) -> None:
    """A metadata_type that is not a concrete message class is refused at decoration time."""
    with pytest.raises(TypeError, match="metadata_type"):
        lrofw.long_running(Response, metadata_type=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["check_request", 3, Request()], ids=repr)
def test_validate_must_be_callable(value: object) -> None:
    """A validate hook that cannot be called is refused at decoration time."""
    with pytest.raises(TypeError, match="validate"):
        lrofw.long_running(Response, validate=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (0.0, ValueError),
        (-1, ValueError),
        (-0.001, ValueError),
        (float("nan"), ValueError),
        ("5", TypeError),
        (True, TypeError),
    ],
    ids=repr,
)
def test_timeout_must_be_positive(value: object, error: type[Exception]) -> None:
    """A timeout that is not a positive number is refused at decoration time: TypeError for
    the wrong type, ValueError for a number out of range."""
    with pytest.raises(error, match="timeout"):
        lrofw.long_running(Response, timeout=value)  # type: ignore[arg-type]


def _no_args() -> None:
    """Takes nothing."""


def _request_only(request: Any) -> None:
    """Takes no op."""


def _four(a: Any, b: Any, c: Any, d: Any) -> None:
    """Takes one too many."""


def _self_only(self: Any) -> None:
    """A method that takes neither request nor op."""


def _self_request(self: Any, request: Any) -> None:
    """A method that takes no op."""


def _self_and_three(self: Any, request: Any, op: Any, extra: Any) -> None:
    """A method that takes one too many."""


def _required_keyword(request: Any, op: Any, *, flag: bool) -> None:
    """Needs a keyword nobody passes."""


@pytest.mark.parametrize(
    "fn",
    [
        _no_args,
        _request_only,
        _four,
        _self_only,
        _self_request,
        _self_and_three,
        _required_keyword,
    ],
    ids=lambda fn: fn.__name__,
)
def test_wrong_shape_is_a_type_error(fn: Callable[..., Any]) -> None:
    """A function that cannot be called as (request, op) or (self, request, op) is refused."""
    with pytest.raises(TypeError, match=r"\(request, op\)"):
        lrofw.long_running(Response)(fn)


def _with_default(request: Any, op: Any, extra: int = 1) -> None:
    """Optional extras are fine."""


def _method_with_keyword(self: Any, request: Any, op: Any, *, flag: bool = False) -> None:
    """Optional keywords are fine."""


@pytest.mark.parametrize(
    ("fn", "takes_self"),
    [(provision, False), (_with_default, False), (_method_with_keyword, True)],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_right_shapes_are_accepted(fn: Callable[..., Any], takes_self: bool) -> None:
    """(request, op) and (self, request, op), with optional extras, are accepted."""
    wrapped = lrofw.long_running(Response)(fn)
    spec = decorator.spec_of(wrapped)
    assert spec is not None
    assert spec.takes_self is takes_self
    assert spec.response_type is Response


def test_async_handler_on_a_sync_server_is_a_type_error() -> None:
    """An async def handler registered on a grpc.server (not grpc.aio) is refused, naming aio."""

    class Async(tls_pb2_grpc.CommonServicer):
        @lrofw.long_running(Response)
        async def ProvisionDut(self, request: Any, op: Any) -> Any:
            """Never run."""
            return Response()

    server = grpc.server(ThreadPoolExecutor(1))
    with lrofw.Manager() as manager, pytest.raises(TypeError, match=r"grpc\.aio\.server"):
        lrofw.add_servicer_to_server(Async(), server, manager=manager)


# --- what the wrapper keeps ---------------------------------------------------------------------


def test_wrapper_keeps_name_doc_wrapped_and_signature() -> None:
    """The decorated function keeps __name__, __doc__, __wrapped__ and its signature."""

    def ProvisionDut(self: Any, request: Any, op: Any) -> Any:
        """Installs an image."""
        return Response()

    wrapped = lrofw.long_running(Response)(ProvisionDut)
    assert wrapped.__name__ == "ProvisionDut"
    assert wrapped.__qualname__ == ProvisionDut.__qualname__
    assert wrapped.__doc__ == "Installs an image."
    assert wrapped.__module__ == __name__
    assert wrapped.__wrapped__ is ProvisionDut
    assert inspect.signature(wrapped) == inspect.signature(ProvisionDut)
    assert inspect.unwrap(wrapped) is ProvisionDut


def test_bound_method_keeps_signature_and_doc() -> None:
    """Bound on an instance, the method's signature drops self like any method's."""
    method = MethodServicer().ProvisionDut
    assert list(inspect.signature(method).parameters) == ["request", "op"]
    assert method.__name__ == "ProvisionDut"
    assert method.__doc__ == "Installs the image, reporting progress once."
    assert inspect.signature(PlainServicer.ProvisionDut) == inspect.signature(provision)


# --- served for real ----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [MethodServicer, PlainServicer], ids=lambda c: c.__name__)
def test_served_for_real_produces_a_done_op(make: Callable[[], object]) -> None:
    """A method or a plain-function attribute, served, answers with an op that finishes."""
    with serve(make()) as srv:
        op = create(srv, "some host", image_path="img-1")
        assert op.name.startswith("operations/")
        done = lrofw.wait(srv.channel, op.name, timeout=10)
        assert done.done
        assert not done.HasField("error")
        response = Response()
        assert done.response.Unpack(response)
        assert response.installed_image.startswith("img-1")
        assert listed_names(srv, filter=f'method = "{METHOD}"') == [op.name]
        ops, _ = srv.manager.list(filter=f'method = "{METHOD}"')
        assert [o.name for o in ops] == [op.name]
        other, _ = srv.manager.list(filter='method = "/other.Service/ProvisionDut"')
        assert other == []


def test_plain_function_sees_the_attribute_name_as_method() -> None:
    """A plain function assigned under another name reports the attribute's full gRPC name."""
    with serve(PlainServicer()) as srv:
        op = create(srv, "some host", image_path="img")
        response = Response()
        assert lrofw.wait(srv.channel, op.name, timeout=10).response.Unpack(response)
    assert response.installed_image == f"img by {METHOD}"


def test_method_servicer_reports_metadata_and_method() -> None:
    """The handler's op knows its full method name, and its report is on the op."""
    servicer = MethodServicer()
    with serve(servicer) as srv:
        op = create(srv, "some host", image_path="img")
        done = lrofw.wait(srv.channel, op.name, timeout=10)
    metadata = Metadata()
    assert done.metadata.Unpack(metadata)
    assert (metadata.stage, metadata.percent) == ("flashing", 40)
    assert servicer.seen["method"] == METHOD


def test_contextvars_of_the_caller_reach_the_worker() -> None:
    """A ContextVar set by the caller is visible in the handler, which runs on a worker thread."""
    servicer = MethodServicer()
    with serve(servicer) as srv:
        token = CALLER_TAG.set("set by the caller")
        try:
            op = servicer.ProvisionDut(Request(image_path="img"), FakeContext())
        finally:
            CALLER_TAG.reset(token)
        done = srv.manager.wait(op.name, timeout=10)
    assert done.done
    assert not done.HasField("error")
    assert servicer.seen["tag"] == "set by the caller"
    assert servicer.seen["thread"] != threading.current_thread().name
    assert str(servicer.seen["thread"]).startswith("lrofw-worker")
    assert servicer.seen["invocation_metadata"] == (("x-request-id", "req-7"),)
    assert servicer.seen["peer"] == "ipv4:10.1.2.3:4567"
    assert CALLER_TAG.get() == "unset"


def test_unregistered_servicer_over_a_real_server_is_failed_precondition() -> None:
    """A decorated method whose servicer lrofw never saw fails the RPC with FAILED_PRECONDITION."""
    with raw_served(MethodServicer()) as srv, pytest.raises(grpc.RpcError) as caught:
        create(srv, "some host")
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "add_servicer_to_server" in caught.value.details()


def test_unregistered_servicer_called_directly_aborts() -> None:
    """Called directly, an unregistered servicer aborts with FAILED_PRECONDITION."""
    context = FakeContext()
    with pytest.raises(RuntimeError, match="FAILED_PRECONDITION"):
        MethodServicer().ProvisionDut(Request(), context)
    assert context.aborted is not None
    assert context.aborted[0] is grpc.StatusCode.FAILED_PRECONDITION


# --- add_servicer_to_server ---------------------------------------------------------------------


def test_operations_service_is_registered_once_for_two_servicers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two servicers on one server with one manager: the Operations service is added once."""
    calls: list[object] = []
    real = lrofw_servicer.add_operations

    def counting(servicer: Any, server: object) -> None:
        calls.append(servicer)
        real(servicer, server)

    monkeypatch.setattr(lrofw_servicer, "add_operations", counting)
    first, second = MethodServicer(), PlainServicer()
    with serve(first, second) as srv:
        assert len(calls) == 1
        assert isinstance(calls[0], lrofw.OperationsServicer)
        assert calls[0].manager is srv.manager
        names = [
            s.ProvisionDut(Request(image_path="i"), FakeContext()).name for s in (first, second)
        ]
        for name in names:
            assert srv.manager.wait(name, timeout=10).done
        op = create(srv, "some host")
        assert lrofw.wait(srv.channel, op.name, timeout=10).done


def test_second_manager_on_one_server_is_refused() -> None:
    """A second, different Manager on the same server is a ValueError and binds nothing."""
    server = bare_server()
    with lrofw.Manager() as first, lrofw.Manager() as second:
        lrofw.add_servicer_to_server(MethodServicer(), server, manager=first)
        lrofw.add_servicer_to_server(PlainServicer(), server, manager=first)
        refused = MethodServicer()
        with pytest.raises(ValueError, match="another Manager"):
            lrofw.add_servicer_to_server(refused, server, manager=second)
        context = FakeContext()
        with pytest.raises(RuntimeError):
            refused.ProvisionDut(Request(), context)
        assert context.aborted is not None
        assert context.aborted[0] is grpc.StatusCode.FAILED_PRECONDITION
        assert second.list() == ([], "")
    server.stop(None)


def test_one_servicer_on_two_servers_never_misroutes() -> None:
    """One servicer on two servers with two managers: refused, or each server finds its ops."""
    servicer = MethodServicer()
    first_manager = lrofw.Manager()
    with serve(servicer, manager=first_manager) as first:
        try:
            with serve(servicer, manager=lrofw.Manager()):
                op = create(first, "some host")
                assert lrofw.wait(first.channel, op.name, timeout=10).done
        except ValueError:
            pass  # refusing the second registration is a correct answer too


def test_servicer_not_from_generated_code_is_a_type_error() -> None:
    """A servicer that does not derive from a generated *Servicer class is a TypeError."""

    class Homemade:
        """Looks like a servicer, is not one."""

        @lrofw.long_running(Response)
        def ProvisionDut(self, request: Any, op: Any) -> Any:
            """Never served."""
            return Response()

    with lrofw.Manager() as manager, pytest.raises(TypeError, match="generated"):
        lrofw.add_servicer_to_server(Homemade(), bare_server(), manager=manager)


def test_manager_must_be_a_manager() -> None:
    """add_servicer_to_server refuses something that is not a Manager."""
    with pytest.raises(TypeError, match="Manager"):
        lrofw.add_servicer_to_server(MethodServicer(), bare_server(), manager=object())  # type: ignore[arg-type]


def test_operations_are_also_registered_method_handlers() -> None:
    """The Operations RPCs get grpc's registered handlers (their own queue) besides the generic."""

    class Recorder:
        def __init__(self) -> None:
            self.generic: list[object] = []
            self.registered: dict[str, dict[str, object]] = {}

        def add_generic_rpc_handlers(self, handlers: object) -> None:
            self.generic.append(handlers)

        def add_registered_method_handlers(self, name: str, handlers: dict[str, object]) -> None:
            self.registered[name] = handlers

    server = Recorder()
    with lrofw.Manager() as manager:
        lrofw_servicer.add_operations(lrofw.OperationsServicer(manager), server)
    assert len(server.generic) == 1
    assert sorted(server.registered["google.longrunning.Operations"]) == [
        "CancelOperation",
        "DeleteOperation",
        "GetOperation",
        "ListOperations",
        "WaitOperation",
    ]
