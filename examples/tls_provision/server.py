"""Serve the TLS ``Common`` service and ``google.longrunning.Operations`` with lrofw.

Usage::

    python examples/tls_provision/server.py --address 127.0.0.1:50051 --step-seconds 2
    python examples/tls_provision/server.py --log-file /tmp/tls.log     # port 0: a free port
    python examples/tls_provision/server.py --aio    # grpc.aio server, async def handler
    python examples/tls_provision/server.py --tokens tokens.txt --tls-cert server.pem \
        --tls-key server.key                      # TLS; callers named by their bearer tokens

Once serving it prints ``listening on HOST:PORT`` (the real port) on stdout. SIGTERM or Ctrl-C
drains it (docs/deploying.md): its health (``grpc.health.v1``) turns NOT_SERVING and for
``--notice-seconds`` it serves as before while load balancers and clients move away; then new
operations are refused with UNAVAILABLE, waiting clients are answered at once, running
operations get ``--grace-seconds`` to finish, those still running are handed over to another
server on a shared store (resumable) or aborted, and the process exits 0. Shutting down never
takes more than ``--notice-seconds`` + ``--grace-seconds`` + 3 s, whatever the handlers do; a
second SIGTERM or Ctrl-C ends it at once (see ``_shutdown.py``). A server started again on the
same ``--address`` binds it as soon as the old one has exited.

It serves server reflection too, so ``grpcurl -plaintext HOST:PORT list`` shows its services.

Without ``--tokens`` or ``--tls-client-ca`` every caller sees every operation (one trusted
caller); with either, each caller sees only its own (``auth.py``, ``docs/security.md``).

Both modes share the flags, logging, output, signal handling and shutdown order (:class:`Serving`);
only the serving itself differs: :func:`serve` runs ``Common`` on a ``grpc.server`` (handlers on
the manager's threads), :func:`serve_aio` runs ``AsyncCommon`` on a ``grpc.aio.server`` inside
:func:`_shutdown.run_loop` (handlers as tasks on its event loop).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from concurrent import futures
from typing import Any

import _cli
import auth
import grpc
from _shutdown import SHUTDOWN_MARGIN, Stopper, run_loop
from servicer import AsyncCommon, Common, Provisioner

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
        help="where operations are kept: memory:, sqlite:PATH, or "
        "postgresql://USER@HOST:PORT/DB?schema=NAME for replicas on several machines (default: "
        "%(default)s, a file in the working directory; the server prints the full path at start)",
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
        "--notice-seconds",
        type=_cli.non_negative_seconds,
        default=1.0,
        metavar="S",
        help="on shutdown, how long to go on serving with health NOT_SERVING, so load balancers "
        "and clients move to other servers before new operations are refused (default: "
        "%(default)s)",
    )
    parser.add_argument(
        "--lease-seconds",
        type=_cli.positive_seconds,
        default=15.0,
        metavar="S",
        help="on a shared store (sqlite:, postgresql:), how long this server's claim on its "
        "running operations lasts without renewal: if it dies, another server takes them over "
        "about this long later (default: %(default)s)",
    )
    parser.add_argument(
        "--aio",
        action="store_true",
        help="serve from a grpc.aio server with the async def handler (default: grpc.server, "
        "with the def handler)",
    )
    parser.add_argument(
        "--metrics-address",
        type=_cli.listen_address,
        metavar="HOST:PORT",
        help="serve Prometheus metrics (lrofw.metrics) at http://HOST:PORT/metrics; port 0 picks "
        "a free port, printed as 'metrics on http://HOST:PORT/metrics' (default: none)",
    )
    security = parser.add_argument_group(
        "callers and TLS", "who may call, and how (see docs/security.md)"
    )
    security.add_argument(
        "--tokens",
        type=token_file,
        metavar="PATH",
        help="a file of 'TOKEN PRINCIPAL' lines: callers send 'authorization: Bearer TOKEN' and "
        "see only their own operations; other calls are UNAUTHENTICATED",
    )
    security.add_argument(
        "--tls-cert",
        type=_cli.pem_certificates,
        metavar="PATH",
        help="serve TLS with this PEM certificate (chain); needs --tls-key",
    )
    security.add_argument(
        "--tls-key",
        type=_cli.pem_private_key,
        metavar="PATH",
        help="the PEM private key of --tls-cert",
    )
    security.add_argument(
        "--tls-client-ca",
        type=_cli.pem_certificates,
        metavar="PATH",
        help="require client certificates signed by this CA; without --tokens a caller is its "
        "certificate's subject (e.g. CN=alice,O=lab)",
    )
    return parser


def token_file(value: str) -> dict[str, str]:
    """``--tokens``: each token's principal, read from the file ``value``."""
    try:
        return auth.read_tokens(value)
    except auth.TokenFileError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Ends in a usage error (exit code 2) for TLS flags that do not go together."""
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error(
            "--tls-client-ca needs --tls-cert and --tls-key (client certificates are part of TLS)"
        )


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


class Serving:
    """What both modes do around their server: :meth:`listen`, :meth:`started`, wait for a stop
    signal (``stopper``), then :meth:`close_manager` within a bounded shutdown. Only creating,
    registering on, starting and stopping the server differ.

    Args:
        args: the parsed command line.
        manager: the manager behind the server.
        servicer: the servicer to serve (``Common``, or ``AsyncCommon`` with ``--aio``).
        stopper: the stop signals and the bound on shutting down.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        manager: lrofw.Manager,
        servicer: Provisioner,
        stopper: Stopper,
    ) -> None:
        self.args = args
        self.manager = manager
        self.servicer = servicer
        self.stopper = stopper
        #: ``--grace-seconds``: how long running operations get to finish on shutdown.
        self.grace: float = args.grace_seconds
        #: ``--notice-seconds``: how long health says NOT_SERVING before creates are refused.
        self.notice: float = args.notice_seconds
        #: How long in-flight RPCs (WaitOperation delivering the final state) get after that.
        self.server_grace = min(self.grace, 1.0)
        #: The ``identify=`` hook for the flags: tokens, client certificates, or None.
        self.identify = auth.choose_identify(args.tokens, args.tls_client_ca is not None)
        self._closing = False
        #: The port of ``--metrics-address`` once :meth:`serve_metrics` started it.
        self.metrics_port: int | None = None

    def serve_metrics(self) -> bool:
        """With ``--metrics-address``: counts the manager's operations (lrofw.metrics) and
        serves them at ``/metrics``; False (said on stderr) when the address is taken."""
        address = self.args.metrics_address
        if address is None:
            return True
        # Imported here: only this flag needs the optional dependency (lrofw[metrics]).
        import prometheus_client

        import lrofw.metrics

        lrofw.metrics.enable(self.manager)
        host, _, port = address.rpartition(":")
        try:
            httpd, _ = prometheus_client.start_http_server(int(port), addr=host.strip("[]"))
        except OSError as exc:
            print(f"server.py: cannot serve metrics on {address}: {exc}", file=sys.stderr)
            self.stopper.exit_code = 1
            return False
        self.metrics_port = int(httpd.server_port)
        return True

    def register(self, server: Any) -> None:
        """Adds the servicer, and once per server the Operations service, the health service
        and server reflection (``grpcurl -plaintext HOST:PORT list``), to ``server``."""
        lrofw.add_servicer_to_server(
            self.servicer,
            server,
            manager=self.manager,
            identify=self.identify,
            health=True,
            reflection=True,
        )

    def begin_shutdown(self) -> bool:
        """Bounds the rest of the process's life; False when the manager is closed already."""
        self.stopper.bound(self.notice + self.grace + SHUTDOWN_MARGIN)
        closing, self._closing = self._closing, True
        return not closing

    def close_failed(self) -> None:
        """Logs why closing the manager failed (inside ``except``); shutting down goes on."""
        logger.exception("closing the manager failed; going on with shutting down")

    def close_manager(self) -> None:
        """Drains and closes the manager once: health NOT_SERVING for the notice, then running
        operations get the grace, the rest are handed over (resumable, shared store) or
        aborted."""
        if self.begin_shutdown():
            try:
                self.manager.close(grace=self.grace, notice=self.notice)
            except Exception:
                self.close_failed()

    def listen(self, server: Any) -> int | None:
        """Adds ``--address`` to ``server`` (TLS with ``--tls-cert``): the port, or None (said on
        stderr) when it is taken."""
        args = self.args
        try:
            if args.tls_cert is None:
                port = int(server.add_insecure_port(args.address))
            else:
                credentials = grpc.ssl_server_credentials(
                    [(args.tls_key, args.tls_cert)],
                    root_certificates=args.tls_client_ca,
                    require_client_auth=args.tls_client_ca is not None,
                )
                port = int(server.add_secure_port(args.address, credentials))
        except RuntimeError:  # newer grpcio raises; older ones return 0
            port = 0
        if port == 0:
            print(f"server.py: cannot listen on {self.args.address}", file=sys.stderr)
            self.stopper.exit_code = 1  # also if shutting down then has to be cut short
            return None
        return port

    def started(self, port: int) -> None:
        """Logs and prints that the server is serving, with the real port."""
        args = self.args
        kind = "grpc.aio" if args.aio else "grpc"
        logger.info(
            "serving on port %d (%s), store %s, step %ss", port, kind, args.store, args.step_seconds
        )
        logger.info("transport: %s; callers: %s", self._transport(), self._callers())
        if args.tokens and args.tls_cert is None:
            logger.warning(
                "--tokens without --tls-cert: tokens cross the network in plaintext, where "
                "anyone on the path can read and reuse them"
            )
        print(f"listening on {_cli.host_of(args.address)}:{port}", flush=True)
        if self.metrics_port is not None:
            host = _cli.host_of(args.metrics_address)
            print(f"metrics on http://{host}:{self.metrics_port}/metrics", flush=True)

    def _transport(self) -> str:
        if self.args.tls_cert is None:
            return "plaintext"
        return "TLS, client certificates required" if self.args.tls_client_ca else "TLS"

    def _callers(self) -> str:
        if self.args.tokens:
            principals = len(set(self.args.tokens.values()))
            return f"bearer tokens ({principals} principal(s)), each sees its own operations"
        if self.args.tls_client_ca is not None:
            return "client certificate subjects, each sees its own operations"
        return "not identified, every caller sees every operation"


