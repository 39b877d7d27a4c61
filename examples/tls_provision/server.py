"""Serve the TLS ``Common`` service and ``google.longrunning.Operations`` with lrofw.

Usage::

    python examples/tls_provision/server.py --address 127.0.0.1:50051 --step-seconds 2
    python examples/tls_provision/server.py --log-file /tmp/tls.log     # port 0: a free port
    python examples/tls_provision/server.py --aio    # grpc.aio server, async def handler

Once serving it prints ``listening on HOST:PORT`` (the real port) on stdout. SIGTERM or Ctrl-C
shuts it down gracefully: new operations are refused, running ones get ``--grace-seconds`` to
finish (the rest are aborted), waiting clients are answered, and the process exits 0.

Both modes share the flags, logging, output, signal handling and shutdown order (:class:`Serving`);
only the serving itself differs: :func:`serve` runs ``Common`` on a ``grpc.server`` (handlers on
the manager's threads), :func:`serve_aio` runs ``AsyncCommon`` on a ``grpc.aio.server`` inside
``asyncio.run`` (handlers as tasks on its event loop).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from concurrent import futures
from types import FrameType
from typing import Any

import _cli
import grpc
from servicer import AsyncCommon, Common

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
    parser.add_argument(
        "--aio",
        action="store_true",
        help="serve from a grpc.aio server with the async def handler (default: grpc.server, "
        "with the def handler)",
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


#: The signals that shut the server down gracefully.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Serving:
    """What both modes do around their server: :meth:`stop_signals` (the block serves),
    :meth:`listen`, :meth:`started`, then :meth:`wait_for_signal` (or its awaitable twin). Only
    creating, registering on, starting and stopping the server differ.

    Args:
        args: the parsed command line.
        manager: the manager behind the server.
    """

    def __init__(self, args: argparse.Namespace, manager: lrofw.Manager) -> None:
        self.args = args
        self.manager = manager
        #: ``--grace-seconds``: how long running operations get to finish on shutdown.
        self.grace: float = args.grace_seconds
        #: How long in-flight RPCs (WaitOperation delivering the final state) get after that.
        self.server_grace = min(self.grace, 1.0)
        self._received: signal.Signals | None = None
        self._wakeup: socket.socket | None = None

    @contextlib.contextmanager
    def stop_signals(self) -> Iterator[None]:
        """Within the block SIGTERM and SIGINT are recorded (and end the wait for them) instead of
        ending the process; the previous handlers are restored after it.

        A Python signal handler runs on the main thread, between bytecodes. When the kernel hands
        the signal to another thread (grpc's or the manager's), a main thread blocked on a lock
        would not notice it; so the wait blocks on a socket instead, that the C-level handler
        writes to from whichever thread received the signal (``signal.set_wakeup_fd``).
        """

        def record(signum: int, _frame: FrameType | None) -> None:
            self._received = self._received or signal.Signals(signum)

        reader, writer = socket.socketpair()
        with reader, writer:
            writer.setblocking(False)
            previous = {sig: signal.signal(sig, record) for sig in STOP_SIGNALS}
            previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            self._wakeup = reader
            try:
                yield
            finally:
                signal.set_wakeup_fd(previous_fd)
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                self._wakeup = None

    def wait_for_signal(self) -> None:
        """Blocks until a stop signal arrives (inside :meth:`stop_signals`)."""
        assert self._wakeup is not None, "wait inside stop_signals()"
        self._wakeup.setblocking(True)
        while self._received is None:
            self._wakeup.recv(64)
        self._stopping()

    async def wait_for_signal_async(self) -> None:
        """:meth:`wait_for_signal` for a running event loop: awaits the same socket."""
        assert self._wakeup is not None, "wait inside stop_signals()"
        self._wakeup.setblocking(False)
        loop = asyncio.get_running_loop()
        while self._received is None:
            await loop.sock_recv(self._wakeup, 64)
        self._stopping()

    def _stopping(self) -> None:
        logger.info("received %s, shutting down", getattr(self._received, "name", "no signal"))

    def listen(self, server: Any) -> int | None:
        """Adds ``--address`` to ``server``: the port, or None (said on stderr) when it is taken."""
        try:
            port = int(server.add_insecure_port(self.args.address))
        except RuntimeError:  # newer grpcio raises; older ones return 0
            port = 0
        if port == 0:
            print(f"server.py: cannot listen on {self.args.address}", file=sys.stderr)
            return None
        return port

    def started(self, port: int) -> None:
        """Logs and prints that the server is serving, with the real port."""
        args = self.args
        kind = "grpc.aio" if args.aio else "grpc"
        logger.info(
            "serving on port %d (%s), store %s, step %ss", port, kind, args.store, args.step_seconds
        )
        print(f"listening on {_cli.host_of(args.address)}:{port}", flush=True)


# On the way out both modes first close the manager (refuse new operations, let running ones
# finish within the grace period, abort the rest, wake every waiter), then stop the RPC server,
# giving in-flight calls such as WaitOperation a moment to deliver the final state.


def serve(serving: Serving) -> int:
    """Serves ``Common`` from a ``grpc.server`` until a stop signal; returns the exit code."""
    args = serving.args
    # Each blocking WaitOperation holds an RPC thread (lrofw lets at most half of them block), so
    # give the RPC pool more threads than the manager has workers.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max(32, 4 * args.max_workers)),
        options=lrofw.SERVER_OPTIONS,
    )
    with serving.stop_signals():
        try:
            # Common, and once per server the Operations service (OperationsServicer).
            lrofw.add_servicer_to_server(
                Common(step_seconds=args.step_seconds), server, manager=serving.manager
            )
            port = serving.listen(server)
            if port is None:
                return 1
            server.start()
            serving.started(port)
            serving.wait_for_signal()
        finally:
            serving.manager.close(grace=serving.grace)
            server.stop(grace=serving.server_grace).wait(timeout=serving.grace + 5.0)
    return 0


async def serve_aio(serving: Serving) -> int:
    """Serves ``AsyncCommon`` from a ``grpc.aio.server`` until a stop signal; returns the exit
    code. Run it with ``asyncio.run``: the handlers run as tasks on that loop."""
    args = serving.args
    # No RPC thread pool to size: a WaitOperation awaits without holding a thread.
    server = grpc.aio.server(options=lrofw.SERVER_OPTIONS)
    with serving.stop_signals():
        try:
            # Inside the running loop, so the manager runs AsyncCommon's handlers on it; the
            # Operations service is AsyncOperationsServicer here.
            lrofw.add_servicer_to_server(
                AsyncCommon(step_seconds=args.step_seconds), server, manager=serving.manager
            )
            port = serving.listen(server)
            if port is None:
                return 1
            await server.start()
            serving.started(port)
            await serving.wait_for_signal_async()
        finally:
            await serving.manager.aclose(grace=serving.grace)
            await server.stop(grace=serving.server_grace)
    return 0


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
    manager = lrofw.Manager(store=store, max_workers=args.max_workers)
    serving = Serving(args, manager)
    try:
        code = asyncio.run(serve_aio(serving)) if args.aio else serve(serving)
    finally:
        manager.close()  # a no-op after serve(_aio) closed it; not when creating a server failed
        store.close()  # the manager leaves a store it was given open
    if code == 0:
        logger.info("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
