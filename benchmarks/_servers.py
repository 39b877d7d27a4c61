"""Server processes for ``python -m benchmarks``: every contender serves the same calls.

Usage::

    python -m benchmarks._servers --kind ceiling|handwritten|lrofw [--aio]
        [--store memory:|sqlite:PATH] [--inline SECONDS] [--threads 16]

Each serves on ``127.0.0.1:0`` with ``lrofw.SERVER_OPTIONS`` and prints
``listening on 127.0.0.1:PORT`` once serving; SIGTERM or SIGINT stops it.

- ``ceiling``: ``/bench.Ceiling/Empty``, an empty unary call (``google.protobuf.Empty`` in and
  out) and nothing else: the most any RPC on this stack can do.
- ``handwritten``: the example's ``Common.ProvisionDut`` and a minimal Operations service,
  ``benchmarks/handwritten.py`` (the Go original ported literally), on a thread pool of 8.
- ``lrofw``: the example's ``Common.ProvisionDut`` under ``@lrofw.long_running`` (a ``def``
  handler, or ``async def`` with ``--aio``) and lrofw's Operations service, on ``--store``,
  with ``inline_timeout=--inline`` when given.

Sync servers are ``grpc.server`` with ``--threads`` RPC threads; ``--aio`` is a
``grpc.aio.server`` (ceiling and lrofw only). The create's handler does nothing unless
``ProvisionDutRequest.image_path`` is ``until:T``: then it sleeps until ``time.monotonic()``
reaches ``T`` and returns ``installed_image="returned:R"``, ``R`` the moment it returned (the
same clock in every process on Linux), so that a client can time how late it notices.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import pathlib
import sys
import threading
import time
from concurrent import futures
from typing import Any

sys.path.insert(
    0, str(pathlib.Path(__file__).resolve().parent.parent / "examples" / "tls_provision")
)

import grpc
import tls_pb2
import tls_pb2_grpc
from google.longrunning import operations_pb2_grpc
from google.protobuf import empty_pb2

import lrofw
from benchmarks import handwritten
from benchmarks._proc import serve_aio_until_signalled, serve_sync_until, serve_until_signalled
from lrofw.stores import open_store

CEILING_SERVICE = "bench.Ceiling"
CEILING_METHOD = f"/{CEILING_SERVICE}/Empty"
EMPTY = empty_pb2.Empty()


def finish_at(request: tls_pb2.ProvisionDutRequest) -> float | None:
    """The monotonic time the request asks its operation to finish at, if any."""
    if request.image_path.startswith("until:"):
        return float(request.image_path[len("until:") :])
    return None


def finished(until: float | None) -> tls_pb2.ProvisionDutResponse:
    """The response; for a timed request it carries the moment the handler returns it."""
    if until is None:
        return tls_pb2.ProvisionDutResponse()
    return tls_pb2.ProvisionDutResponse(installed_image=f"returned:{time.monotonic()!r}")


def work(request: tls_pb2.ProvisionDutRequest) -> tls_pb2.ProvisionDutResponse:
    until = finish_at(request)
    if until is not None:
        time.sleep(max(0.0, until - time.monotonic()))
    return finished(until)


def servicers(inline: float | None) -> tuple[Any, Any]:
    """The lrofw servicers (sync, aio) for this run's ``inline_timeout``."""

    class SyncCommon(tls_pb2_grpc.CommonServicer):
        @lrofw.long_running(tls_pb2.ProvisionDutResponse, inline_timeout=inline)
        def ProvisionDut(
            self, request: tls_pb2.ProvisionDutRequest, op: lrofw.OperationContext
        ) -> tls_pb2.ProvisionDutResponse:
            return work(request)

    class AioCommon(tls_pb2_grpc.CommonServicer):
        @lrofw.long_running(tls_pb2.ProvisionDutResponse, inline_timeout=inline)
        async def ProvisionDut(
            self, request: tls_pb2.ProvisionDutRequest, op: lrofw.AsyncOperationContext
        ) -> tls_pb2.ProvisionDutResponse:
            until = finish_at(request)
            if until is not None:
                await asyncio.sleep(max(0.0, until - time.monotonic()))
            return finished(until)

    return SyncCommon(), AioCommon()


