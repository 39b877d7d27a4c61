"""lrofw.CHANNEL_OPTIONS and lrofw.channel_options: which calls a client's channel retries, the
health check round-robin channels use, and keepalive within lrofw.SERVER_OPTIONS."""

from __future__ import annotations

import json
import threading
from collections import Counter
from typing import Any

import grpc
import pytest
import tls_pb2_grpc
from factories import LONG, METHOD, Request, blocked, common, eventually, in_thread, raw_served
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import empty_pb2

import lrofw
from lrofw import errors
from lrofw.testing import serve

CREATE = METHOD.lstrip("/")  # "chromiumos.config.api.test.tls.Common/ProvisionDut"


class Flaky(operations_pb2_grpc.OperationsServicer):
    """Every Operations RPC answers ``code`` to its first ``failures`` calls, then succeeds;
    ``calls`` counts the calls each method received."""

    def __init__(self, code: grpc.StatusCode, failures: int = 1) -> None:
        self.code, self.failures = code, failures
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _answer(self, method: str, context: grpc.ServicerContext, reply: Any) -> Any:
        with self._lock:
            self.calls[method] += 1
            failing = self.calls[method] <= self.failures
        if failing:
            context.abort(self.code, "the server is shutting down; retry on another server")
        return reply

    def GetOperation(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._answer("Get", context, operations_pb2.Operation(name=request.name))

    def ListOperations(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._answer("List", context, operations_pb2.ListOperationsResponse())

    def WaitOperation(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._answer("Wait", context, operations_pb2.Operation(name=request.name))

    def CancelOperation(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._answer("Cancel", context, empty_pb2.Empty())

    def DeleteOperation(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._answer("Delete", context, empty_pb2.Empty())


class FlakyCommon(tls_pb2_grpc.CommonServicer):
    """ProvisionDut, served without lrofw: UNAVAILABLE first, then an operation."""

    def __init__(self) -> None:
        self.calls = 0

    def ProvisionDut(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls += 1
        if self.calls == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "retry on another server")
        return operations_pb2.Operation(name="operations/1")


NAME = "operations/1"
CALLS = {
    "Get": lambda stub: stub.GetOperation(operations_pb2.GetOperationRequest(name=NAME)),
    "List": lambda stub: stub.ListOperations(operations_pb2.ListOperationsRequest()),
    "Wait": lambda stub: stub.WaitOperation(operations_pb2.WaitOperationRequest(name=NAME)),
    "Cancel": lambda stub: stub.CancelOperation(operations_pb2.CancelOperationRequest(name=NAME)),
    "Delete": lambda stub: stub.DeleteOperation(operations_pb2.DeleteOperationRequest(name=NAME)),
}


def call(target: str, method: str, options: Any) -> grpc.StatusCode:
    """Make one Operations call through a channel with ``options``: its status code."""
    with grpc.insecure_channel(target, options=options) as channel:
        try:
            CALLS[method](operations_pb2_grpc.OperationsStub(channel))
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
@pytest.mark.parametrize("method", sorted(CALLS))
def test_channel_options_retry_every_operations_rpc(method: str, code: grpc.StatusCode) -> None:
    """An Operations RPC that a stopping server answers UNAVAILABLE (or CANCELLED) fails on a
    plain channel and succeeds on one with CHANNEL_OPTIONS, on its second attempt."""
    plain, retrying = Flaky(code), Flaky(code)
    with raw_served(operations=plain) as srv:
        without = call(srv.target, method, ())
    with raw_served(operations=retrying) as srv:
        with_options = call(srv.target, method, lrofw.CHANNEL_OPTIONS)
    assert (without, plain.calls[method]) == (code, 1)
    assert (with_options, retrying.calls[method]) == (grpc.StatusCode.OK, 2)


def test_channel_options_do_not_retry_other_errors() -> None:
    """NOT_FOUND (say) is an answer, not a stopping server: asked once."""
    flaky = Flaky(grpc.StatusCode.NOT_FOUND)
    with raw_served(operations=flaky) as srv:
        code = call(srv.target, "Get", lrofw.CHANNEL_OPTIONS)
    assert (code, flaky.calls["Get"]) == (grpc.StatusCode.NOT_FOUND, 1)


def test_channel_options_give_up_after_five_attempts() -> None:
    """A server that never stops failing: five attempts, then the client sees UNAVAILABLE."""
    flaky = Flaky(grpc.StatusCode.UNAVAILABLE, failures=100)
    with raw_served(operations=flaky) as srv:
        code = call(srv.target, "Get", lrofw.CHANNEL_OPTIONS)
    assert (code, flaky.calls["Get"]) == (grpc.StatusCode.UNAVAILABLE, 5)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (lrofw.CHANNEL_OPTIONS, (grpc.StatusCode.UNAVAILABLE, 1)),
        (lrofw.channel_options(CREATE), (grpc.StatusCode.OK, 2)),
        (lrofw.channel_options(METHOD), (grpc.StatusCode.OK, 2)),  # "/pkg.Service/Method"
    ],
    ids=["CHANNEL_OPTIONS", "named", "named-with-slash"],
)
def test_creates_are_retried_only_when_named(options: Any, expected: Any) -> None:
    """CHANNEL_OPTIONS never retries a create; channel_options(create) retries that one."""
    servicer = FlakyCommon()
    with (
        raw_served(servicer) as srv,
        grpc.insecure_channel(srv.target, options=options) as channel,
    ):
        try:
            tls_pb2_grpc.CommonStub(channel).ProvisionDut(Request(name="dut"), timeout=LONG)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
    assert (code, servicer.calls) == expected


@pytest.mark.parametrize(
    ("methods", "error", "match"),
    [
        ((3,), TypeError, "must be a str"),
        (("ProvisionDut",), ValueError, "full method name"),
        (("pkg.Service/",), ValueError, "full method name"),
        (("pkg.Service/Method/x",), ValueError, "full method name"),
        (("pkg..Service/Method",), ValueError, "full method name"),
    ],
)
def test_channel_options_refuse_what_is_not_a_method_name(
    methods: tuple[Any, ...], error: type[Exception], match: str
) -> None:
    """A create method must be "package.Service/Method"."""
    with pytest.raises(error, match=match):
        lrofw.channel_options(*methods)


def test_the_service_config_names_operations_and_the_creates_given() -> None:
    """One method config: Operations (whole service) and each create, retried on UNAVAILABLE
    and CANCELLED; a health check on the overall server."""
    options = dict(lrofw.channel_options(CREATE))
    config = json.loads(str(options["grpc.service_config"]))
    (method_config,) = config["methodConfig"]
    assert method_config["name"] == [
        {"service": "google.longrunning.Operations"},
        {"service": "chromiumos.config.api.test.tls.Common", "method": "ProvisionDut"},
    ]
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
    assert config["healthCheckConfig"] == {"serviceName": ""}
    assert options["grpc.enable_retries"] == 1


def test_keepalive_pings_stay_within_what_lrofw_servers_accept() -> None:
    """A CHANNEL_OPTIONS client pings no more often than SERVER_OPTIONS lets a client ping
    during a call without data (a held WaitOperation), so it is never sent too_many_pings."""
    client = dict(lrofw.CHANNEL_OPTIONS)
    server = dict(lrofw.SERVER_OPTIONS)
    assert int(client["grpc.keepalive_time_ms"]) >= server[
        "grpc.http2.min_ping_interval_without_data_ms"
    ]
    assert "grpc.keepalive_permit_without_calls" not in client  # idle connections: no pings


def test_a_round_robin_channel_skips_a_server_whose_health_is_not_serving() -> None:
    """Through a round-robin channel with CHANNEL_OPTIONS over two servers, once one drains
    (NOT_SERVING, still serving during its notice) every create goes to the other."""
    gate = threading.Event()
    draining, staying = lrofw.Manager(), lrofw.Manager()
    with (
        serve(common(blocked(gate)), manager=draining, health=True) as a,
        serve(common(blocked(gate)), manager=staying, health=True) as b,
    ):
        ports = [srv.target.rpartition(":")[2] for srv in (a, b)]
        target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
        options = [*lrofw.CHANNEL_OPTIONS, ("grpc.lb_policy_name", "round_robin")]
        with grpc.insecure_channel(target, options=options) as channel:
            stub = tls_pb2_grpc.CommonStub(channel)

            def where() -> str:
                name = stub.ProvisionDut(Request(name="dut"), timeout=LONG).name
                try:
                    draining.get(name)
                    return "draining"
                except errors.NotFound:
                    return "staying"

            eventually(lambda: {where() for _ in range(6)} == {"draining", "staying"},
                       "round robin to use both servers")  # fmt: skip
            closer, raised = in_thread(lambda: draining.close(grace=0.0, notice=LONG))
            eventually(lambda: {where() for _ in range(6)} == {"staying"},
                       "creates to go to the other server only")  # fmt: skip
            still_notice = not draining.closed  # the drained server still took creates
            gate.set()
    closer.join(LONG)
    assert still_notice
    assert raised == []
