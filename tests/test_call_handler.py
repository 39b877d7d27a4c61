"""Tests for ``lrofw.testing.call_handler``: a handler's body run without a server ends as a server
would end its operation (the last tests run the same handlers both ways and compare)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest
import tls_pb2
import tls_pb2_grpc
from factories import (
    LONG,
    RESPONSE,
    AsyncHandler,
    Handler,
    Metadata,
    Request,
    Response,
    cancel,
    common,
    create,
    eventually,
    finished,
    get,
    served,
)
from google.longrunning import operations_pb2
from google.rpc import error_details_pb2, status_pb2
from servicer import AsyncCommon, Common

import lrofw
from lrofw import _core
from lrofw.testing import HandlerResult, call_handler, serve

REQUEST = Request(name="dut", image_path="gs://img")
RESPONSE_TYPE = "chromiumos.config.api.test.tls.ProvisionDutResponse"

#: Runs a test once with a ``def`` body and once with an ``async def`` body.
both_bodies = pytest.mark.parametrize("asynchronous", [False, True], ids=["def", "async"])


def call(handler: Handler | AsyncHandler, *, asynchronous: bool = False, **options: Any) -> Any:
    """A Common servicer's ProvisionDut that runs ``handler`` (see ``factories.common``)."""
    return common(handler, asynchronous=asynchronous, **options).ProvisionDut


# --- response, error, reports ---------------------------------------------------------------------


@both_bodies
def test_a_returned_response_is_the_result_and_reports_come_in_order(asynchronous: bool) -> None:
    """The response comes back with no error, and every report in the order made."""

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        for percent in (10, 50, 90):
            assert op.report(Metadata(stage="step", percent=percent)) is True
        return Response(installed_image=request.image_path)

    result = call_handler(call(handler, asynchronous=asynchronous), REQUEST)
    assert isinstance(result, HandlerResult)
    assert result.response == Response(installed_image="gs://img")
    assert result.error is None and result.code == grpc.StatusCode.OK
    assert [m.percent for m in result.reports] == [10, 50, 90]
    assert result.name.startswith("operations/")


def test_reports_are_kept_as_they_were_when_reported() -> None:
    """A message changed and reported again is two reports, not one reported twice."""

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        progress = Metadata(stage="a")
        op.report(progress)
        progress.stage = "b"
        op.report(progress)
        return RESPONSE

    result = call_handler(call(handler), REQUEST)
    assert [m.stage for m in result.reports] == ["a", "b"]


def test_the_handler_sees_its_operation_as_on_a_server() -> None:
    """op.name is the result's name and op.method the RPC's full name."""
    seen: list[tuple[str, str]] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        seen.append((op.name, op.method))
        return RESPONSE

    result = call_handler(call(handler), REQUEST)
    assert seen == [(result.name, "/chromiumos.config.api.test.tls.Common/ProvisionDut")]


@both_bodies
def test_an_operation_error_keeps_its_code_message_and_details(asynchronous: bool) -> None:
    """OperationError(code, message, details) is the error, as on a server."""
    info = error_details_pb2.ErrorInfo(reason="NO_DUT", domain="tls")

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        raise lrofw.OperationError(grpc.StatusCode.NOT_FOUND, f"Unknown DUT {request.name}", [info])

    result = call_handler(call(handler, asynchronous=asynchronous), REQUEST)
    assert result.response is None and result.code == grpc.StatusCode.NOT_FOUND
    assert result.error is not None and result.error.message == "Unknown DUT dut"
    detail = error_details_pb2.ErrorInfo()
    assert result.error.details[0].Unpack(detail) and detail == info


