"""Waiters at scale, on real server processes (``benchmarks/_waiter_server.py``) over 127.0.0.1.

- aio: thousands of concurrent WaitOperation calls, from one ``grpc.aio`` client, on operations
  whose handlers are blocked, all return the done operation once they finish: none is dropped
  with ``lrofw.SERVER_OPTIONS``, while grpc's default options drop part of the same burst.
- sync: a ``grpc.server`` with N=4 threads keeps serving creates and Gets while 10xN clients wait
  with :func:`lrofw.wait` (at most N/2 waits block; the others are answered at once and the
  clients back off instead of spinning), and every client gets the done operation in the end.

The figure for 10,000 waiters, with memory and latency, is ``python -m benchmarks.waiters``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import tls_pb2
import tls_pb2_grpc
from google.longrunning import operations_pb2_grpc
from google.longrunning import operations_proto_pb2 as operations_pb2
from google.protobuf import duration_pb2

import lrofw
from benchmarks.waiters import control, create_holds, server_process

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "benchmarks" / "_waiter_server.py"
START_TIMEOUT = 30.0  # seconds for a server to print "listening on"
CONTROL = "/bench.Control/Command"
#: Waiters come on a connection of their own (grpc would share the control channel's).
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)

AIO_WAITERS = 5000  # five times what grpc's default options let pend at once
HOLD = 30.0  # seconds each WaitOperation asks the server to hold (far longer than the test)

SYNC_THREADS = 4
SYNC_CLIENTS = 10 * SYNC_THREADS
WINDOW = 2.0  # seconds over which the sync server's WaitOperation calls are counted
#: The most WaitOperation calls the sync clients may make in WINDOW: what they would make if they
#: asked again every 50 ms (the first pause of lrofw.wait); backing off, they make far fewer.
SPIN_BOUND = SYNC_CLIENTS * WINDOW / 0.05


@contextlib.contextmanager
def waiter_server(kind: str, *args: str) -> Iterator[str]:
    """Run the benchmark's server process (``--kind KIND ARGS``); yields its ``host:port``."""
    with server_process(kind, *args) as server:
        yield server.target


async def wait_once(stub: operations_pb2_grpc.OperationsStub, name: str) -> str:
    """One WaitOperation call: "done" if it returned the done op, else what it returned."""
    request = operations_pb2.WaitOperationRequest(
        name=name, timeout=duration_pb2.Duration(seconds=int(HOLD))
    )
    try:
        op = await stub.WaitOperation(request, timeout=HOLD + 10)
    except grpc.RpcError as exc:
        return exc.code().name
    return "done" if op.done and op.HasField("response") else "not done"


async def burst(target: str, count: int) -> tuple[Counter[str], Counter[str]]:
    """Hold ``count`` concurrent WaitOperation calls, then finish their operations. Returns what
    the calls returned before the release and what all of them returned in the end."""
    async with grpc.aio.insecure_channel(target) as channel:
        names = await create_holds(channel, count)
        async with grpc.aio.insecure_channel(target, options=OWN_CONNECTION) as waiting:
            stub = operations_pb2_grpc.OperationsStub(waiting)
            tasks = [asyncio.ensure_future(wait_once(stub, name)) for name in names]
            try:
                deadline = time.monotonic() + 60
                while True:  # until every call has reached the server or failed
                    finished = sum(t.done() for t in tasks)
                    arrived = (await control(channel, b"stats"))["wait_calls"]
                    if arrived + finished >= count:
                        break
                    assert time.monotonic() < deadline, f"{arrived} calls arrived, {finished} ended"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)  # the last ones reach the servicer and subscribe
                early = Counter(t.result() for t in tasks if t.done())
                await control(channel, b"release")
                done, pending = await asyncio.wait(tasks, timeout=60)
            finally:
                for task in tasks:
                    task.cancel()
    assert not pending, f"{len(pending)} calls did not return after the release"
    return early, Counter(t.result() for t in done)