def ceiling_handler(aio: bool) -> grpc.GenericRpcHandler:
    if aio:

        async def empty_async(request: Any, context: Any) -> Any:
            return EMPTY

        behavior: Any = empty_async
    else:

        def empty(request: Any, context: Any) -> Any:
            return EMPTY

        behavior = empty
    return grpc.method_handlers_generic_handler(
        CEILING_SERVICE,
        {
            "Empty": grpc.unary_unary_rpc_method_handler(
                behavior,
                request_deserializer=empty_pb2.Empty.FromString,
                response_serializer=empty_pb2.Empty.SerializeToString,
            )
        },
    )


def serve_sync(args: argparse.Namespace, stop: threading.Event) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(args.threads), options=lrofw.SERVER_OPTIONS)
    closers: list[Any] = []
    if args.kind == "ceiling":
        server.add_generic_rpc_handlers((ceiling_handler(aio=False),))
    elif args.kind == "handwritten":
        operations = handwritten.Operations()
        pool = futures.ThreadPoolExecutor(8)
        create = handwritten.servicer_method(operations, pool, work, args.inline)

        class Common(tls_pb2_grpc.CommonServicer):
            def ProvisionDut(self, request: Any, context: Any) -> Any:
                return create(request, context)

        tls_pb2_grpc.add_CommonServicer_to_server(Common(), server)
        operations_pb2_grpc.add_OperationsServicer_to_server(operations, server)
        closers += [operations.close, pool.shutdown]
    else:
        manager = observed(lrofw.Manager(open_store(args.store)), args)
        lrofw.add_servicer_to_server(servicers(args.inline)[0], server, manager=manager)
        closers.append(lambda: manager.close(grace=1.0))
    serve_sync_until(server, stop, *closers)


async def serve_aio(args: argparse.Namespace) -> None:
    server = grpc.aio.server(options=lrofw.SERVER_OPTIONS)
    manager = None
    if args.kind == "ceiling":
        server.add_generic_rpc_handlers((ceiling_handler(aio=True),))
    elif args.kind == "lrofw":
        manager = observed(lrofw.Manager(open_store(args.store)), args)
        lrofw.add_servicer_to_server(servicers(args.inline)[1], server, manager=manager)
    else:
        raise SystemExit(f"--aio is not available for --kind {args.kind}")
    cleanup = [lambda: server.stop(0.5)]
    if manager is not None:
        cleanup.append(lambda: manager.aclose(grace=1.0))
    await serve_aio_until_signalled(server, *cleanup)


def observed(manager: lrofw.Manager, args: argparse.Namespace) -> lrofw.Manager:
    """``manager``, counted into Prometheus metrics (lrofw.metrics, a registry of its own: the
    cost is the counting, not serving them) with ``--metrics``."""
    if args.metrics:
        import prometheus_client

        import lrofw.metrics

        lrofw.metrics.enable(manager, prometheus_client.CollectorRegistry())
    return manager


def profile(path: str) -> None:
    """Profile every thread's CPU time (yappi: ``pip install yappi``) until the process exits,
    then write the functions by their own time to ``path``."""
    try:
        import yappi  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        raise SystemExit("--profile needs yappi: pip install yappi") from None
    yappi.set_clock_type("cpu")
    yappi.start()

    def dump() -> None:
        yappi.stop()
        stats = yappi.get_func_stats()
        stats.sort("tsub")
        columns = {0: ("name", 90), 1: ("ncall", 10), 2: ("tsub", 8), 3: ("ttot", 8)}
        with open(path, "w") as out:
            stats.print_all(columns=columns, out=out)

    atexit.register(dump)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kind", choices=("ceiling", "handwritten", "lrofw"), required=True)
    parser.add_argument("--aio", action="store_true")
    parser.add_argument("--store", default="memory:")
    parser.add_argument("--inline", type=float, default=None, help="inline_timeout, seconds")
    parser.add_argument("--threads", type=int, default=16, help="RPC threads (sync)")
    parser.add_argument("--metrics", action="store_true", help="lrofw: Prometheus metrics on")
    parser.add_argument(
        "--profile", metavar="PATH", help="write a yappi CPU profile of every thread here at exit"
    )
    args = parser.parse_args(argv)
    if args.profile:
        profile(args.profile)
    return serve_until_signalled(args.aio, serve_aio, serve_sync, args)


if __name__ == "__main__":
    sys.exit(main())
