"""How late a waiting client notices that its operation finished.

Every operation here is created with ``image_path="until:T"``: its handler on the server
(``benchmarks/_servers.py``) sleeps until ``time.monotonic()`` reaches ``T`` and returns a
response that says when it returned, ``R`` (``time.monotonic`` is one clock for every process on
Linux). *Notice latency* is ``the moment the client's wait returned - R``: everything between
the handler returning and the client holding the done operation (the server finishing it, waking
the wait, the response crossing loopback, the client parsing it), and nothing of how punctually
the handler's own sleep ended.

- :func:`notice_latency` — one client, operations one after another that finish 20 ms after they
  are created (the client is already inside ``lrofw.wait`` by then): p50/p99 of notice latency;
  with ``wait_target``, created through one replica and waited on through another.
- :func:`polling_vs_wait` — google-api-core's default polling
  (``operation.from_gapic(...).result()``: GetOperation after 1 s, then every 1.5x longer) against
  ``lrofw.wait`` (WaitOperation), for operations lasting 0.05 s, 1 s and 5 s, all running at
  once on one server; each client thread handles one operation.
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(
    0, str(pathlib.Path(__file__).resolve().parent.parent / "examples" / "tls_provision")
)

import grpc
import tls_pb2
import tls_pb2_grpc
from google.api_core import operation as api_operation
from google.api_core import operations_v1

import lrofw


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def returned_at(op: Any) -> float:
    """When the handler returned, from the operation's response (see the module docstring)."""
    response = tls_pb2.ProvisionDutResponse()
    if not op.done or op.HasField("error") or not op.response.Unpack(response):
        raise RuntimeError(f"operation did not succeed: {op}")
    return float(response.installed_image.removeprefix("returned:"))


def _create(stub: Any, finish_at: float) -> Any:
    return stub.ProvisionDut(
        tls_pb2.ProvisionDutRequest(name="dut", image_path=f"until:{finish_at!r}"), timeout=30
    )


def notice_latency(
    target: str, samples: int, lead: float = 0.02, *, wait_target: str | None = None
) -> dict[str, float]:
    """p50/p99 (ms) of how late :func:`lrofw.wait` returns after the handler finished.

    With ``wait_target`` the operations are created through ``target`` (whose server runs
    them) and waited on through ``wait_target``: another replica on the same store, which
    learns of the finish from the store.
    """
    with (
        grpc.insecure_channel(target) as channel,
        grpc.insecure_channel(wait_target or target) as waiting,
    ):
        stub = tls_pb2_grpc.CommonStub(channel)
        late: list[float] = []
        for _ in range(samples + 3):
            finish_at = time.monotonic() + lead
            op = _create(stub, finish_at)
            op = lrofw.wait(waiting, op.name, timeout=30)
            late.append(time.monotonic() - returned_at(op))
        late = late[3:]  # the first few warm the connection and the server's threads up
    return {
        "samples": len(late),
        "p50_ms": 1000 * percentile(late, 50),
        "p99_ms": 1000 * percentile(late, 99),
        "max_ms": 1000 * max(late),
    }


def _api_core(channel: grpc.Channel, stub: Any) -> Callable[[Any], Any]:
    client = operations_v1.OperationsClient(channel)

    def wait(op: Any) -> Any:
        future = api_operation.from_gapic(op, client, tls_pb2.ProvisionDutResponse)
        future.result(timeout=60)
        return future.operation

    return wait


def _lrofw(channel: grpc.Channel, stub: Any) -> Callable[[Any], Any]:
    return lambda op: lrofw.wait(channel, op.name, timeout=60)


CLIENTS: dict[str, Callable[[grpc.Channel, Any], Callable[[Any], Any]]] = {
    "google-api-core polling": _api_core,
    "lrofw.wait": _lrofw,
}


def polling_vs_wait(
    target: str, durations: tuple[float, ...], per_duration: int
) -> list[dict[str, Any]]:
    """For each client and duration: notice latency (ms) of ``per_duration`` operations."""
    results: dict[tuple[str, float], list[float]] = {}
    failures: list[str] = []
    lock = threading.Lock()

    def one(client: str, duration: float, offset: float) -> None:
        try:
            with grpc.insecure_channel(target) as channel:
                stub = tls_pb2_grpc.CommonStub(channel)
                wait = CLIENTS[client](channel, stub)
                time.sleep(offset)  # spread the starts so that they do not poll in step
                finish_at = time.monotonic() + duration
                op = wait(_create(stub, finish_at))
                late = time.monotonic() - returned_at(op)
            with lock:
                results.setdefault((client, duration), []).append(late)
        except Exception as exc:
            with lock:
                failures.append(f"{client} {duration}s: {type(exc).__name__}: {exc}"[:300])

    threads = [
        threading.Thread(target=one, args=(client, duration, 0.013 * i))
        for client in CLIENTS
        for duration in durations
        for i in range(per_duration)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError("; ".join(failures[:3]))
    rows = []
    for (client, duration), late in sorted(results.items()):
        rows.append(
            {
                "client": client,
                "duration_s": duration,
                "samples": len(late),
                "p50_ms": 1000 * statistics.median(late),
                "max_ms": 1000 * max(late),
            }
        )
    return rows
