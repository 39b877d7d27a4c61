"""Tests for how a handler's outcome becomes the operation's result (DESIGN section 4), and for
what a running handler sees (OperationContext), over a real server: each test runs on a
``grpc.server`` and on a ``grpc.aio`` server (where these plain ``def`` handlers run on the
manager's threads). The same rows with ``async def`` handlers are in test_aio.py."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import grpc
import pytest
import tls_pb2
import tls_pb2_grpc
from factories import (
    LONG,
    METHOD,
    RESPONSE,
    Handler,
    cancel,
    create,
    eventually,
    finished,
    get,
    list_ops,
    on_both_servers,
    served,
)
from google.longrunning import operations_pb2
from google.rpc import error_details_pb2

import lrofw
from lrofw.testing import serve

RESPONSE_TYPE = "chromiumos.config.api.test.tls.ProvisionDutResponse"


# --- factories ------------------------------------------------------------------------------------


def run_once(handler: Handler, *, aio: bool, **options: Any) -> operations_pb2.Operation:
    """Runs ``handler`` as one operation on a fresh server (``aio``: a grpc.aio one) and returns
    the finished op."""
    with served(handler, aio=aio, **options) as srv:
        return finished(srv, create(srv).name)


def error_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The log records at ERROR or above."""
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- returns ----------------------------------------------------------------------------------


@on_both_servers
def test_returning_the_response_type_packs_it(aio: bool) -> None:
    """A handler returning its response type finishes the op with that message in response."""
    op = run_once(
        lambda request, op: tls_pb2.ProvisionDutResponse(installed_image=request.name), aio=aio
    )
    assert op.done and op.HasField("response") and not op.HasField("error")
    assert op.response.type_url.endswith("/" + RESPONSE_TYPE)
    out = tls_pb2.ProvisionDutResponse()
    assert op.response.Unpack(out)
    assert out.installed_image == "dut"


@on_both_servers
def test_returning_an_empty_response_is_still_a_response(aio: bool) -> None:
    """An all-defaults response message is a success, not an empty result."""
    op = run_once(lambda request, op: tls_pb2.ProvisionDutResponse(), aio=aio)
    assert op.done and op.HasField("response") and not op.HasField("error")
    assert op.response.Is(tls_pb2.ProvisionDutResponse.DESCRIPTOR)


@pytest.mark.parametrize(
    ("value", "got"),
    [
        (None, "None"),
        (tls_pb2.ProvisionDutMetadata(stage="x"), "ProvisionDutMetadata"),
        (tls_pb2.ProvisionDutRequest(name="x"), "ProvisionDutRequest"),
        ("done", "str"),
        (0, "int"),
        ({"installed_image": "x"}, "dict"),
    ],
    ids=["none", "metadata-type", "request-type", "str", "int", "dict"],
)
@on_both_servers
def test_returning_something_else_is_internal(
    value: object, got: str, caplog: pytest.LogCaptureFixture, aio: bool
) -> None:
    """Returning another type is INTERNAL "handler returned X, expected Y", and logged."""
    caplog.set_level(logging.INFO, logger="lrofw")
    op = run_once(lambda request, op: value, aio=aio)
    message = f"handler returned {got}, expected {RESPONSE_TYPE}"
    assert op.done and not op.HasField("response")
    assert op.error.code == grpc.StatusCode.INTERNAL.value[0]
    assert op.error.message == message
    assert any(message in r.getMessage() and op.name in r.getMessage() for r in caplog.records)


