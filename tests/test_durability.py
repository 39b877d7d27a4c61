"""Durability on SQLite with real server processes: kill -9 and restart, two processes on one file,
and resumable methods run again after a crash. The servers are ``tests/proc_server.py``."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import tls_pb2
import tls_pb2_grpc
from google.longrunning import operations_pb2, operations_pb2_grpc

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
SERVER = Path(__file__).resolve().parent / "proc_server.py"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    "PYTHONUNBUFFERED": "1",
}
LEASE = 0.5  # seconds; short, so that a dead server's operations are orphans soon
START_TIMEOUT = 20.0  # seconds for a server to print "listening on"
RPC_TIMEOUT = 5.0  # seconds for any one RPC
#: An RPC started in a thread needs a moment to reach the server, and nothing across processes
#: tells when it has: the waits that must be in flight before an event get this long to arrive.
IN_FLIGHT = 0.3
ABORTED_MESSAGE = "the server stopped before the operation finished"


def eventually(predicate: Callable[[], bool], timeout: float) -> bool:
    """Polls ``predicate`` every 10 ms until it is true (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


@dataclass
class Proc:
    """A running proc_server.py and gRPC stubs against it."""

    process: subprocess.Popen[str]
    channel: grpc.Channel
    ops: operations_pb2_grpc.OperationsStub
    common: tls_pb2_grpc.CommonStub
    raw_get: grpc.UnaryUnaryMultiCallable  # GetOperation, answering the serialized bytes

    @property
    def pid(self) -> int:
        return self.process.pid

    def create(self, name: str, image: str = "img") -> operations_pb2.Operation:
        """Starts an operation; returns once the server acknowledged it."""
        request = tls_pb2.ProvisionDutRequest(name=name, image_path=image)
        return self.common.ProvisionDut(request, timeout=RPC_TIMEOUT)

    def get(self, name: str) -> operations_pb2.Operation:
        return self.ops.GetOperation(
            operations_pb2.GetOperationRequest(name=name), timeout=RPC_TIMEOUT
        )

    def get_bytes(self, name: str) -> bytes:
        return self.raw_get(operations_pb2.GetOperationRequest(name=name), timeout=RPC_TIMEOUT)

    def wait(self, name: str, seconds: float) -> operations_pb2.Operation:
        request = operations_pb2.WaitOperationRequest(name=name)
        request.timeout.FromNanoseconds(int(seconds * 1e9))
        return self.ops.WaitOperation(request, timeout=seconds + RPC_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


class Launcher:
    """Starts proc_server.py processes and, at the end, stops every one still running."""

    def __init__(self, markers: Path, logs: Path) -> None:
        self.markers = markers
        self.logs = logs
        self.procs: list[Proc] = []

    def start(self, db: Path, *, lease: float = LEASE, resumable: bool = False) -> Proc:
        stderr = open(self.logs / f"server-{len(self.procs)}.stderr", "w")  # noqa: SIM115
        args = [sys.executable, str(SERVER), "--db", str(db), "--markers", str(self.markers)]
        args += ["--lease", str(lease), *(["--resumable"] if resumable else [])]
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, text=True, env=ENV)
        stderr.close()  # the child has its own copy
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(process.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(START_TIMEOUT)
        if not line or not line[0].startswith("listening on "):
            process.kill()
            process.wait(timeout=10)
            reader.join(10)
            process.stdout.close()  # type: ignore[union-attr]
            pytest.fail(f"server did not start: {line!r}")
        channel = grpc.insecure_channel(line[0].split()[-1])
        raw_get = channel.unary_unary(
            "/google.longrunning.Operations/GetOperation",
            request_serializer=operations_pb2.GetOperationRequest.SerializeToString,
            response_deserializer=None,
        )
        proc = Proc(
            process,
            channel,
            operations_pb2_grpc.OperationsStub(channel),
            tls_pb2_grpc.CommonStub(channel),
            raw_get,
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.channel.close()
            if proc.process.poll() is None:
                proc.process.terminate()
                try:
                    proc.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.process.kill()
                    proc.process.wait(timeout=10)
            proc.process.stdout.close()  # type: ignore[union-attr]


@contextlib.contextmanager
def launcher(folder: Path) -> Iterator[Launcher]:
    markers, logs = folder / "markers", folder / "logs"
    markers.mkdir()
    logs.mkdir()
    launch = Launcher(markers, logs)
    try:
        yield launch
    finally:
        launch.close()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    with launcher(tmp_path) as launch:
        yield launch


@dataclass
class Pair:
    """Two live servers, A and B, on one SQLite file."""

    a: Proc
    b: Proc
    launch: Launcher
    db: Path


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """Two live servers, A and B, on one SQLite file, shared by the tests of section 2."""
    folder = tmp_path_factory.mktemp("pair")
    with launcher(folder) as launch:
        db = folder / "ops.db"
        yield Pair(launch.start(db), launch.start(db), launch, db)


def marker_time(launch: Launcher, tag: str, kind: str, timeout: float = 5.0) -> float:
    """The time a handler wrote to ``<tag>.<kind>``, waiting up to ``timeout`` for the file."""
    path = launch.markers / f"{tag}.{kind}"
    assert eventually(path.exists, timeout), f"{path.name} never appeared"
    return float(path.read_text())


def started_in(launch: Launcher, tag: str, proc: Proc) -> Path:
    """The marker a handler for ``tag`` creates when it starts running in ``proc``."""
    return launch.markers / f"{tag}.started.{proc.pid}"


def release(launch: Launcher, tag: str) -> None:
    """Lets the handler(s) blocked on ``tag`` return."""
    (launch.markers / f"{tag}.go").touch()


def code_of(call: Callable[[], object]) -> grpc.StatusCode | None:
    """The status code ``call`` fails with, or None when it succeeds."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return,attr-defined]
    return None


def assert_aborted(op: operations_pb2.Operation) -> None:
    assert op.done
    assert op.WhichOneof("result") == "error"
    assert op.error.code == grpc.StatusCode.ABORTED.value[0]
    assert op.error.message == ABORTED_MESSAGE


# --- 1. kill -9 mid-load, restart on the same file -----------------------------------------------


def test_kill_9_mid_load_loses_no_acknowledged_operation(launch: Launcher, tmp_path: Path) -> None:
    """After kill -9 under load and a restart, every acknowledged op is there and resolved."""
    db = tmp_path / "ops.db"
    a = launch.start(db)

    finished: dict[str, bytes] = {}
    for _ in range(10):
        name = a.create("quick").name
        assert a.wait(name, 5.0).done
        finished[name] = a.get_bytes(name)
    running = [a.create(f"running-{i}").name for i in range(5)]
    for i in range(5):
        assert eventually(started_in(launch, f"running-{i}", a).exists, 5.0)

    acknowledged: dict[str, str] = {}  # name -> "quick" or "blocking", once its create returned
    lock = threading.Lock()
    enough = threading.Event()

    def load(worker: int) -> None:
        for i in range(10_000):
            kind = "quick" if i % 2 else "blocking"
            try:
                op = a.create("quick" if kind == "quick" else f"load-{worker}-{i}")
            except grpc.RpcError:
                return  # the server is gone
            with lock:
                acknowledged[op.name] = kind
                if len(acknowledged) >= 60:
                    enough.set()

    clients = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for client in clients:
        client.start()
    assert enough.wait(20.0), "the load never got going"
    a.kill()  # with the clients still creating
    for client in clients:
        client.join(RPC_TIMEOUT + 5.0)
        assert not client.is_alive()

    restarted_at = time.monotonic()
    a2 = launch.start(db)
    every = {**dict.fromkeys(finished, "quick"), **dict.fromkeys(running, "blocking")}
    every.update(acknowledged)

    def all_done() -> bool:
        return all(a2.get(name).done for name in every)

    assert eventually(all_done, 10.0), "orphaned operations were not resolved"
    print(f"\nrecovered {len(every)} ops, {time.monotonic() - restarted_at:.2f}s after restart")

    for name, data in finished.items():
        assert a2.get_bytes(name) == data
    assert not list(launch.markers.glob(f"*.started.{a2.pid}")), "a non-resumable op ran again"
    for name, kind in every.items():
        op = a2.get(name)
        if kind == "blocking":
            assert_aborted(op)
        elif op.WhichOneof("result") == "error":
            assert_aborted(op)  # a quick one the kill caught before it ran
        else:
            assert op.response.Is(tls_pb2.ProvisionDutResponse.DESCRIPTOR)

    listed = a2.ops.ListOperations(
        operations_pb2.ListOperationsRequest(name="operations", page_size=1000),
        timeout=RPC_TIMEOUT,
    )
    assert set(every) <= {op.name for op in listed.operations}
    a2.process.terminate()
    assert a2.process.wait(timeout=10) == 0
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


# --- 2. two processes, one file ------------------------------------------------------------------


def test_b_reads_and_lists_an_operation_created_through_a(pair: Pair) -> None:
    """An op created through A is read and listed through B, byte for byte the same."""
    a, b, launch = pair.a, pair.b, pair.launch
    done = a.create("quick").name
    assert a.wait(done, 5.0).done
    running = a.create("read-running").name
    assert eventually(started_in(launch, "read-running", a).exists, 5.0)

    for name in (done, running):
        assert b.get_bytes(name) == a.get_bytes(name)
    assert not b.get(running).done

    def listed(proc: Proc, filter: str) -> set[str]:
        request = operations_pb2.ListOperationsRequest(
            name="operations", filter=filter, page_size=1000
        )
        return {op.name for op in proc.ops.ListOperations(request, timeout=RPC_TIMEOUT).operations}

    assert {done, running} <= listed(b, "")
    assert running in listed(b, "done = false")
    assert done not in listed(b, "done = false")
    release(launch, "read-running")
    assert b.wait(running, 5.0).response.Is(tls_pb2.ProvisionDutResponse.DESCRIPTOR)


def test_b_waiters_wake_within_250_ms_of_a_finishing(pair: Pair) -> None:
    """WaitOperation calls on B return within 250 ms of A's handler finishing the op."""
    a, b, launch = pair.a, pair.b, pair.launch
    name = a.create("wake").name
    assert eventually(started_in(launch, "wake", a).exists, 5.0)

    returned: list[tuple[float, operations_pb2.Operation]] = []

    def waiter() -> None:
        op = b.wait(name, 10.0)
        returned.append((time.time(), op))

    waiters = [threading.Thread(target=waiter) for _ in range(3)]
    for thread in waiters:
        thread.start()
    time.sleep(IN_FLIGHT)
    assert not returned, "B's waits returned before the op finished"
    release(launch, "wake")
    finished = marker_time(launch, "wake", "finished")
    for thread in waiters:
        thread.join(15.0)
    assert len(returned) == 3
    gaps = [at - finished for at, _ in returned]
    print(f"\nB wake-up after A finished: {', '.join(f'{g * 1000:.0f} ms' for g in gaps)}")
    for _, op in returned:
        assert op.done
        assert op.response.Is(tls_pb2.ProvisionDutResponse.DESCRIPTOR)
    assert max(gaps) < 0.25


def test_cancel_through_b_reaches_the_handler_in_a_within_1_s(
    pair: Pair,
) -> None:
    """CancelOperation on B signals A's handler within 1 s and ends a wait on A; all see it."""
    a, b, launch = pair.a, pair.b, pair.launch
    name = a.create("cancel").name
    assert eventually(started_in(launch, "cancel", a).exists, 5.0)

    waited: list[operations_pb2.Operation] = []
    waiter = threading.Thread(target=lambda: waited.append(a.wait(name, 10.0)))
    waiter.start()
    time.sleep(IN_FLIGHT)
    sent = time.time()
    b.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=name), timeout=RPC_TIMEOUT)
    seen = marker_time(launch, "cancel", "cancelled")
    waiter.join(15.0)
    assert time.time() - sent < 1.0, "a wait on A did not end soon after the cancel on B"
    assert len(waited) == 1
    assert waited[0].error.code == grpc.StatusCode.CANCELLED.value[0]
    print(f"\ncancel through B seen by A's handler after {(seen - sent) * 1000:.0f} ms")
    assert seen - sent < 1.0
    for proc in (a, b):
        op = proc.get(name)
        assert op.done
        assert op.error.code == grpc.StatusCode.CANCELLED.value[0]
    assert not (launch.markers / "cancel.finished").exists()


def test_delete_through_b_wakes_a_waiter_on_a_with_not_found(
    pair: Pair,
) -> None:
    """DeleteOperation on B removes A's op everywhere; a wait on A ends NOT_FOUND."""
    a, b, launch = pair.a, pair.b, pair.launch
    name = a.create("delete").name
    assert eventually(started_in(launch, "delete", a).exists, 5.0)

    codes: list[grpc.StatusCode | None] = []
    waiter = threading.Thread(target=lambda: codes.append(code_of(lambda: a.wait(name, 10.0))))
    waiter.start()
    time.sleep(IN_FLIGHT)
    deleted = time.monotonic()
    b.ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name), timeout=RPC_TIMEOUT)
    waiter.join(15.0)
    assert codes == [grpc.StatusCode.NOT_FOUND]
    assert time.monotonic() - deleted < 1.0
    for proc in (a, b):
        assert code_of(lambda proc=proc: proc.get(name)) == grpc.StatusCode.NOT_FOUND
    # Delete does not stop the work: the handler runs on, and its completion finds nothing.
    assert not (launch.markers / "delete.cancelled").exists()
    release(launch, "delete")
    marker_time(launch, "delete", "finished")
    assert code_of(lambda: a.get(name)) == grpc.StatusCode.NOT_FOUND


