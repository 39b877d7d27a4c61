"""A server process for ``benchmarks/waiters.py`` and ``tests/test_waiters.py``.

Usage::

    python benchmarks/_waiter_server.py --kind aio [--no-options]
    python benchmarks/_waiter_server.py --kind sync --threads 4 [--manager-workers 48]

It serves the example's ``Common`` service and ``google.longrunning.Operations`` on
``127.0.0.1:0`` (an in-memory store) and prints ``listening on 127.0.0.1:PORT`` once serving;
SIGTERM or SIGINT stops it. Kinds:

- ``aio``: a ``grpc.aio.server`` with an ``async def`` handler (a held operation holds no thread).
- ``sync``: a ``grpc.server`` with ``--threads`` RPC threads and a ``def`` handler on the
  manager's threads; ``lrofw.add_servicer_to_server`` lets at most half the RPC threads block in
  WaitOperation.
- ``floor``: the aio server without lrofw: a ``hold`` operation is a name in a set and a
  WaitOperation on it awaits one shared event. What a held call costs grpc alone: the floor under
  lrofw's figure.

All use ``lrofw.SERVER_OPTIONS`` unless ``--no-options`` is given (grpc's defaults, which drop
bursts of calls).

``ProvisionDutRequest.name`` picks what the handler does:

- ``hold``: blocks until a ``release`` command (or ``--max-hold`` seconds, a safety bound).
- anything else: returns at once (the "create" whose latency the benchmark measures).

A control service, ``/bench.Control/Command`` (raw bytes in, JSON out), answers:

- ``stats``: ``{"pid", "held", "wait_calls", "wait_in_flight", "wait_errors"}``: handlers blocked
  now, and WaitOperation calls received since start, counted by a server interceptor. On the sync
  server it also counts those inside the servicer now and those that ended with an error; on the
  aio server it only counts arrivals (the last two stay 0), so that it adds nothing to the memory
  of a held call.
- ``release``: lets every blocked handler return; ``{"released": n}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable
from concurrent import futures
from typing import Any

sys.path.insert(
    0, str(pathlib.Path(__file__).resolve().parent.parent / "examples" / "tls_provision")
)
# Run as a script, benchmarks/ itself is on the path, not the repository root.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import grpc
import tls_pb2
import tls_pb2_grpc
from google.longrunning import operations_pb2_grpc
from google.longrunning import operations_proto_pb2 as operations_pb2
from google.protobuf import any_pb2

import lrofw
from benchmarks._proc import serve_aio_until_signalled, serve_sync_until, serve_until_signalled

WAIT_METHOD = "/google.longrunning.Operations/WaitOperation"
CONTROL_SERVICE = "bench.Control"
CONTROL_METHOD = f"/{CONTROL_SERVICE}/Command"


class Counters:
    """What ``stats`` reports; updated from RPC threads (sync) or the event loop (aio)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held = 0
        self.wait_calls = 0
        self.wait_in_flight = 0
        self.wait_errors = 0

    def arrived(self) -> None:
        with self.lock:
            self.wait_calls += 1

    def started(self) -> None:
        with self.lock:
            self.wait_calls += 1
            self.wait_in_flight += 1

    def ended(self, ok: bool) -> None:
        with self.lock:
            self.wait_in_flight -= 1
            self.wait_errors += 0 if ok else 1

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {
                "pid": os.getpid(),
                "held": self.held,
                "wait_calls": self.wait_calls,
                "wait_in_flight": self.wait_in_flight,
                "wait_errors": self.wait_errors,
            }


# --- sync server ----------------------------------------------------------------------------------


class SyncGate:
    """Blocks ``hold`` handlers (threads) until :meth:`release`."""

    def __init__(self, counters: Counters, max_hold: float) -> None:
        self.counters = counters
        self.max_hold = max_hold
        self.event = threading.Event()

    def hold(self) -> None:
        with self.counters.lock:
            event = self.event
            self.counters.held += 1
        try:
            event.wait(self.max_hold)
        finally:
            with self.counters.lock:
                self.counters.held -= 1

    def release(self) -> int:
        with self.counters.lock:
            event, self.event = self.event, threading.Event()
            held = self.counters.held
        event.set()
        return held


class SyncCommon(tls_pb2_grpc.CommonServicer):
    def __init__(self, gate: SyncGate) -> None:
        self.gate = gate

    @lrofw.long_running(tls_pb2.ProvisionDutResponse)
    def ProvisionDut(
        self, request: tls_pb2.ProvisionDutRequest, op: lrofw.OperationContext
    ) -> tls_pb2.ProvisionDutResponse:
        if request.name == "hold":
            self.gate.hold()
        return tls_pb2.ProvisionDutResponse(installed_image=request.name)


class SyncCounting(grpc.ServerInterceptor):  # type: ignore[misc]
    """Counts WaitOperation calls as they enter and leave the servicer."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if details.method != WAIT_METHOD or handler is None:
            return handler
        inner, counters = handler.unary_unary, self.counters

        def behavior(request: Any, context: Any) -> Any:
            counters.started()
            ok = False
            try:
                response = inner(request, context)
                ok = context.code() in (None, grpc.StatusCode.OK)
                return response
            finally:
                counters.ended(ok)

        return grpc.unary_unary_rpc_method_handler(
            behavior, handler.request_deserializer, handler.response_serializer
        )


def serve_sync(args: argparse.Namespace, stop: threading.Event) -> None:
    counters = Counters()
    gate = SyncGate(counters, args.max_hold)

    def command(request: bytes, context: Any) -> bytes:
        return _command(request, counters, gate.release)

    manager = lrofw.Manager(max_workers=args.manager_workers, max_queued=args.max_queued)
    server = grpc.server(
        futures.ThreadPoolExecutor(args.threads),
        options=() if args.no_options else lrofw.SERVER_OPTIONS,
        interceptors=(SyncCounting(counters),),
    )
    lrofw.add_servicer_to_server(SyncCommon(gate), server, manager=manager)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                CONTROL_SERVICE, {"Command": grpc.unary_unary_rpc_method_handler(command)}
            ),
        )
    )
    serve_sync_until(server, stop, gate.release, lambda: manager.close(grace=1.0))


# --- aio server -----------------------------------------------------------------------------------


class AioGate:
    """Blocks ``hold`` handlers (tasks on the server's loop) until :meth:`release`."""

    def __init__(self, counters: Counters, max_hold: float) -> None:
        self.counters = counters
        self.max_hold = max_hold
        self.event = asyncio.Event()

    async def hold(self) -> None:
        event = self.event
        self.counters.held += 1
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), self.max_hold)
        finally:
            self.counters.held -= 1

    def release(self) -> int:
        event, self.event = self.event, asyncio.Event()
        event.set()
        return self.counters.held


