"""The hand-written contender: a literal Python port of Chromium's Go ``infra/libs/lro``.

What a team writes without lrofw, the way the Go original does it:

- a dict of operations guarded by one lock, with an event per operation that is set when it
  finishes (the Go original's ``chan struct{}``);
- the work runs on a thread pool; the create RPC returns the new operation at once;
- a minimal Operations servicer: ``GetOperation`` and ``WaitOperation`` (an event wait with the
  request's timeout); List, Cancel and Delete answer UNIMPLEMENTED, as in the original;
- a background thread drops finished operations after a TTL.

It is careful where the original was not (it hands out copies, not the stored message, and honours
every timeout), so the comparison is against a competent hand-written server, not a broken one.
It has no durability, no request ids, no validation, no deadlines, no metadata, no cancellation:
the benchmarks compare speed, and that is all this server is for.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from google.longrunning import operations_pb2_grpc
from google.longrunning import operations_proto_pb2 as operations_pb2
from google.rpc import status_pb2


class _Operation:
    __slots__ = ("done_at", "finished", "op")

    def __init__(self, name: str) -> None:
        self.op = operations_pb2.Operation(name=name)
        self.finished = threading.Event()
        self.done_at = 0.0


class Operations(operations_pb2_grpc.OperationsServicer):
    """The Go original's ``lro.Operations``: new, finish, Get and Wait."""

    def __init__(self, ttl: float = 3600.0) -> None:
        self._lock = threading.Lock()
        self._operations: dict[str, _Operation] = {}
        self._ttl = ttl
        self._closed = threading.Event()
        threading.Thread(target=self._expire, daemon=True).start()

    def new_operation(self) -> operations_pb2.Operation:
        entry = _Operation(f"operations/{uuid.uuid4()}")
        with self._lock:
            self._operations[entry.op.name] = entry
            copy = operations_pb2.Operation()
            copy.CopyFrom(entry.op)
        return copy

    def finish(
        self, name: str, response: Any = None, error: status_pb2.Status | None = None
    ) -> None:
        with self._lock:
            entry = self._operations[name]
            if error is not None:
                entry.op.error.CopyFrom(error)
            else:
                entry.op.response.Pack(response)
            entry.op.done = True
            entry.done_at = time.monotonic()
        entry.finished.set()

    def _copy(self, name: str, context: grpc.ServicerContext) -> tuple[_Operation, Any]:
        with self._lock:
            entry = self._operations.get(name)
            if entry is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"{name} not found")
            copy = operations_pb2.Operation()
            copy.CopyFrom(entry.op)
        return entry, copy

    def GetOperation(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._copy(request.name, context)[1]

    def WaitOperation(self, request: Any, context: grpc.ServicerContext) -> Any:
        entry, copy = self._copy(request.name, context)
        if copy.done:
            return copy
        timeout = (
            request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else 60.0
        )
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, remaining)
        entry.finished.wait(timeout)
        return self._copy(request.name, context)[1]

    def close(self) -> None:
        self._closed.set()

    def _expire(self) -> None:
        while not self._closed.wait(60.0):
            cutoff = time.monotonic() - self._ttl
            with self._lock:
                for name in [
                    n for n, e in self._operations.items() if e.done_at and e.done_at < cutoff
                ]:
                    del self._operations[name]


def servicer_method(
    operations: Operations,
    pool: futures.ThreadPoolExecutor,
    work: Callable[[Any], Any],
    inline: float | None = None,
) -> Callable[[Any, grpc.ServicerContext], Any]:
    """A create RPC: make the operation, run ``work(request)`` on the pool, return at once (or,
    with ``inline`` seconds, once it is done if that comes first: lrofw's ``inline_timeout``
    written by hand, the floor under what a thread pool can do for it)."""

    def run(name: str, request: Any) -> None:
        try:
            response = work(request)
        except Exception as exc:
            operations.finish(
                name,
                error=status_pb2.Status(code=grpc.StatusCode.UNKNOWN.value[0], message=str(exc)),
            )
            return
        operations.finish(name, response)

    def create(request: Any, context: grpc.ServicerContext) -> Any:
        op = operations.new_operation()
        pool.submit(run, op.name, request)
        if inline:
            entry, _ = operations._copy(op.name, context)
            entry.finished.wait(inline)
            return operations._copy(op.name, context)[1]
        return op

    return create
