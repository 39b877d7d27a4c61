"""Serve the TLS ``Common`` service and ``google.longrunning.Operations`` with lrofw.

Usage::

    python examples/tls_provision/server.py --address 127.0.0.1:50051 --step-seconds 2
    python examples/tls_provision/server.py --log-file /tmp/tls.log     # port 0: a free port

Once serving it prints ``listening on HOST:PORT`` (the real port) on stdout. SIGTERM or Ctrl-C
shuts it down gracefully: new operations are refused, running ones get ``--grace-seconds`` to
finish (the rest are aborted), waiting clients are answered, and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from concurrent import futures
from types import FrameType

import _cli
import grpc
from servicer import Common

import lrofw
from lrofw.stores import SQLiteStore, StoreOpenError, open_store

#: The embedded default: operations survive a restart of the server.
DEFAULT_STORE = "sqlite:tls_provision.db"

logger = logging.getLogger("tls_provision.server")

LOG_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5


def build_parser() -> argparse.ArgumentParser:
    """Returns the command-line parser; bad values end in a usage error (exit code 2)."""
    parser = argparse.ArgumentParser(
        description="Serve ProvisionDut as a long-running operation (lrofw example)."
    )
    parser.add_argument(
        "--address",
        type=_cli.listen_address,
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="where to listen; port 0 picks a free port (default: %(default)s)",
    )
    parser.add_argument(
        "--store",
        default=DEFAULT_STORE,
        metavar="URL",
        help="where operations are kept: memory: or sqlite:PATH (default: %(default)s, a file "
        "in the working directory; the server prints the full path at start)",
    )
    parser.add_argument(
        "--step-seconds",
        type=_cli.non_negative_seconds,
        default=1.0,
        metavar="S",
        help="how long each of the three provisioning stages takes (default: %(default)s)",
    )
    parser.add_argument(
        "--log-file",
        metavar="PATH",
        help="log to this rotating file (safe to share between processes) instead of stderr",
    )
    parser.add_argument(
        "--max-workers",
        type=_cli.positive_int,
        default=8,
        metavar="N",
        help="how many operations may run at once (default: %(default)s)",
    )
    parser.add_argument(
        "--grace-seconds",
        type=_cli.non_negative_seconds,
        default=5.0,
        metavar="S",
        help="on shutdown, how long running operations may take to finish (default: %(default)s)",
    )
    return parser


def configure_logging(log_file: str | None) -> None:
    """Logs at INFO to ``log_file`` through concurrent-log-handler, or to stderr."""
    handler: logging.Handler
    if log_file:
        # Imported here: only this branch needs the optional dependency.
        from concurrent_log_handler import ConcurrentRotatingFileHandler

        handler = ConcurrentRotatingFileHandler(
            log_file, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8"
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def main(argv: list[str] | None = None) -> int:
    """Runs the server until SIGTERM or SIGINT; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        store = open_store(args.store)
    except (ValueError, StoreOpenError) as exc:
        parser.error(f"argument --store: {exc}")
    if isinstance(store, SQLiteStore):
        print(f"store: sqlite:{os.path.abspath(store.path)}", file=sys.stderr, flush=True)
    configure_logging(args.log_file)

    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    manager = lrofw.Manager(store=store, max_workers=args.max_workers)
    # Every WaitOperation call holds an RPC thread while it waits, so give the RPC pool more
    # threads than the manager has workers. SERVER_OPTIONS also makes a busy port an error.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max(32, 4 * args.max_workers)),
        options=lrofw.SERVER_OPTIONS,
    )
    try:
        lrofw.add_servicer_to_server(
            Common(step_seconds=args.step_seconds), server, manager=manager
        )
        try:
            port = server.add_insecure_port(args.address)
        except RuntimeError:  # newer grpcio raises; older ones return 0
            port = 0
        if port == 0:
            print(f"server.py: cannot listen on {args.address}", file=sys.stderr)
            return 1
        server.start()
        logger.info("serving on port %d, store %s, step %ss", port, args.store, args.step_seconds)
        print(f"listening on {_cli.host_of(args.address)}:{port}", flush=True)
        stop.wait()
        logger.info("received %s, shutting down", signal.Signals(received[0]).name)
    finally:
        # Refuse new operations, let running ones finish within the grace period (aborting the
        # rest) and wake every waiter; then stop the RPC server, giving in-flight calls such as
        # WaitOperation a moment to deliver the final state.
        manager.close(grace=args.grace_seconds)
        server.stop(grace=min(args.grace_seconds, 1.0)).wait(timeout=args.grace_seconds + 5.0)
        store.close()  # the manager leaves a store it was given open
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
