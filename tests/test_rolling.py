"""Replicas on one shared store (a SQLite file, or a PostgreSQL schema), as real example server
processes: restart in place on a fixed port, health and reflection over the wire, a rolling
restart of three servers under load from six clients with lrofw's channel options (no
client-visible error, nothing ABORTED), create on A / wait on B / cancel through C, and kill -9
of one replica under load (nothing acknowledged lost, its operations resolved by a survivor)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pgschemas
import pytest
import tls_pb2
import tls_pb2_grpc
from factories import LONG, METHOD, eventually
from google.longrunning import operations_pb2, operations_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

import lrofw

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "examples" / "tls_provision" / "server.py"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    "PYTHONUNBUFFERED": "1",
}
CLIENTS = 6
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Replica:
    """One example server process on a fixed port over a shared store; :meth:`restart` stops it
    with SIGTERM and starts a new process on the same port."""

    def __init__(self, tmp_path: Path, port: int, store: str, *flags: str) -> None:
        self.tmp_path, self.port, self.store, self.flags = tmp_path, port, store, flags
        self.process: subprocess.Popen[str] | None = None
        self.starts = 0
        self.drains: list[float] = []  # seconds from SIGTERM to exit, each stop

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        log = self.tmp_path / f"server-{self.port}-{self.starts}.log"
        command = [
            sys.executable, str(SERVER),
            "--address", self.target,
            "--store", self.store,
            "--log-file", str(log),
            *self.flags,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
            cwd=self.tmp_path,
        )  # fmt: skip
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the server prints it, or exits (EOF)
        assert line == f"listening on {self.target}\n", (line, self.process.communicate(LONG))

    def stop(self) -> int:
        """SIGTERM; the exit code (it drains first: see the example's --notice-seconds)."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=LONG)
        self.drains.append(time.monotonic() - started)
        assert "Traceback" not in stderr, stderr
        return self.process.returncode

    def restart(self) -> None:
        assert self.stop() == 0
        self.start()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=LONG)

    def logs(self) -> str:
        return "".join(p.read_text() for p in sorted(self.tmp_path.glob(f"server-{self.port}-*")))


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on (bound together, so they differ, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def shared_store(kind: str, tmp_path: Path) -> str:
    """The store URL replicas of ``kind`` share: a SQLite file, or a fresh PostgreSQL schema."""
    if kind == "postgres":
        pgschemas.require()
        return f"{pgschemas.DSN}?schema={pgschemas.schema()}"
    return f"sqlite:{tmp_path / 'ops.db'}"


@contextlib.contextmanager
def replicas(
    tmp_path: Path, count: int, *flags: str, kind: str = "sqlite"
) -> Iterator[list[Replica]]:
    """``count`` example servers on one shared store, each on a port of its own."""
    store = shared_store(kind, tmp_path)
    started = [Replica(tmp_path, port, store, *flags) for port in free_ports(count)]
    try:
        for replica in started:
            replica.start()
        yield started
    finally:
        for replica in started:
            replica.kill()


def health(target: str) -> int:
    """The overall health status of the server at ``target`` (standard Check)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=LONG).status)


# --- one server -----------------------------------------------------------------------------------


@pytest.mark.parametrize("aio", [False, True], ids=["grpc", "aio"])
def test_a_server_restarts_in_place_on_its_port(tmp_path: Path, aio: bool) -> None:
    """SIGTERM, then a new process on the same --address binds it at once; an operation created
    before is still there; health is SERVING on both; reflection lists the services."""
    flags = ["--step-seconds", "0", "--notice-seconds", "0", *(["--aio"] if aio else [])]
    with replicas(tmp_path, 1, *flags) as (server,):
        with grpc.insecure_channel(server.target) as channel:
            op = tls_pb2_grpc.CommonStub(channel).ProvisionDut(
                tls_pb2.ProvisionDutRequest(name="some host"), timeout=LONG
            )
            assert lrofw.wait(channel, op.name, timeout=LONG).HasField("response")
        before = health(server.target)
        server.restart()
        with grpc.insecure_channel(server.target) as channel:
            again = lrofw.wait(channel, op.name, timeout=LONG)
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        after = health(server.target)
    assert again.HasField("response")
    assert before == after == SERVING
    assert {
        "chromiumos.config.api.test.tls.Common",
        "google.longrunning.Operations",
        "grpc.health.v1.Health",
    } <= services


@pytest.mark.parametrize("aio", [False, True], ids=["grpc", "aio"])
def test_sigterm_turns_health_not_serving_while_creates_still_work(
    tmp_path: Path, aio: bool
) -> None:
    """During --notice-seconds after SIGTERM: health NOT_SERVING, a create still answers; the
    process then exits 0."""
    flags = ["--step-seconds", "0", "--notice-seconds", str(LONG), *(["--aio"] if aio else [])]
    with replicas(tmp_path, 1, *flags) as (server,):
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        eventually(lambda: health(server.target) == NOT_SERVING, "health to turn NOT_SERVING")
        with grpc.insecure_channel(server.target) as channel:
            op = tls_pb2_grpc.CommonStub(channel).ProvisionDut(
                tls_pb2.ProvisionDutRequest(name="some host"), timeout=LONG
            )
        server.process.send_signal(signal.SIGTERM)  # a second one ends it at once
        server.process.communicate(timeout=LONG)
        code = server.process.returncode
    assert op.name.startswith("operations/")
    assert code == 0


# --- three replicas -------------------------------------------------------------------------------


class Load:
    """``CLIENTS`` threads, each looping create (with a request id) + lrofw.wait through one
    round-robin channel with lrofw's channel options, until :meth:`stop`."""

    def __init__(self, targets: list[str]) -> None:
        options = [
            *lrofw.channel_options(METHOD),  # ProvisionDut carries a request id
            ("grpc.lb_policy_name", "round_robin"),
        ]
        self.channel = grpc.insecure_channel("ipv4:" + ",".join(targets), options=options)
        self.errors: list[str] = []
        self.outcomes: list[Any] = []
        self.created: list[str] = []  # every operation a create acknowledged
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(CLIENTS)]

    def done(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def _loop(self) -> None:
        stub = tls_pb2_grpc.CommonStub(self.channel)
        while not self._stop.is_set():
            request = tls_pb2.ProvisionDutRequest(
                name="some host", image_path="image", request_id=str(uuid.uuid4())
            )
            try:
                op = stub.ProvisionDut(request, timeout=LONG)
                with self._lock:
                    self.created.append(op.name)
                final = lrofw.wait(self.channel, op.name, timeout=LONG)
            except Exception as exc:  # any error a client would see
                with self._lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with self._lock:
                self.outcomes.append(final.error.code if final.HasField("error") else 0)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(LONG)
        self.channel.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_rolling_restart_of_three_replicas_under_load_shows_clients_no_error(
    tmp_path: Path, kind: str
) -> None:
    """Three servers on one store; each in turn gets SIGTERM and is started again on its port
    while six clients loop create + wait round-robin: every create and wait succeeds and no
    operation ends ABORTED (or with any error)."""
    flags = ["--step-seconds", "0.05", "--notice-seconds", "1", "--grace-seconds", "5"]
    with replicas(tmp_path, 3, *flags, kind=kind) as servers:
        with Load([s.target for s in servers]) as load:
            eventually(lambda: load.done() >= 3 * CLIENTS, "the clients to get going")
            for server in servers:
                server.restart()
                before = load.done()
                # The restarted server serves again before the next one goes.
                eventually(lambda s=server: health(s.target) == SERVING, "it to serve")
                eventually(lambda b=before: load.done() >= b + CLIENTS, "clients to go on")
            after = load.done()
        logs = [server.logs() for server in servers]
        drains = [d for server in servers for d in server.drains]
    assert load.errors == []
    assert load.outcomes and set(load.outcomes) == {0}, Counter(load.outcomes)
    assert after >= 6 * CLIENTS
    assert all("Traceback" not in log for log in logs)
    assert all(
        re.search(r"received SIGTERM, shutting down", log) for log in logs
    ), "every server drained on SIGTERM"
    print(f"\n{len(load.outcomes)} operations; drain (SIGTERM to exit) seconds: "
          + ", ".join(f"{d:.2f}" for d in drains))  # fmt: skip



def test_create_on_one_replica_wait_on_another_cancel_through_a_third(tmp_path: Path) -> None:
    """On PostgreSQL: an operation created through A (A runs it) is waited on through B and
    cancelled through C; B's wait returns it CANCELLED, and A's handler stopped: A runs one
    handler at a time, and a second operation created through A starts running."""
    flags = ["--step-seconds", "10", "--max-workers", "1"]
    with (
        replicas(tmp_path, 3, *flags, kind="postgres") as (a, b, c),
        contextlib.ExitStack() as stack,
    ):
        channels = [stack.enter_context(grpc.insecure_channel(s.target)) for s in (a, b, c)]
        op = tls_pb2_grpc.CommonStub(channels[0]).ProvisionDut(
            tls_pb2.ProvisionDutRequest(name="some host", image_path="image"), timeout=LONG
        )
        waited: list[Any] = []
        waiter = threading.Thread(
            target=lambda: waited.append(lrofw.wait(channels[1], op.name, timeout=LONG))
        )
        waiter.start()
        operations_pb2_grpc.OperationsStub(channels[2]).CancelOperation(
            operations_pb2.CancelOperationRequest(name=op.name), timeout=LONG
        )
        waiter.join(LONG)
        assert waited and waited[0].error.code == grpc.StatusCode.CANCELLED.value[0]
        second = tls_pb2_grpc.CommonStub(channels[0]).ProvisionDut(
            tls_pb2.ProvisionDutRequest(name="some host", image_path="image"), timeout=LONG
        )
        get = operations_pb2_grpc.OperationsStub(channels[0]).GetOperation
        eventually(
            lambda: get(operations_pb2.GetOperationRequest(name=second.name)).HasField(
                "metadata"
            ),
            "A's only handler slot to be free again (the cancelled handler stopped)",
        )


def test_kill_9_of_a_replica_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """On PostgreSQL with a 2 s lease: one of three replicas is killed (SIGKILL) while six
    clients loop create + wait; every operation a create acknowledged still exists and is
    resolved by a survivor within the lease + 5 s of the kill (the example's method is
    resumable: run again, or ABORTED after too many lost servers)."""
    flags = ["--step-seconds", "0.2", "--lease-seconds", "2", "--notice-seconds", "0"]
    with replicas(tmp_path, 3, *flags, kind="postgres") as servers:
        with Load([s.target for s in servers]) as load:
            eventually(lambda: load.done() >= 3 * CLIENTS, "the clients to get going")
            servers[0].kill()
            killed_at = time.monotonic()
            before = load.done()
            eventually(lambda: load.done() >= before + 3 * CLIENTS, "clients to go on")
        with grpc.insecure_channel(servers[1].target) as channel:
            stub = operations_pb2_grpc.OperationsStub(channel)
            deadline = killed_at + 2 + 5
            for name in load.created:
                left = max(0.0, deadline - time.monotonic())
                hold = {"seconds": int(left) + 1}
                op = stub.WaitOperation(
                    operations_pb2.WaitOperationRequest(name=name, timeout=hold), timeout=left + 5
                )
                assert op.done, f"{name} not resolved within the lease + 5 s of the kill"
        assert load.created
