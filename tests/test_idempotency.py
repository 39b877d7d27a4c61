"""AIP-155 request ids and resumable methods, through a real gRPC server, on every store."""

from __future__ import annotations

import pathlib
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import tls_pb2
import tls_pb2_grpc
from factories import finished, get, ops_stub
from google.longrunning import operations_pb2, operations_proto_pb2
from test_stores import STORES

import lrofw
from lrofw.manager import MethodRunner
from lrofw.stores import NewOperation, SQLiteStore, Store
from lrofw.testing import Served, serve

Operation = operations_proto_pb2.Operation
Request = tls_pb2.ProvisionDutRequest
Response = tls_pb2.ProvisionDutResponse

METHOD = "/" + tls_pb2.DESCRIPTOR.services_by_name["Common"].full_name + "/ProvisionDut"
ABORTED = grpc.StatusCode.ABORTED.value[0]
LONG = 30.0  # seconds; reached only when a test fails


class FakeClock:
    """Wall-clock time that moves only when the test says so."""

    def __init__(self) -> None:
        self.value = 1_700_000_000.0

    def now(self) -> float:
        """The current fake time."""
        return self.value


@pytest.fixture(params=list(STORES))
def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[Store]:
    """Each store under test, fresh, closed at the end."""
    opened = STORES[request.param](tmp_path)
    yield opened
    opened.close()


@pytest.fixture
def sqlite(tmp_path: pathlib.Path) -> Iterator[SQLiteStore]:
    """A SQLiteStore on a fresh file, closed at the end."""
    opened = SQLiteStore(tmp_path / "ops.db")
    yield opened
    opened.close()


def common(
    calls: list[Any], *, gate: threading.Event | None = None, resumable: bool = False
) -> tls_pb2_grpc.CommonServicer:
    """A servicer whose ProvisionDut (request_id = the request's) records each call in ``calls``,
    waits for ``gate`` if given, and answers with the request's name."""

    class Common(tls_pb2_grpc.CommonServicer):
        @lrofw.long_running(Response, request_id=lambda r: r.request_id, resumable=resumable)
        def ProvisionDut(self, request: Any, op: lrofw.OperationContext) -> Any:
            calls.append(request)
            if gate is not None:
                assert gate.wait(LONG)
            return Response(installed_image=request.name)

    return Common()


def create(srv: Served, name: str = "dut", request_id: str = "") -> operations_pb2.Operation:
    """ProvisionDut over the wire."""
    request = Request(name=name, request_id=request_id)
    return tls_pb2_grpc.CommonStub(srv.channel).ProvisionDut(request, timeout=LONG)


def installed(op: operations_pb2.Operation) -> str:
    """The response's installed_image of a done op."""
    response = Response()
    assert op.response.Unpack(response), op
    return response.installed_image


def orphan(store: Store, *, method: str = METHOD, request: Request | None = None) -> str:
    """Inserts an unfinished op owned by a manager that died (no lease); returns its name."""
    name = f"operations/{uuid.uuid4()}"
    data = None if request is None else request.SerializeToString()
    store.insert(Operation(name=name), 1.0, NewOperation(method, owner="dead-owner", request=data))
    return name


# --- AIP-155 request ids --------------------------------------------------------------------------


@pytest.mark.parametrize("repeat_while", ["running", "done"])
def test_a_repeated_request_returns_the_same_operation(store: Store, repeat_while: str) -> None:
    """The same request with the same request_id twice: one operation, one handler run."""
    calls: list[Any] = []
    gate = threading.Event()
    with serve(common(calls, gate=gate), manager=lrofw.Manager(store=store)) as srv:
        first = create(srv, "dut-1", "req-1")
        if repeat_while == "done":
            gate.set()
            first = finished(srv, first.name)
        again = create(srv, "dut-1", "req-1")
        assert again.name == first.name
        assert again.done is (repeat_while == "done")
        gate.set()
        assert installed(finished(srv, first.name)) == "dut-1"
        assert [op.name for op in srv.manager.list()[0]] == [first.name]
    assert [r.name for r in calls] == ["dut-1"]


def test_a_reused_request_id_with_another_request_is_already_exists(store: Store) -> None:
    """The same request_id with a different request: ALREADY_EXISTS naming the request_id."""
    calls: list[Any] = []
    with serve(common(calls), manager=lrofw.Manager(store=store)) as srv:
        first = create(srv, "dut-1", "req-7")
        with pytest.raises(grpc.RpcError) as info:
            create(srv, "dut-2", "req-7")
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "'req-7'" in info.value.details()
        assert first.name in info.value.details()
        finished(srv, first.name)
        assert [op.name for op in srv.manager.list()[0]] == [first.name]
    assert [r.name for r in calls] == ["dut-1"]