@both_bodies
def test_an_unexpected_exception_is_internal_with_the_safe_message(
    asynchronous: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Any other exception is INTERNAL naming the op, never its text; the traceback is logged."""

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        raise KeyError("secret-token")

    result = call_handler(call(handler, asynchronous=asynchronous), REQUEST)
    assert result.code == grpc.StatusCode.INTERNAL
    assert result.error is not None
    assert result.error.message == f"internal error in operation {result.name}"
    logged = [r for r in caplog.records if r.exc_info and r.levelno == logging.ERROR]
    assert logged and "secret-token" in str(logged[0].exc_info[1])  # type: ignore[index]


@both_bodies
def test_returning_another_type_is_internal_naming_both(asynchronous: bool) -> None:
    """A return value of the wrong type is INTERNAL saying what came and what was expected."""

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        return Metadata()

    result = call_handler(call(handler, asynchronous=asynchronous), REQUEST)
    assert result.code == grpc.StatusCode.INTERNAL and result.error is not None
    assert (
        result.error.message == f"handler returned ProvisionDutMetadata, expected {RESPONSE_TYPE}"
    )


def test_a_report_of_the_wrong_type_raises_type_error_in_the_handler() -> None:
    """op.report() refuses another message type, as on a server; uncaught, the op is INTERNAL."""
    raised: list[str] = []

    def catches(request: Any, op: lrofw.OperationContext) -> object:
        try:
            op.report(Response())
        except TypeError as exc:
            raised.append(str(exc))
        return RESPONSE

    result = call_handler(call(catches), REQUEST)
    assert result.response == RESPONSE and result.reports == ()
    assert raised == [
        "report() expects chromiumos.config.api.test.tls.ProvisionDutMetadata, "
        "got ProvisionDutResponse"
    ]

    def lets_it_go(request: Any, op: lrofw.OperationContext) -> object:
        op.report(Response())
        return RESPONSE

    assert call_handler(call(lets_it_go), REQUEST).code == grpc.StatusCode.INTERNAL


def test_a_report_over_the_size_limit_is_the_handlers_invalid_argument() -> None:
    """Metadata over the default max_metadata_bytes raises InvalidArgument in the handler."""

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        op.report(Metadata(stage="x" * (_core.MAX_METADATA_BYTES + 1)))
        return RESPONSE

    result = call_handler(call(handler), REQUEST)
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT and result.error is not None
    assert "(Manager max_metadata_bytes)" in result.error.message and result.reports == ()


# --- cancel_after and timeout ---------------------------------------------------------------------


def test_cancel_after_cancels_right_after_that_report() -> None:
    """After the Nth report op.cancelled is true, later reports are dropped (False), op.sleep
    returns at once, and the op is CANCELLED though the handler returns a response."""
    seen: list[object] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        for percent in (10, 20, 30):
            seen.append((op.report(Metadata(percent=percent)), op.cancelled))
        seen.append(op.sleep(LONG))
        return RESPONSE

    result = call_handler(call(handler), REQUEST, cancel_after=2)
    assert seen == [(True, False), (True, True), (False, True), True]
    assert result.response is None and result.code == grpc.StatusCode.CANCELLED
    assert result.error == _core.cancelled_status()
    assert [m.percent for m in result.reports] == [10, 20]


def test_cancel_after_zero_cancels_it_as_it_starts() -> None:
    """cancel_after=0: the handler starts with op.cancelled already true."""
    seen: list[bool] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        seen.append(op.cancelled)
        return RESPONSE

    result = call_handler(call(handler), REQUEST, cancel_after=0)
    assert seen == [True] and result.code == grpc.StatusCode.CANCELLED and result.reports == ()


def test_an_async_body_is_cancelled_at_its_next_await() -> None:
    """As on a server, a cancel cancels an async body's task: CancelledError at its await."""
    seen: list[str] = []

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
        op.report(Metadata(stage="started"))
        try:
            await op.sleep(LONG)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        return RESPONSE

    result = call_handler(call(handler, asynchronous=True), REQUEST, cancel_after=1)
    assert seen == ["cancelled"]
    assert result.code == grpc.StatusCode.CANCELLED and len(result.reports) == 1


def test_a_handler_that_raises_after_a_cancel_still_ends_cancelled() -> None:
    """What a stopped handler raises is dropped too: the cancel came first."""

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        op.report(Metadata())
        raise RuntimeError("after the cancel")

    assert call_handler(call(handler), REQUEST, cancel_after=1).code == grpc.StatusCode.CANCELLED


@both_bodies
def test_a_timeout_ends_it_deadline_exceeded_and_stops_the_handler(asynchronous: bool) -> None:
    """Past ``timeout`` the op is DEADLINE_EXCEEDED and the handler's sleep wakes."""
    woke: list[bool] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        op.report(Metadata(stage="waiting"))
        if asynchronous:
            return _sleep_then_respond(op, woke)
        woke.append(op.sleep(LONG))
        return RESPONSE

    result = call_handler(call(handler, asynchronous=asynchronous), REQUEST, timeout=0.05)
    assert woke == ([] if asynchronous else [True])  # an async body's task is cancelled instead
    assert result.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert result.error == _core.deadline_status(0.05)
    assert len(result.reports) == 1


async def _sleep_then_respond(op: Any, woke: list[bool] | None = None) -> object:
    woken = await op.sleep(LONG)
    if woke is not None:
        woke.append(woken)
    return RESPONSE


def test_the_methods_own_timeout_applies_by_default() -> None:
    """Without ``timeout`` the decorator's applies, as on a server."""

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        op.sleep(LONG)
        return RESPONSE

    result = call_handler(call(handler, timeout=0.05), REQUEST)
    assert result.error == _core.deadline_status(0.05)


def test_a_handler_finishing_in_time_is_not_timed_out() -> None:
    """A handler that returns before its timeout keeps its response."""
    result = call_handler(call(lambda request, op: RESPONSE), REQUEST, timeout=LONG)
    assert result.response == RESPONSE


# --- bad arguments --------------------------------------------------------------------------------


class NotLongRunning:
    def ProvisionDut(self, request: Any, op: Any) -> object:
        return RESPONSE


@pytest.mark.parametrize(
    ("method", "text"),
    [
        (NotLongRunning().ProvisionDut, "needs a @long_running method of a servicer instance"),
        (lambda request, op: RESPONSE, "needs a @long_running method of a servicer instance"),
        (Common.ProvisionDut, "not of its class: pass instance.ProvisionDut"),
    ],
    ids=["plain-method", "function", "unbound"],
)
def test_not_a_bound_long_running_method_is_a_type_error(method: Any, text: str) -> None:
    """Anything but a decorated method of an instance is refused with a TypeError saying so."""
    with pytest.raises(TypeError, match=text):
        call_handler(method, REQUEST)


def test_a_request_of_another_type_is_a_type_error() -> None:
    """The request must be the RPC's request type."""
    with pytest.raises(TypeError) as info:
        call_handler(Common().ProvisionDut, Metadata())
    assert str(info.value) == (
        "/chromiumos.config.api.test.tls.Common/ProvisionDut takes "
        "chromiumos.config.api.test.tls.ProvisionDutRequest, got ProvisionDutMetadata"
    )


@pytest.mark.parametrize(
    ("options", "error", "text"),
    [
        ({"cancel_after": "2"}, TypeError, "cancel_after must be an int"),
        ({"cancel_after": True}, TypeError, "cancel_after must be an int"),
        ({"cancel_after": -1}, ValueError, "cancel_after must not be negative"),
        ({"timeout": "1"}, TypeError, "timeout must be a number of seconds"),
        ({"timeout": 0}, ValueError, "timeout must be positive"),
    ],
)
def test_bad_options_are_refused(
    options: dict[str, Any], error: type[Exception], text: str
) -> None:
    """Bad cancel_after / timeout values are refused before the handler runs."""
    ran: list[bool] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        ran.append(True)
        return RESPONSE

    with pytest.raises(error, match=text):
        call_handler(call(handler), REQUEST, **options)
    assert ran == []


def test_a_request_the_server_refuses_raises_that_refusal() -> None:
    """The method's validate hook runs first: a refused request raises as the create RPC fails."""
    with pytest.raises(lrofw.errors.InvalidArgument, match="name must not be empty"):
        call_handler(Common().ProvisionDut, Request(name=""))


def test_an_async_body_from_a_running_loop_is_a_clear_error() -> None:
    """call_handler blocks: inside a coroutine it says how to call it instead."""

    async def inside() -> None:
        with pytest.raises(RuntimeError, match=r"asyncio\.to_thread"):
            call_handler(AsyncCommon(step_seconds=0).ProvisionDut, REQUEST)
        known = Request(name="some host", image_path="gs://img")
        result = await asyncio.to_thread(
            call_handler, AsyncCommon(step_seconds=0).ProvisionDut, known
        )
        assert result.response == Response(installed_image="gs://img")

    asyncio.run(inside())


# --- the same as a server -------------------------------------------------------------------------


def _big(request: Any, op: lrofw.OperationContext) -> object:
    return Response(installed_image="x" * (_core.MAX_RESPONSE_BYTES + 1))


def _bad_report(request: Any, op: lrofw.OperationContext) -> object:
    op.report(Response())
    return RESPONSE


def _fails(request: Any, op: lrofw.OperationContext) -> object:
    raise lrofw.errors.FailedPrecondition("the DUT is busy")


def _crashes(request: Any, op: lrofw.OperationContext) -> object:
    raise ZeroDivisionError


def _gives_up(request: Any, op: lrofw.OperationContext) -> object:
    raise lrofw.OperationCancelled("given up")


def _raises_cancelled_error(request: Any, op: lrofw.OperationContext) -> object:
    raise asyncio.CancelledError  # not a cancel of lrofw's: on an event loop, ABORTED


def _reports(request: Any, op: lrofw.OperationContext) -> object:
    op.report(Metadata(stage="one", percent=50))
    return Response(installed_image=request.image_path)


AGREEING: dict[str, Handler] = {
    "response": _reports,
    "operation-error": _fails,
    "operation-cancelled": _gives_up,
    "unexpected": _crashes,
    "wrong-type": lambda request, op: None,
    "bad-report": _bad_report,
    "too-large": _big,
    "cancelled-error": _raises_cancelled_error,
}


def _ended(response: Any, error: status_pb2.Status | None, name: str) -> tuple[Any, Any]:
    """(response, error) with the operation's own name taken out of the error's message."""
    if error is None:
        return response, None
    out = status_pb2.Status()
    out.CopyFrom(error)
    out.message = out.message.replace(name, "<op>")
    return response, out


def _on_server(op: operations_pb2.Operation) -> tuple[Any, Any]:
    """(response, error) of a finished op read back from the server."""
    response = _core.unpack(op.response, Response) if op.HasField("response") else None
    return _ended(response, op.error if op.HasField("error") else None, op.name)


def _by_call(result: HandlerResult) -> tuple[Any, Any]:
    return _ended(result.response, result.error, result.name)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["def-on-server", "async-on-aio"])