# --- raises OperationError ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (
            lrofw.OperationError(grpc.StatusCode.NOT_FOUND, "Unknown DUT x"),
            grpc.StatusCode.NOT_FOUND,
            "Unknown DUT x",
        ),
        (
            lrofw.OperationError(grpc.StatusCode.FAILED_PRECONDITION, "DUT busy"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "DUT busy",
        ),
        (
            lrofw.OperationError(grpc.StatusCode.INTERNAL, "flash failed"),
            grpc.StatusCode.INTERNAL,
            "flash failed",
        ),
        (
            lrofw.OperationError(grpc.StatusCode.UNAVAILABLE, ""),
            grpc.StatusCode.UNAVAILABLE,
            "",
        ),
        (lrofw.errors.Aborted("lab went down"), grpc.StatusCode.ABORTED, "lab went down"),
        (
            lrofw.errors.PermissionDenied("not your DUT"),
            grpc.StatusCode.PERMISSION_DENIED,
            "not your DUT",
        ),
        (
            lrofw.OperationError(grpc.StatusCode.DATA_LOSS, "ünïcode ✓ message"),
            grpc.StatusCode.DATA_LOSS,
            "ünïcode ✓ message",
        ),
    ],
    ids=[
        "not-found",
        "failed-precondition",
        "internal",
        "empty-message",
        "aborted-subclass",
        "permission-denied-subclass",
        "unicode",
    ],
)
@on_both_servers
def test_raising_operation_error_keeps_code_and_message(
    error: lrofw.OperationError, code: grpc.StatusCode, message: str, aio: bool
) -> None:
    """A raised OperationError becomes the op's error with that code and message."""

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        raise error

    op = run_once(handler, aio=aio)
    assert op.done and not op.HasField("response")
    assert op.error.code == code.value[0]
    assert op.error.message == message


@on_both_servers
def test_raising_operation_error_keeps_details(aio: bool) -> None:
    """The details of a raised OperationError arrive packed in google.rpc.Status.details."""
    info = error_details_pb2.ErrorInfo(reason="DUT_OFFLINE", domain="lab", metadata={"dut": "x"})
    progress = tls_pb2.ProvisionDutMetadata(stage="flashing", percent=40)

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        raise lrofw.OperationError(grpc.StatusCode.UNAVAILABLE, "DUT offline", [info, progress])

    op = run_once(handler, aio=aio)
    assert op.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert op.error.message == "DUT offline"
    assert len(op.error.details) == 2
    got_info, got_progress = error_details_pb2.ErrorInfo(), tls_pb2.ProvisionDutMetadata()
    assert op.error.details[0].Unpack(got_info) and got_info == info
    assert op.error.details[1].Unpack(got_progress) and got_progress == progress


# --- raises grpc.RpcError from a downstream call --------------------------------------------------


def downstream(code: grpc.StatusCode, details: str) -> tls_pb2_grpc.CommonServicer:
    """A plain (not long-running) Common servicer whose ProvisionDut aborts with ``code``."""

    class Downstream(tls_pb2_grpc.CommonServicer):
        def ProvisionDut(self, request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(code, details)

    return Downstream()


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
    ],
)
@on_both_servers
def test_raising_downstream_rpc_error_keeps_its_code_and_details(
    code: grpc.StatusCode, aio: bool
) -> None:
    """A grpc.RpcError from a real downstream call becomes the op's error with its code/details."""
    details = f"downstream says {code.name.lower()}"
    raised: list[grpc.RpcError] = []
    with serve(downstream(code, details), manager=lrofw.Manager()) as down:

        def handler(request: Any, op: lrofw.OperationContext) -> object:
            try:
                return tls_pb2_grpc.CommonStub(down.channel).ProvisionDut(request, timeout=LONG)
            except grpc.RpcError as exc:
                raised.append(exc)
                raise

        op = run_once(handler, aio=aio)
    assert [exc.code() for exc in raised] == [code]  # the downstream call really failed
    assert op.done and not op.HasField("response")
    assert op.error.code == code.value[0]
    assert op.error.message == details


