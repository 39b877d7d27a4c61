"""Draining: health (grpc.health.v1) on sync and aio servers, the order Manager.close drains in,
its on_close callbacks, and a wait that rides through a server's restart on the same port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import tls_pb2_grpc
from factories import (
    LONG,
    RESPONSE,
    Request,
    blocked,
    common,
    create,
    eventually,
    get,
    in_thread,
    on_both_servers,
    rpc_error,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

import lrofw
from lrofw.stores import SQLiteStore
from lrofw.testing import serve

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", "chromiumos.config.api.test.tls.Common", "google.longrunning.Operations")


def check(channel: grpc.Channel, service: str = "") -> int:
    """The health status of ``service``, by the standard stub's Check."""
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=LONG).status)


@contextlib.contextmanager
def watched(channel: grpc.Channel) -> Iterator[queue.Queue[int]]:
    """The statuses a Watch on the overall server ("") streams, as they come."""
    seen: queue.Queue[int] = queue.Queue()
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))

    def read() -> None:
        with contextlib.suppress(grpc.RpcError):  # the stream ends with the test
            for response in stream:
                seen.put(int(response.status))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield seen
    finally:
        stream.cancel()
        reader.join(LONG)


# --- health ---------------------------------------------------------------------------------------


@on_both_servers
def test_health_is_serving_for_the_server_and_every_lrofw_service(aio: bool) -> None:
    """health=True: the overall server, the servicer's service and Operations are SERVING."""
    with serve(common(blocked(threading.Event())), health=True, aio=aio) as srv:
        statuses = [check(srv.channel, service) for service in SERVICES]
        unknown = rpc_error(lambda: check(srv.channel, "no.such.Service"))
    assert statuses == [SERVING] * 3
    assert unknown.code() is grpc.StatusCode.NOT_FOUND


@on_both_servers
def test_without_health_there_is_no_health_service(aio: bool) -> None:
    """health is off by default: Check is UNIMPLEMENTED (a client then counts it healthy)."""
    with serve(common(blocked(threading.Event())), aio=aio) as srv:
        err = rpc_error(lambda: check(srv.channel))
    assert err.code() is grpc.StatusCode.UNIMPLEMENTED


@on_both_servers
def test_health_turns_not_serving_when_close_begins_before_creates_are_refused(
    aio: bool,
) -> None:
    """Watch sees SERVING, then NOT_SERVING as close() begins; during the notice creates still
    work, after it they are UNAVAILABLE; every service reads NOT_SERVING."""
    gate = threading.Event()
    with serve(common(blocked(gate)), health=True, aio=aio) as srv, watched(srv.channel) as seen:
        assert seen.get(timeout=LONG) == SERVING
        noticed = threading.Event()
        srv.manager.on_close(noticed.set)
        # A notice that only the test ends (serve's own close() cuts it short): the op created
        # below proves creates still work during it.
        closer, raised = in_thread(lambda: srv.manager.close(grace=0.0, notice=LONG))
        assert noticed.wait(LONG)
        assert seen.get(timeout=LONG) == NOT_SERVING
        statuses = [check(srv.channel, service) for service in SERVICES]
        during = create(srv).name
        assert srv.manager.draining and not srv.manager.closed
        gate.set()
    closer.join(LONG)
    assert statuses == [NOT_SERVING] * 3
    assert during.startswith("operations/")
    assert not closer.is_alive() and raised == []


@on_both_servers
def test_a_closing_server_refuses_creates_with_unavailable_and_reports_not_serving(
    aio: bool,
) -> None:
    """After the notice: creates UNAVAILABLE ("retry on another server"), health NOT_SERVING."""
    gate = threading.Event()
    with serve(common(blocked(gate)), health=True, aio=aio) as srv:
        running = create(srv).name
        closer, raised = in_thread(lambda: srv.manager.close(grace=LONG))
        eventually(lambda: srv.manager.closed, "creates to be refused")
        err = rpc_error(lambda: create(srv))
        status = check(srv.channel)
        gate.set()
        closer.join(LONG)
        op = get(srv, running)
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert "retry on another server" in (err.details() or "")
    assert status == NOT_SERVING
    assert op.done and op.HasField("response")  # it had its grace
    assert raised == []


def test_two_servicers_on_one_server_share_one_health_service() -> None:
    """A second add_servicer_to_server(..., health=True) adds its service to the same one."""

    class Other(tls_pb2_grpc.CommonServicer):  # a second servicer of the same service
        pass

    manager = lrofw.Manager()
    server = grpc.server(ThreadPoolExecutor(4), options=lrofw.SERVER_OPTIONS)
    lrofw.add_servicer_to_server(common(blocked(threading.Event())), server, manager=manager,
                                 health=True)  # fmt: skip
    lrofw.add_servicer_to_server(Other(), server, manager=manager, health=True)
    port = server.add_insecure_port("localhost:0")
    server.start()
    try:
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            before = check(channel)
            manager.close(grace=0.0)
            after = [check(channel, service) for service in SERVICES]
    finally:
        server.stop(None).wait()
    assert before == SERVING
    assert after == [NOT_SERVING] * 3


def test_health_on_an_aio_server_outside_its_loop_is_a_clear_error() -> None:
    """health=True on a grpc.aio server with no running loop: a RuntimeError that says why."""

    async def make() -> Any:
        return grpc.aio.server()

    server = asyncio.run(make())
    with pytest.raises(RuntimeError, match="coroutine on the server's event loop"):
        lrofw.add_servicer_to_server(
            common(blocked(threading.Event())), server, manager=lrofw.Manager(), health=True
        )