@pytest.mark.parametrize("case", sorted(AGREEING))
def test_call_handler_agrees_with_a_server(case: str, asynchronous: bool) -> None:
    """The same handler ends the same (response and error) through a server and call_handler."""
    handler = AGREEING[case]
    request = Request(name="dut", image_path="gs://img")
    with served(handler, aio=asynchronous, asynchronous=asynchronous) as srv:
        op = finished(srv, create(srv, "dut", "gs://img").name)
    by_call = call_handler(call(handler, asynchronous=asynchronous), request)
    assert _by_call(by_call) == _on_server(op)
    if case == "unexpected":  # the INTERNAL message names the op, both ways
        assert by_call.error is not None and by_call.name in by_call.error.message


@pytest.mark.parametrize("asynchronous", [False, True], ids=["def-on-server", "async-on-aio"])
def test_a_cancel_agrees_with_a_server(asynchronous: bool) -> None:
    """A handler cancelled after its first report ends the same both ways (CANCELLED), though
    it returns a response once it notices."""
    noticed: list[bool] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        op.report(Metadata(stage="one"))
        if asynchronous:
            return _sleep_then_respond(op)
        noticed.append(op.sleep(LONG))
        return RESPONSE

    with served(handler, aio=asynchronous, asynchronous=asynchronous) as srv:
        name = create(srv).name
        eventually(lambda: get(srv, name).HasField("metadata"), "the first report")
        cancel(srv, name)
        op = finished(srv, name)
    by_call = call_handler(call(handler, asynchronous=asynchronous), REQUEST, cancel_after=1)
    assert _by_call(by_call) == _on_server(op)
    assert by_call.code == grpc.StatusCode.CANCELLED
    metadata = Metadata()
    assert op.metadata.Unpack(metadata) and by_call.reports == (metadata,)
    if not asynchronous:
        assert noticed == [True, True]  # the server's run, then call_handler's