@on_both_servers
def test_downstream_deadline_exceeded_keeps_its_code(aio: bool) -> None:
    """A downstream call that runs out of time makes the op DEADLINE_EXCEEDED."""
    gate = threading.Event()

    class Slow(tls_pb2_grpc.CommonServicer):
        def ProvisionDut(self, request: Any, context: grpc.ServicerContext) -> Any:
            gate.wait(LONG)
            return operations_pb2.Operation(name="operations/x")

    with serve(Slow(), manager=lrofw.Manager()) as down:
        try:

            def handler(request: Any, op: lrofw.OperationContext) -> object:
                return tls_pb2_grpc.CommonStub(down.channel).ProvisionDut(request, timeout=0.1)

            op = run_once(handler, aio=aio)
        finally:
            gate.set()
    assert op.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


# --- cancellation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (lrofw.OperationCancelled("stopped by the user"), "stopped by the user"),
        (lrofw.OperationError(grpc.StatusCode.CANCELLED, "gave up"), "gave up"),
    ],
    ids=["OperationCancelled", "OperationError-CANCELLED"],
)
@on_both_servers
def test_raising_operation_cancelled_is_cancelled(
    error: lrofw.OperationError, message: str, aio: bool
) -> None:
    """A handler raising OperationCancelled ends the op CANCELLED (code 1)."""

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        raise error

    op = run_once(handler, aio=aio)
    assert op.done and not op.HasField("response")
    assert op.error.code == 1
    assert op.error.message == message


@pytest.mark.parametrize(
    "returned",
    [None, RESPONSE, tls_pb2.ProvisionDutMetadata(), "raise-cancelled"],
    ids=["none", "response", "wrong-type", "raises-OperationCancelled"],
)
@on_both_servers
def test_handler_that_observes_cancel_and_stops_is_cancelled(returned: object, aio: bool) -> None:
    """A handler that sees op.cancelled and stops leaves the op CANCELLED, whatever it returns."""
    started, stopped = threading.Event(), threading.Event()

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        started.set()
        while not op.cancelled:
            op.sleep(LONG)
        stopped.set()
        if returned == "raise-cancelled":
            raise lrofw.OperationCancelled("stopping")
        return returned

    with served(handler, aio=aio) as srv:
        name = create(srv).name
        assert started.wait(LONG)
        cancel(srv, name)
        assert stopped.wait(LONG)
        srv.manager.close(grace=LONG)  # drains: the handler's return has been dealt with
        op = get(srv, name)
    assert op.done and not op.HasField("response")
    assert op.error.code == 1


@pytest.mark.parametrize("stopped_by", ["cancel", "timeout", "close"])
@on_both_servers
def test_dropped_return_after_stop_logs_no_error(
    stopped_by: str, caplog: pytest.LogCaptureFixture, aio: bool
) -> None:
    """A stopped handler's bare ``return`` is dropped silently, not logged as an error."""
    started, stopped = threading.Event(), threading.Event()

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        started.set()
        woke = op.sleep(LONG)
        stopped.set()
        if woke:
            return None  # stopped: whatever is returned now is discarded
        return RESPONSE

    caplog.set_level(logging.DEBUG, logger="lrofw")
    options = {"timeout": 0.1} if stopped_by == "timeout" else {}
    with served(handler, aio=aio, **options) as srv:
        name = create(srv).name
        assert started.wait(LONG)
        if stopped_by == "cancel":
            cancel(srv, name)
        srv.manager.close(grace=LONG if stopped_by != "close" else 0.1)
        assert stopped.wait(LONG)
        # After an abort close() does not wait for the handler; no public hook says it returned.
        eventually(lambda: not srv.manager.registry.count(), "the handler to return")
        op = get(srv, name)
    expected = {"cancel": 1, "timeout": 4, "close": 10}[stopped_by]
    assert op.error.code == expected
    assert error_records(caplog) == []


# --- the method's own timeout ---------------------------------------------------------------------