# On the way out both modes first drain and close the manager (health NOT_SERVING for the
# notice, then refuse new operations, answer every waiter at once, let running ones finish
# within the grace period, hand over or abort the rest), then stop the RPC server, giving
# in-flight calls a moment to deliver their answers. From the first step on, the stopper bounds
# how long the process may still live (notice + grace + SHUTDOWN_MARGIN), and a failure to
# close is logged rather than allowed to skip the rest.


def serve(serving: Serving) -> int:
    """Serves ``Common`` from a ``grpc.server`` until a stop signal; returns the exit code."""
    args = serving.args
    # Each blocking WaitOperation holds an RPC thread (lrofw lets at most half of them block), so
    # give the RPC pool more threads than the manager has workers.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max(32, 4 * args.max_workers)),
        options=lrofw.SERVER_OPTIONS,
    )
    try:
        # Common, and once per server the Operations service (OperationsServicer).
        serving.register(server)
        port = serving.listen(server)
        if port is None or not serving.serve_metrics():
            return 1
        server.start()
        serving.started(port)
        serving.stopper.wait()
    finally:
        serving.close_manager()
        server.stop(grace=serving.server_grace).wait(timeout=serving.grace + 5.0)
    return 0


async def serve_aio(serving: Serving) -> int:
    """Serves ``AsyncCommon`` from a ``grpc.aio.server`` until a stop signal; returns the exit
    code. Run it with :func:`_shutdown.run_loop`: the handlers run as tasks on that loop."""
    # No RPC thread pool to size: a WaitOperation awaits without holding a thread.
    server = grpc.aio.server(options=lrofw.SERVER_OPTIONS)
    try:
        # Inside the running loop, so the manager runs AsyncCommon's handlers on it; the
        # Operations service is AsyncOperationsServicer here.
        serving.register(server)
        port = serving.listen(server)
        if port is None or not serving.serve_metrics():
            return 1
        await server.start()
        serving.started(port)
        await serving.stopper.wait_async()
    finally:
        if serving.begin_shutdown():
            try:
                await serving.manager.aclose(grace=serving.grace, notice=serving.notice)
            except Exception:
                serving.close_failed()
        await server.stop(grace=serving.server_grace)
    return 0


