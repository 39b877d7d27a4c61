"""A server process for tests/test_durability.py, with a handler the test steers through files.

Usage::

    python tests/proc_server.py --db PATH --markers DIR [--lease S] [--resumable]

It serves the example's ``Common`` service (and Operations) on ``127.0.0.1:0`` with a SQLite
store and prints ``listening on HOST:PORT`` once serving; SIGTERM stops it. ``request.name``
picks what the ``ProvisionDut`` handler does:

- ``quick``: returns at once.
- any other name is a tag: the handler creates ``DIR/<tag>.started.<pid>``, then polls every 5 ms
  until ``DIR/<tag>.go`` exists (it writes the time, ``time.time()``, to ``DIR/<tag>.finished``
  and returns) or the operation is cancelled (it writes the time to ``DIR/<tag>.cancelled``).

The response's ``installed_image`` is ``<image_path>@<pid>``: which process ran the handler.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys
import threading
import time
from concurrent import futures

sys.path.insert(
    0, str(pathlib.Path(__file__).resolve().parent.parent / "examples" / "tls_provision")
)
# Run as a script, tests/ is on the path, not the repository root (for benchmarks._proc).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import grpc
import tls_pb2
import tls_pb2_grpc

import lrofw
from benchmarks._proc import serve_sync_until
from lrofw.stores import SQLiteStore

POLL = 0.005  # seconds between the handler's looks at its marker files


def write_marker(path: pathlib.Path, text: str) -> None:
    """Write ``path`` whole or not at all, so a test polling for it never reads half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # hidden from the tests' globs
    tmp.write_text(text)
    os.replace(tmp, path)


def handle(
    markers: pathlib.Path, request: tls_pb2.ProvisionDutRequest, op: lrofw.OperationContext
) -> tls_pb2.ProvisionDutResponse:
    """The steered handler (see the module docstring)."""
    response = tls_pb2.ProvisionDutResponse(installed_image=f"{request.image_path}@{os.getpid()}")
    if request.name == "quick":
        return response
    tag = request.name
    write_marker(markers / f"{tag}.started.{os.getpid()}", "")
    go = markers / f"{tag}.go"
    while not op.sleep(POLL):
        if go.exists():
            write_marker(markers / f"{tag}.finished", repr(time.time()))
            return response
    write_marker(markers / f"{tag}.cancelled", repr(time.time()))
    return response


def make_servicer(markers: pathlib.Path, resumable: bool) -> tls_pb2_grpc.CommonServicer:
    """A ``Common`` servicer whose ProvisionDut runs :func:`handle`."""

    class Steered(tls_pb2_grpc.CommonServicer):
        @lrofw.long_running(tls_pb2.ProvisionDutResponse, resumable=resumable)
        def ProvisionDut(
            self, request: tls_pb2.ProvisionDutRequest, op: lrofw.OperationContext
        ) -> tls_pb2.ProvisionDutResponse:
            return handle(markers, request, op)

    return Steered()


def main() -> int:
    """Serve until SIGTERM."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--markers", required=True, type=pathlib.Path)
    parser.add_argument("--lease", type=float, default=0.5)
    parser.add_argument("--resumable", action="store_true")
    args = parser.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    store = SQLiteStore(args.db)
    manager = lrofw.Manager(store=store, lease=args.lease, max_workers=64)
    server = grpc.server(futures.ThreadPoolExecutor(64), options=lrofw.SERVER_OPTIONS)
    lrofw.add_servicer_to_server(
        make_servicer(args.markers, args.resumable), server, manager=manager
    )
    try:
        serve_sync_until(server, stop, lambda: manager.close(grace=0.5))
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