def test_aio_server_answers_thousands_of_concurrent_waiters_and_drops_none() -> None:
    with waiter_server("aio", "--manager-workers", str(AIO_WAITERS + 64)) as target:
        early, results = asyncio.run(burst(target, AIO_WAITERS))
    assert early == Counter(), "calls returned before their operations finished"
    assert results == Counter(done=AIO_WAITERS)


def test_grpc_default_options_drop_part_of_the_same_burst() -> None:
    """Why lrofw.SERVER_OPTIONS exist: without them grpc cancels calls past ~1,000 pending."""
    args = ("--manager-workers", str(AIO_WAITERS + 64), "--no-options")
    with waiter_server("aio", *args) as target:
        _, results = asyncio.run(burst(target, AIO_WAITERS))
    print(f"grpc defaults: {dict(results)}")
    assert results["CANCELLED"] > 0, results
    assert results["done"] + results["CANCELLED"] == AIO_WAITERS, results


# --- sync: 10xN clients on N threads --------------------------------------------------------


def stats(channel: grpc.Channel) -> dict[str, Any]:
    return dict(json.loads(channel.unary_unary(CONTROL)(b"stats", timeout=10)))


def test_sync_server_serves_creates_and_gets_while_10n_clients_wait_without_spinning() -> None:
    args = ("--threads", str(SYNC_THREADS), "--manager-workers", str(SYNC_CLIENTS + 8))
    with (
        waiter_server("sync", *args) as target,
        grpc.insecure_channel(target) as channel,
        ThreadPoolExecutor(SYNC_CLIENTS) as clients,
    ):
        common = tls_pb2_grpc.CommonStub(channel)
        ops = operations_pb2_grpc.OperationsStub(channel)
        hold = tls_pb2.ProvisionDutRequest(name="hold")
        names = [common.ProvisionDut(hold, timeout=10).name for _ in range(SYNC_CLIENTS)]
        deadline = time.monotonic() + 30
        while stats(channel)["held"] < SYNC_CLIENTS:
            assert time.monotonic() < deadline, "the handlers did not all start"
            time.sleep(0.05)

        waiters = [clients.submit(lrofw.wait, channel, name, timeout=60) for name in names]
        try:
            while stats(channel)["wait_calls"] < SYNC_CLIENTS:  # every client has asked once
                assert time.monotonic() < deadline + 30, "the clients did not all ask"
                time.sleep(0.05)
            time.sleep(0.5)  # those answered early are backing off
            assert not any(w.done() for w in waiters), "a wait ended before its operation finished"

            # While they wait: creates and Gets are answered promptly, and the clients do not spin.
            before = stats(channel)
            started = time.monotonic()
            latencies = []
            quick = tls_pb2.ProvisionDutRequest(name="quick")
            while time.monotonic() - started < WINDOW:
                t0 = time.monotonic()
                created = common.ProvisionDut(quick, timeout=5)
                got = ops.GetOperation(operations_pb2.GetOperationRequest(name=names[0]), timeout=5)
                latencies.append(time.monotonic() - t0)
                assert created.name and got.name == names[0] and not got.done
                time.sleep(0.05)
            calls = stats(channel)["wait_calls"] - before["wait_calls"]
            elapsed = time.monotonic() - started
            assert max(latencies) < 2.0, f"a create + Get took {max(latencies):.2f} s"
            assert calls * WINDOW / elapsed < SPIN_BOUND, (
                f"{calls} WaitOperation calls in {elapsed} s"
            )
            assert not any(w.done() for w in waiters)

            # Release: every client returns the done operation (after at most one backoff pause).
            channel.unary_unary(CONTROL)(b"release", timeout=10)
            results = [w.result(timeout=30) for w in waiters]
            assert [op.name for op in results] == names
            assert all(op.done and op.HasField("response") for op in results)
            assert stats(channel)["wait_errors"] == 0
        finally:  # a failed assertion must not leave the clients waiting for a minute
            with contextlib.suppress(grpc.RpcError):
                channel.unary_unary(CONTROL)(b"release", timeout=10)
    print(f"sync: {calls} WaitOperation calls in {elapsed:.1f} s from {SYNC_CLIENTS} clients")