@on_both_servers
def test_running_past_the_timeout_is_deadline_exceeded(aio: bool) -> None:
    """A handler running past ``timeout=`` ends DEADLINE_EXCEEDED and sees op.cancelled."""
    seen: list[tuple[bool, bool]] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        woke = op.sleep(LONG)
        seen.append((woke, op.cancelled))
        return RESPONSE

    with served(handler, timeout=0.2, aio=aio) as srv:
        start = time.monotonic()
        name = create(srv).name
        op = finished(srv, name)
        elapsed = time.monotonic() - start
        srv.manager.close(grace=LONG)
        later = get(srv, name)
    assert op.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "0.2" in op.error.message
    assert 0.18 <= elapsed < 5
    assert seen == [(True, True)]
    assert later == op  # the handler's later return was dropped


@on_both_servers
def test_timeout_signals_a_handler_that_ignores_it(aio: bool) -> None:
    """The op ends DEADLINE_EXCEEDED at the timeout even while the handler keeps running."""
    gate, done = threading.Event(), threading.Event()
    seen: list[bool] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        gate.wait(LONG)
        seen.append(op.cancelled)
        done.set()
        return RESPONSE

    with served(handler, timeout=0.2, gates=(gate,), aio=aio) as srv:
        name = create(srv).name
        op = finished(srv, name)  # done while the handler still blocks on the gate
        assert not done.is_set()
        gate.set()
        srv.manager.close(grace=LONG)
        later = get(srv, name)
    assert op.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert seen == [True]
    assert later == op


@on_both_servers
def test_finishing_within_the_timeout_is_not_overwritten(aio: bool) -> None:
    """An op that finishes before its timeout keeps its response after the timeout passes."""

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        if request.name == "fast":
            return RESPONSE
        op.sleep(LONG)  # woken by the timeout
        return RESPONSE

    with served(handler, timeout=0.2, aio=aio) as srv:
        fast = create(srv, "fast").name
        slow = create(srv, "slow").name  # its timeout falls after fast's
        assert finished(srv, fast).HasField("response")
        assert finished(srv, slow).error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        op = get(srv, fast)
    assert op.HasField("response") and not op.HasField("error")


# --- raises anything else -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        KeyError("secret"),
        RuntimeError("secret password hunter2"),
        ValueError("secret"),
        TypeError("secret"),
        ZeroDivisionError("secret"),
    ],
    ids=lambda exc: type(exc).__name__,
)
@on_both_servers
def test_raising_anything_else_is_internal_and_generic(
    exc: Exception, caplog: pytest.LogCaptureFixture, aio: bool
) -> None:
    """Any other exception is INTERNAL naming the op; its text and traceback go to the log only."""
    caplog.set_level(logging.INFO, logger="lrofw")

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        raise exc

    op = run_once(handler, aio=aio)
    assert op.done and not op.HasField("response")
    assert op.error.code == grpc.StatusCode.INTERNAL.value[0]
    assert op.name in op.error.message
    assert "secret" not in op.error.message
    assert type(exc).__name__ not in op.error.message
    assert list(op.error.details) == []
    logged = [r for r in error_records(caplog) if r.exc_info and r.exc_info[1] is exc]
    assert len(logged) == 1
    assert op.name in logged[0].getMessage()
    assert "secret" in caplog.text  # the traceback (with the exception text) is in the log


# --- what a running handler sees ------------------------------------------------------------------


@on_both_servers
def test_report_is_visible_at_once(aio: bool) -> None:
    """op.report() metadata is visible through GetOperation and ListOperations at once."""
    gates = [threading.Event() for _ in range(2)]
    reported = [threading.Event() for _ in range(2)]
    results: list[bool] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        for percent, gate, event in zip((40, 80), gates, reported, strict=True):
            results.append(
                op.report(tls_pb2.ProvisionDutMetadata(stage="flashing", percent=percent))
            )
            event.set()
            gate.wait(LONG)
        return RESPONSE

    def metadata(op: operations_pb2.Operation) -> tls_pb2.ProvisionDutMetadata:
        out = tls_pb2.ProvisionDutMetadata()
        assert op.metadata.Unpack(out)
        return out

    with served(handler, gates=tuple(gates), aio=aio) as srv:
        name = create(srv).name
        seen = []
        for gate, event in zip(gates, reported, strict=True):
            assert event.wait(LONG)
            seen.append(metadata(get(srv, name)).percent)
            listed = list_ops(srv)
            seen.append(metadata(listed.operations[0]).percent)
            gate.set()
        op = finished(srv, name)
    assert results == [True, True]
    assert seen == [40, 40, 80, 80]
    assert metadata(op).percent == 80  # metadata stays after the op is done


