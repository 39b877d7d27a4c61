"""Testing kit: a real gRPC server on ``localhost:0``, in process, for your tests and ours.

Example:
    >>> from lrofw.testing import serve
    >>> with serve(Common()) as srv:
    ...     stub = tls_pb2_grpc.CommonStub(srv.channel)
    ...     op = stub.ProvisionDut(tls_pb2.ProvisionDutRequest(name="some host"))
    ...     lrofw.wait(srv.channel, op.name, timeout=10)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from .manager import Manager
from .servicer import SERVER_OPTIONS, add_servicer_to_server


@dataclass
class Served:
    """A running test server: its channel, ``host:port`` target, manager and grpc server."""

    channel: grpc.Channel
    target: str
    manager: Manager
    server: Any


@contextlib.contextmanager
def serve(
    *servicers: object,
    manager: Manager | None = None,
    max_workers: int = 16,
    close_grace: float = 1.0,
) -> Iterator[Served]:
    """Serve ``servicers`` (and the Operations service) on ``localhost:0`` until the block ends.

    A manager is made (in memory) when none is given; either way it is closed at the end.

    Example:
        >>> with serve(Common(), manager=lrofw.Manager(max_workers=2)) as srv:
        ...     stub = tls_pb2_grpc.CommonStub(srv.channel)
    """
    manager = Manager() if manager is None else manager
    server = grpc.server(ThreadPoolExecutor(max_workers), options=SERVER_OPTIONS)
    if servicers:
        for servicer in servicers:
            add_servicer_to_server(servicer, server, manager=manager)
    else:
        from google.longrunning import operations_pb2_grpc

        from .servicer import OperationsServicer

        operations_pb2_grpc.add_OperationsServicer_to_server(OperationsServicer(manager), server)
    port = server.add_insecure_port("localhost:0")
    server.start()
    target = f"localhost:{port}"
    channel = grpc.insecure_channel(target)
    try:
        yield Served(channel, target, manager, server)
    finally:
        channel.close()
        manager.close(grace=close_grace)
        server.stop(grace=None).wait()