def test_concurrent_repeats_of_a_request_create_one_operation(store: Store) -> None:
    """Eight clients sending the same request with the same request_id at once: one op, one run."""
    calls: list[Any] = []
    barrier = threading.Barrier(8)
    names: list[str] = []
    failures: list[BaseException] = []
    with serve(common(calls), manager=lrofw.Manager(store=store)) as srv:

        def send() -> None:
            try:
                barrier.wait(LONG)
                names.append(create(srv, "dut", "req-race").name)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=send) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(LONG)
        assert not failures
        assert len(names) == 8 and len(set(names)) == 1
        assert installed(finished(srv, names[0])) == "dut"
    assert len(calls) == 1


def test_an_empty_request_id_creates_a_new_operation_each_time(store: Store) -> None:
    """Without a request_id, two identical requests are two operations."""
    calls: list[Any] = []
    with serve(common(calls), manager=lrofw.Manager(store=store)) as srv:
        first, second = create(srv, "dut"), create(srv, "dut")
        assert first.name != second.name
        for op in (first, second):
            assert installed(finished(srv, op.name)) == "dut"
    assert [r.name for r in calls] == ["dut", "dut"]


def test_request_ids_are_per_method(store: Store) -> None:
    """The same request_id on two methods creates two operations; per method it dedupes."""
    calls: list[str] = []

    def runner(method: str) -> MethodRunner:
        def call(request: Any, op: lrofw.OperationContext) -> Any:
            calls.append(method)
            return Response(installed_image=method)

        return MethodRunner(
            method, call, Response, request_type=Request, request_id=lambda r: r.request_id
        )

    one, two = runner("/a.Service/One"), runner("/a.Service/Two")
    request = Request(name="dut", request_id="shared-id")
    with lrofw.Manager(store=store) as manager:
        first = manager.launch(one, request)
        second = manager.launch(two, request)
        assert first.name != second.name
        assert manager.launch(one, request).name == first.name
        assert manager.launch(two, request).name == second.name
        assert installed(manager.wait(first.name, LONG)) == "/a.Service/One"
        assert installed(manager.wait(second.name, LONG)) == "/a.Service/Two"
    assert sorted(calls) == ["/a.Service/One", "/a.Service/Two"]


def test_a_request_id_is_free_again_after_its_operation_was_deleted(store: Store) -> None:
    """Once the op a request_id created is deleted, the same request makes a new op."""
    calls: list[Any] = []
    with serve(common(calls), manager=lrofw.Manager(store=store)) as srv:
        first = finished(srv, create(srv, "dut", "req-9").name)
        ops_stub(srv).DeleteOperation(
            operations_pb2.DeleteOperationRequest(name=first.name), timeout=LONG
        )
        second = create(srv, "dut", "req-9")
        assert second.name != first.name
        assert installed(finished(srv, second.name)) == "dut"
        assert create(srv, "dut", "req-9").name == second.name
    assert len(calls) == 2


# --- resumable methods and orphans ----------------------------------------------------------------


def test_an_orphan_of_a_resumable_method_runs_again_from_its_request(
    sqlite: SQLiteStore,
) -> None:
    """A dead owner's op of a resumable method is run again with the stored request."""
    request = Request(name="dut-7", image_path="gs://image", request_id="")
    name = orphan(sqlite, request=request)
    calls: list[Any] = []
    with serve(common(calls, resumable=True), manager=lrofw.Manager(store=sqlite)) as srv:
        op = finished(srv, name)
        assert installed(op) == "dut-7"
        assert not op.HasField("error")
    assert calls == [request]
    assert sqlite.orphans(2.0e9, 10) == []


def test_an_orphan_without_a_stored_request_is_aborted_at_start(sqlite: SQLiteStore) -> None:
    """A dead owner's op with nothing to resume from ends ABORTED when a manager starts."""
    name = orphan(sqlite)
    calls: list[Any] = []
    with serve(common(calls), manager=lrofw.Manager(store=sqlite)) as srv:
        op = get(srv, name)
        assert op.done and op.error.code == ABORTED
        assert op.error.message == "the server stopped before the operation finished"
    assert calls == []