def test_health_must_be_a_bool() -> None:
    """health="yes" is a TypeError naming it."""
    server = grpc.server(ThreadPoolExecutor(1))
    with pytest.raises(TypeError, match="health must be True or False"):
        lrofw.add_servicer_to_server(
            common(blocked(threading.Event())), server, manager=lrofw.Manager(), health="yes"
        )


# --- Manager.close: on_close and notice -----------------------------------------------------------


def test_on_close_runs_once_when_close_begins_and_at_once_after() -> None:
    """A callback runs once, before creates are refused; one added later runs at once; an
    unsubscribed one never runs."""
    manager = lrofw.Manager()
    calls: list[tuple[str, bool]] = []
    manager.on_close(lambda: calls.append(("early", manager.closed)))
    unsubscribe = manager.on_close(lambda: calls.append(("gone", manager.closed)))
    unsubscribe()
    manager.close(grace=0.0)
    manager.close(grace=0.0)
    manager.on_close(lambda: calls.append(("late", manager.closed)))
    assert calls == [("early", False), ("late", True)]


def test_a_failing_on_close_callback_is_logged_and_closing_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A callback that raises is logged; the next one runs and the manager closes."""
    manager = lrofw.Manager()
    ran: list[str] = []

    def fails() -> None:
        raise RuntimeError("listener broke")

    manager.on_close(fails)
    manager.on_close(lambda: ran.append("next"))
    with caplog.at_level(logging.ERROR, logger="lrofw.manager"):
        manager.close(grace=0.0)
    assert ran == ["next"]
    assert manager.closed
    assert "listener broke" in caplog.text


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (-1, ValueError, "notice must not be negative"),
        (float("inf"), ValueError, "notice must be a finite number"),
        ("1", TypeError, "notice must be a number of seconds"),
    ],
)
def test_close_refuses_a_bad_notice(value: object, error: type[Exception], match: str) -> None:
    """notice is a finite number of seconds >= 0, checked before anything closes."""
    manager = lrofw.Manager()
    with pytest.raises(error, match=match):
        manager.close(notice=value)  # type: ignore[arg-type]
    assert not manager.draining
    manager.close()


def test_on_close_refuses_what_is_not_callable() -> None:
    """on_close(3) is a TypeError naming the argument."""
    manager = lrofw.Manager()
    with pytest.raises(TypeError, match="callback must be callable"):
        manager.on_close(3)  # type: ignore[arg-type]
    manager.close()


# --- a wait through a restart on the same port ----------------------------------------------------


class _Resumable(tls_pb2_grpc.CommonServicer):
    """ProvisionDut, resumable: a run that is stopped (handed over) returns what is dropped;
    a run after ``go`` is set returns at once."""

    def __init__(self, go: threading.Event, runs: list[str]) -> None:
        self.go, self.runs = go, runs

    @lrofw.long_running(type(RESPONSE), resumable=True)
    def ProvisionDut(self, request: Any, op: lrofw.OperationContext) -> object:
        self.runs.append(request.name)
        while not self.go.is_set():
            if op.sleep(0.01):
                return RESPONSE  # stopped: handed over, this outcome is dropped
        return RESPONSE


def _start(port: int, manager: lrofw.Manager, servicer: object) -> tuple[grpc.Server, int]:
    server = grpc.server(ThreadPoolExecutor(8), options=lrofw.SERVER_OPTIONS)
    lrofw.add_servicer_to_server(servicer, server, manager=manager, health=True)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, bound


@pytest.mark.parametrize("client", ["sync", "aio"])
def test_a_wait_rides_through_a_server_restart_on_the_same_port(
    tmp_path: pathlib.Path, client: str
) -> None:
    """lrofw.wait (and lrofw.aio.wait) on an op whose server drains (hand-over), stops and is
    started again on the same port returns the op done with its response, no error."""
    go = threading.Event()
    runs: list[str] = []
    path = tmp_path / "ops.db"
    first_store = SQLiteStore(path)
    first = lrofw.Manager(store=first_store, lease=LONG)
    server, port = _start(0, first, _Resumable(go, runs))
    target = f"127.0.0.1:{port}"
    results: list[Any] = []
    with grpc.insecure_channel(target) as channel:
        name = tls_pb2_grpc.CommonStub(channel).ProvisionDut(Request(name="dut"), timeout=LONG).name
        eventually(lambda: runs == ["dut"], "the first run to start")
        if client == "sync":
            waiter, raised = in_thread(
                lambda: results.append(lrofw.wait(channel, name, timeout=LONG))
            )
        else:

            async def wait_async() -> None:
                async with grpc.aio.insecure_channel(target) as aio_channel:
                    results.append(await lrofw.aio.wait(aio_channel, name, timeout=LONG))

            waiter, raised = in_thread(lambda: asyncio.run(wait_async()))
        eventually(lambda: first.registry.is_waited(name), "the wait to be held")
        try:
            first.close(grace=0.0)  # the running op is handed over, the wait answered
        finally:
            server.stop(None).wait()
            first_store.close()
        stopped = not results  # nothing is done yet: the wait goes on through the restart
        second_store = SQLiteStore(path)
        second = lrofw.Manager(store=second_store, lease=LONG)
        go.set()
        try:
            server, again = _start(port, second, _Resumable(go, runs))
            waiter.join(LONG)
        finally:
            second.close(grace=0.0)
            server.stop(None).wait()
            second_store.close()
    assert stopped and again == port
    assert raised == []
    assert [op.done and op.HasField("response") for op in results] == [True]
    assert runs == ["dut", "dut"]  # handed over, then resumed by the second server
