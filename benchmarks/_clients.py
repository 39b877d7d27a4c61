"""Client factories for ``benchmarks._load``: each returns one client, a zero-argument call.

- :func:`empty` — one empty unary call to the ceiling server;
- :func:`create` — one create RPC (``Common.ProvisionDut``), answered with the operation;
- :func:`create_to_result` — a create, then :func:`lrofw.wait` unless the create came back done
  (with ``inline_timeout`` a no-op does): the whole submit-to-result of one operation.

Each client has its own channel, as separate programs would.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Callable

sys.path.insert(
    0, str(pathlib.Path(__file__).resolve().parent.parent / "examples" / "tls_provision")
)

import grpc
import tls_pb2
import tls_pb2_grpc
from google.protobuf import empty_pb2

import lrofw
from benchmarks._servers import CEILING_METHOD


def empty(target: str) -> Callable[[], object]:
    channel = grpc.insecure_channel(target)
    call = channel.unary_unary(
        CEILING_METHOD,
        request_serializer=empty_pb2.Empty.SerializeToString,
        response_deserializer=empty_pb2.Empty.FromString,
    )
    request = empty_pb2.Empty()
    return lambda: call(request, timeout=30)


def create(target: str) -> Callable[[], object]:
    stub = tls_pb2_grpc.CommonStub(grpc.insecure_channel(target))
    request = tls_pb2.ProvisionDutRequest(name="dut")
    return lambda: stub.ProvisionDut(request, timeout=30)


def create_to_result(target: str) -> Callable[[], object]:
    channel = grpc.insecure_channel(target)
    stub = tls_pb2_grpc.CommonStub(channel)
    request = tls_pb2.ProvisionDutRequest(name="dut")

    def run() -> object:
        op = stub.ProvisionDut(request, timeout=30)
        if not op.done:
            op = lrofw.wait(channel, op.name, timeout=30)
        if not op.done or op.HasField("error"):
            raise RuntimeError(f"operation did not succeed: {op}")
        return op

    return run