def test_an_orphan_of_a_non_resumable_method_is_aborted(sqlite: SQLiteStore) -> None:
    """A stored request does not make a non-resumable method run again: the op ends ABORTED."""
    name = orphan(sqlite, request=Request(name="dut-8"))
    clock = FakeClock()
    calls: list[Any] = []
    manager = lrofw.Manager(store=sqlite, clock=clock.now)
    with serve(common(calls, resumable=False), manager=manager) as srv:
        clock.value += manager.lease + 1  # past the time a resumable runner may still register
        assert manager.recover() == 1
        op = get(srv, name)
        assert op.done and op.error.code == ABORTED
        assert op.error.message == "the server stopped before the operation finished"
        assert manager.recover() == 0
    assert calls == []


def test_an_orphan_whose_stored_request_cannot_be_read_is_aborted(
    sqlite: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A resumable orphan with unreadable request bytes ends ABORTED instead of running."""
    name = f"operations/{uuid.uuid4()}"
    new = NewOperation(METHOD, owner="dead-owner", request=b"\xff\xff not a request")
    sqlite.insert(Operation(name=name), 1.0, new)
    calls: list[Any] = []
    with serve(common(calls, resumable=True), manager=lrofw.Manager(store=sqlite)) as srv:
        op = get(srv, name)
        assert op.done and op.error.code == ABORTED
    assert calls == []
    assert "cannot be read" in caplog.text


@pytest.mark.parametrize("resumable", [True, False])
def test_only_resumable_methods_keep_their_request(sqlite: SQLiteStore, resumable: bool) -> None:
    """The store keeps the serialized request of a resumable method's op, and only then."""
    gate = threading.Event()
    request = Request(name="dut", image_path="img", request_id="id")
    runner = MethodRunner(
        METHOD,
        lambda r, op: gate.wait(LONG) and Response(),
        Response,
        request_type=Request,
        resumable=resumable,
    )
    try:
        with lrofw.Manager(store=sqlite) as manager:
            name = manager.launch(runner, request).name
            [kept] = sqlite.orphans(1e18, 10)  # as seen once the manager's lease has lapsed
            assert kept.name == name
            assert kept.request == (request.SerializeToString() if resumable else None)
            gate.set()
            assert manager.wait(name, LONG).done
    finally:
        gate.set()


def test_ops_of_a_live_manager_are_never_taken(tmp_path: pathlib.Path) -> None:
    """Another live manager on the same file recovers none of this manager's running ops."""
    path = tmp_path / "ops.db"
    store_a, store_b = SQLiteStore(path), SQLiteStore(path)
    started, gate = threading.Event(), threading.Event()
    ran_on_b: list[Any] = []

    def on_a(request: Any, op: lrofw.OperationContext) -> Any:
        started.set()
        assert gate.wait(LONG)
        return Response(installed_image="a")

    def on_b(request: Any, op: lrofw.OperationContext) -> Any:
        ran_on_b.append(request)
        return Response(installed_image="b")

    def resumable(call: Any) -> MethodRunner:
        return MethodRunner(METHOD, call, Response, request_type=Request, resumable=True)

    try:
        with lrofw.Manager(store=store_a) as a:
            running = a.launch(resumable(on_a), Request(name="dut"))
            assert started.wait(LONG)
            queued_by_hand = a.new_operation(METHOD)
            with lrofw.Manager(store=store_b) as b:
                b.register(resumable(on_b))  # registering a resumable method recovers, too
                assert b.recover() == 0
                for name in (running.name, queued_by_hand.name):
                    assert not b.get(name).done
            assert not a.get(running.name).done and not a.get(queued_by_hand.name).done
            gate.set()
            assert installed(a.wait(running.name, LONG)) == "a"
        assert ran_on_b == []
    finally:
        gate.set()
        store_a.close()
        store_b.close()


def test_an_orphan_of_a_resumable_async_method_resumes_on_the_aio_server(
    sqlite: SQLiteStore,
) -> None:
    """An async resumable method's orphan runs again as a task, with an awaitable op.sleep."""
    request = Request(name="dut-9", image_path="gs://image")
    name = orphan(sqlite, request=request)
    seen: list[Any] = []

    class Async(tls_pb2_grpc.CommonServicer):
        @lrofw.long_running(Response, resumable=True)
        async def ProvisionDut(self, request: Any, op: lrofw.AsyncOperationContext) -> Any:
            stopped = await op.sleep(0.01)
            seen.append((request, type(op), stopped))
            return Response(installed_image=request.name)

    with serve(Async(), manager=lrofw.Manager(store=sqlite), aio=True) as srv:
        op = finished(srv, name)
        assert installed(op) == "dut-9"
    assert seen == [(request, lrofw.AsyncOperationContext, False)]