def main(
    argv: list[str] | None = None,
    common: type[Provisioner] = Common,
    async_common: type[Provisioner] = AsyncCommon,
) -> int:
    """Runs the server until SIGTERM or SIGINT; returns the exit code.

    ``common`` and ``async_common`` are the servicers for ``grpc.server`` and ``--aio``: a test
    may pass its own (built on :class:`servicer.Provisioner`).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    try:
        store = open_store(args.store)
    except (ValueError, StoreOpenError) as exc:
        parser.error(f"argument --store: {exc}")
    if isinstance(store, SQLiteStore):
        print(f"store: sqlite:{os.path.abspath(store.path)}", file=sys.stderr, flush=True)
    configure_logging(args.log_file)
    manager = lrofw.Manager(store=store, max_workers=args.max_workers, lease=args.lease_seconds)
    servicer = (async_common if args.aio else common)(step_seconds=args.step_seconds)
    stopper = Stopper(describe=servicer.running)
    serving = Serving(args, manager, servicer, stopper)
    with stopper.signals():
        try:
            code = run_loop(serve_aio(serving)) if args.aio else serve(serving)
        finally:
            # Closed by serve(_aio) already, unless creating the server failed; bounded either way.
            serving.close_manager()
            store.close()  # the manager leaves a store it was given open
        stopper.exit_code = code
        if code == 0:
            logger.info("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