@pytest.mark.parametrize("asynchronous", [False, True], ids=["def-on-server", "async-on-aio"])
def test_a_timeout_agrees_with_a_server(asynchronous: bool) -> None:
    """A handler past its method's timeout ends DEADLINE_EXCEEDED both ways."""

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        if asynchronous:
            return _sleep_then_respond(op)
        op.sleep(LONG)
        return RESPONSE

    with served(handler, aio=asynchronous, asynchronous=asynchronous, timeout=0.05) as srv:
        op = finished(srv, create(srv).name)
    by_call = call_handler(call(handler, asynchronous=asynchronous, timeout=0.05), REQUEST)
    assert _by_call(by_call) == _on_server(op)
    assert by_call.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_the_example_servicer_agrees_with_a_server() -> None:
    """The example's own handler, for a known and an unknown DUT, both ways."""
    stages = {"some host": ["downloading", "flashing", "verifying", "done"], "other host": []}
    for name, reported in stages.items():
        request = tls_pb2.ProvisionDutRequest(name=name, image_path="gs://img")
        with serve(Common(step_seconds=0)) as srv:
            created = tls_pb2_grpc.CommonStub(srv.channel).ProvisionDut(request, timeout=LONG)
            op = finished(srv, created.name)
        by_call = call_handler(Common(step_seconds=0).ProvisionDut, request)
        assert _by_call(by_call) == _on_server(op)
        assert [m.stage for m in by_call.reports] == reported