class AioCommon(tls_pb2_grpc.CommonServicer):
    def __init__(self, gate: AioGate) -> None:
        self.gate = gate

    @lrofw.long_running(tls_pb2.ProvisionDutResponse)
    async def ProvisionDut(
        self, request: tls_pb2.ProvisionDutRequest, op: lrofw.AsyncOperationContext
    ) -> tls_pb2.ProvisionDutResponse:
        if request.name == "hold":
            await self.gate.hold()
        return tls_pb2.ProvisionDutResponse(installed_image=request.name)


class AioCounting(grpc.aio.ServerInterceptor):
    """Counts WaitOperation calls as they arrive. It hands back grpc's own handler: wrapping it
    would add a coroutine to every held call, and so to the memory a waiter costs."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        if details.method == WAIT_METHOD:
            self.counters.arrived()
        return await continuation(details)


async def serve_aio(args: argparse.Namespace) -> None:
    counters = Counters()
    gate = AioGate(counters, args.max_hold)

    release = gate.release

    async def command(request: bytes, context: Any) -> bytes:
        return _command(request, counters, release)

    manager = lrofw.Manager(max_workers=args.manager_workers, max_queued=args.max_queued)
    server = grpc.aio.server(
        options=() if args.no_options else lrofw.SERVER_OPTIONS,
        interceptors=(AioCounting(counters),),
    )
    if args.kind == "floor":
        floor = Floor(counters)
        release = floor.release
        tls_pb2_grpc.add_CommonServicer_to_server(FloorCommon(floor), server)
        operations_pb2_grpc.add_OperationsServicer_to_server(FloorOperations(floor), server)
    else:
        lrofw.add_servicer_to_server(AioCommon(gate), server, manager=manager)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                CONTROL_SERVICE, {"Command": grpc.unary_unary_rpc_method_handler(command)}
            ),
        )
    )
    await serve_aio_until_signalled(
        server, lambda: release(), lambda: manager.aclose(grace=1.0), lambda: server.stop(0.5)
    )


# --- the floor: grpc's own cost of a held call, with as little Python on top as can be ----------


class Floor:
    """No lrofw at all: ``hold`` operations are names in a set, and a WaitOperation on one awaits
    one shared event; ``release`` finishes them all. What a held call costs grpc alone."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.event = asyncio.Event()
        self.held: set[str] = set()
        self.response = pack(tls_pb2.ProvisionDutResponse(installed_image="hold"))

    def operation(self, name: str) -> operations_pb2.Operation:
        if name in self.held:
            return operations_pb2.Operation(name=name)
        return operations_pb2.Operation(name=name, done=True, response=self.response)

    def release(self) -> int:
        released = len(self.held)
        self.held.clear()
        self.counters.held = 0
        event, self.event = self.event, asyncio.Event()
        event.set()
        return released


class FloorCommon(tls_pb2_grpc.CommonServicer):
    def __init__(self, floor: Floor) -> None:
        self.floor = floor

    async def ProvisionDut(self, request: Any, context: Any) -> operations_pb2.Operation:
        name = f"operations/{uuid.uuid4()}"
        if request.name == "hold":
            self.floor.held.add(name)
            self.floor.counters.held += 1
        return self.floor.operation(name)


class FloorOperations(operations_pb2_grpc.OperationsServicer):
    def __init__(self, floor: Floor) -> None:
        self.floor = floor

    async def GetOperation(self, request: Any, context: Any) -> operations_pb2.Operation:
        return self.floor.operation(request.name)

    async def WaitOperation(self, request: Any, context: Any) -> operations_pb2.Operation:
        if request.name in self.floor.held:
            await self.floor.event.wait()
        return self.floor.operation(request.name)


def pack(message: Any) -> Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _command(request: bytes, counters: Counters, release: Callable[[], int]) -> bytes:
    if request == b"release":
        return json.dumps({"released": release()}).encode()
    if request == b"stats":
        return json.dumps(counters.stats()).encode()
    return json.dumps({"error": f"unknown command {request[:40]!r}"}).encode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kind", choices=("aio", "sync", "floor"), required=True)
    parser.add_argument("--threads", type=int, default=16, help="RPC threads (sync)")
    parser.add_argument(
        "--manager-workers",
        type=int,
        default=64,
        help="handlers running at once: more than the operations held at once",
    )
    parser.add_argument("--max-queued", type=int, default=1000)
    parser.add_argument("--max-hold", type=float, default=300.0, help="safety bound, seconds")
    parser.add_argument(
        "--no-options", action="store_true", help="grpc's default server options (drops bursts)"
    )
    args = parser.parse_args()
    return serve_until_signalled(args.kind in ("aio", "floor"), serve_aio, serve_sync, args)


if __name__ == "__main__":
    sys.exit(main())