def test_live_processes_never_take_each_others_operations(
    pair: Pair,
) -> None:
    """A's running op stays A's through many lease periods of B's recovery, then finishes."""
    a, b, launch = pair.a, pair.b, pair.launch
    name = a.create("keep").name
    assert eventually(started_in(launch, "keep", a).exists, 5.0)
    # A third process joins: its recovery at start sees the op too.
    c = launch.start(pair.db)

    assert not eventually(lambda: b.get(name).done or c.get(name).done, 6 * LEASE)
    started = sorted(p.name for p in launch.markers.glob("keep.started.*"))
    assert started == [f"keep.started.{a.pid}"]

    release(launch, "keep")
    op = c.wait(name, 5.0)
    assert op.done
    response = tls_pb2.ProvisionDutResponse()
    assert op.response.Unpack(response)
    assert response.installed_image == f"img@{a.pid}"


# --- 3. resumable methods run again after a crash ------------------------------------------------


def test_resumable_operation_runs_again_after_kill_9(launch: Launcher, tmp_path: Path) -> None:
    """kill -9 mid-run of a resumable op: the restarted server runs it again and it succeeds."""
    db = tmp_path / "ops.db"
    a = launch.start(db, resumable=True)
    name = a.create("resume", image="gs://image").name
    assert eventually(started_in(launch, "resume", a).exists, 5.0)
    a.kill()

    a2 = launch.start(db, resumable=True)
    assert eventually(started_in(launch, "resume", a2).exists, 10.0), "it was not run again"
    assert not a2.get(name).done
    release(launch, "resume")
    op = a2.wait(name, 5.0)
    assert op.done
    assert op.WhichOneof("result") == "response"
    response = tls_pb2.ProvisionDutResponse()
    assert op.response.Unpack(response)
    assert response.installed_image == f"gs://image@{a2.pid}"


def test_two_restarted_servers_resume_an_orphan_only_once(launch: Launcher, tmp_path: Path) -> None:
    """Two servers restarted together on the file of a killed one: one of them runs it again."""
    db = tmp_path / "ops.db"
    a = launch.start(db, resumable=True)
    name = a.create("once", image="gs://image").name
    assert eventually(started_in(launch, "once", a).exists, 5.0)
    a.kill()

    b, c = launch.start(db, resumable=True), launch.start(db, resumable=True)
    rerun = [started_in(launch, "once", b), started_in(launch, "once", c)]
    assert eventually(lambda: any(p.exists() for p in rerun), 10.0), "it was not run again"
    # Several lease periods of both servers' recovery: the other one must not take it too.
    assert not eventually(lambda: all(p.exists() for p in rerun), 4 * LEASE)
    release(launch, "once")
    runner = b if rerun[0].exists() else c
    op = c.wait(name, 5.0)
    response = tls_pb2.ProvisionDutResponse()
    assert op.response.Unpack(response)
    assert response.installed_image == f"gs://image@{runner.pid}"
    runs = {started_in(launch, "once", a), started_in(launch, "once", runner)}
    assert set(launch.markers.glob("once.started.*")) == runs