@on_both_servers
def test_report_after_cancel_is_dropped(aio: bool) -> None:
    """op.report() on a cancelled (done) op returns False and changes nothing."""
    started, stopped = threading.Event(), threading.Event()
    results: list[bool] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        op.report(tls_pb2.ProvisionDutMetadata(stage="before", percent=10))
        started.set()
        op.sleep(LONG)
        results.append(op.report(tls_pb2.ProvisionDutMetadata(stage="after", percent=90)))
        stopped.set()
        return RESPONSE

    with served(handler, aio=aio) as srv:
        name = create(srv).name
        assert started.wait(LONG)
        cancel(srv, name)
        assert stopped.wait(LONG)
        op = get(srv, name)
    out = tls_pb2.ProvisionDutMetadata()
    assert results == [False]
    assert op.metadata.Unpack(out) and out.stage == "before"


@pytest.mark.parametrize(
    "wrong",
    [tls_pb2.ProvisionDutResponse(), tls_pb2.ProvisionDutRequest(), {"stage": "x"}, "flashing"],
    ids=["response-type", "request-type", "dict", "str"],
)
@on_both_servers
def test_report_of_the_wrong_type_raises_type_error(wrong: object, aio: bool) -> None:
    """op.report() of a non-metadata type raises TypeError in the handler; uncaught, INTERNAL."""
    raised: list[BaseException] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        try:
            op.report(wrong)  # type: ignore[arg-type]
        except Exception as exc:
            raised.append(exc)
            raise
        return RESPONSE

    op = run_once(handler, aio=aio)
    assert [type(exc) for exc in raised] == [TypeError]
    assert op.error.code == grpc.StatusCode.INTERNAL.value[0]
    assert not op.HasField("metadata")


@on_both_servers
def test_handler_sees_the_callers_metadata_peer_name_and_method(aio: bool) -> None:
    """op carries the creating call's metadata and peer, and the op's name and method."""
    seen: dict[str, Any] = {}

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        seen.update(
            metadata=tuple(op.invocation_metadata), peer=op.peer, name=op.name, method=op.method
        )
        return RESPONSE

    with served(handler, aio=aio) as srv:
        name = create(srv, metadata=(("x-user", "alice"), ("x-trace-bin", b"\x00\x01"))).name
        finished(srv, name)
    assert ("x-user", "alice") in seen["metadata"]
    assert ("x-trace-bin", b"\x00\x01") in seen["metadata"]
    assert seen["peer"].startswith(("ipv4:", "ipv6:"))
    assert seen["name"] == name
    assert seen["method"] == METHOD


@on_both_servers
def test_handler_runs_on_an_lrofw_worker_not_the_rpc_thread(aio: bool) -> None:
    """A def handler runs on lrofw's own worker threads (on an aio server too, never on its
    loop), after the create RPC has returned."""
    gate = threading.Event()
    seen: list[str] = []

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        gate.wait(LONG)  # the create RPC must answer while the handler is still blocked here
        seen.append(threading.current_thread().name)
        return RESPONSE

    with served(handler, gates=(gate,), aio=aio) as srv:
        created = create(srv)
        assert not created.done
        gate.set()
        op = finished(srv, created.name)
    assert op.HasField("response")
    assert len(seen) == 1 and seen[0].startswith("lrofw-worker")
    assert seen[0] != threading.current_thread().name
