"""Call ProvisionDut and follow the long-running operation until it is done.

Usage::

    python examples/tls_provision/client.py --target 127.0.0.1:50051 --dut "some host"
    python examples/tls_provision/client.py --target 127.0.0.1:50051 --dut "some host" \
        --tls-ca ca.pem --token "$TOKEN"          # a server run with --tls-cert and --tokens

Prints the operation's name, a ``progress:`` line each time the stage or percentage changes, and
then ``done: <response>`` or ``error: CODE message``. Exit code: 0 when the operation succeeded,
1 when it (or the call) failed, the server could not be reached or ``--timeout`` passed, 2 on a
usage error. Ctrl-C cancels the operation.

With ``--tls-ca`` it connects over TLS, trusting that CA (and presents ``--tls-cert``/``--tls-key``
to a server that requires client certificates); with ``--token`` every call carries
``authorization: Bearer TOKEN`` (see ``auth.py``).
"""

from __future__ import annotations

import argparse
import sys
import time

import _cli
import auth
import grpc
import tls_pb2
import tls_pb2_grpc
from google.protobuf import text_format

import lrofw

DEFAULT_IMAGE = "gs://chromeos-image-archive/eve-release/R120-15662.0.0"
CONNECT_TIMEOUT = 5.0  # seconds; never more than --timeout
POLL_SECONDS = 0.1  # how often progress is refreshed while waiting (one WaitOperation each)


def build_parser() -> argparse.ArgumentParser:
    """Returns the command-line parser; bad values end in a usage error (exit code 2)."""
    parser = argparse.ArgumentParser(
        description="Provision a DUT through a long-running operation (lrofw example)."
    )
    parser.add_argument(
        "--target",
        type=_cli.target_address,
        required=True,
        metavar="HOST:PORT",
        help="the server to call",
    )
    parser.add_argument("--dut", required=True, metavar="NAME", help='the DUT, e.g. "some host"')
    parser.add_argument(
        "--image",
        default=DEFAULT_IMAGE,
        metavar="PATH",
        help="the OS image to install (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=_cli.positive_seconds,
        default=60.0,
        metavar="S",
        help="give up waiting after this long; the operation keeps running (default: %(default)s)",
    )
    security = parser.add_argument_group("credentials", "see docs/security.md")
    security.add_argument(
        "--token",
        metavar="TOKEN",
        help="send 'authorization: Bearer TOKEN' with every call (for a server run with --tokens)",
    )
    security.add_argument(
        "--tls-ca",
        type=_cli.pem_certificates,
        metavar="PATH",
        help="connect with TLS, trusting the server certificates this PEM CA signed",
    )
    security.add_argument(
        "--tls-cert",
        type=_cli.pem_certificates,
        metavar="PATH",
        help="present this PEM client certificate (for a server run with --tls-client-ca); "
        "needs --tls-key and --tls-ca",
    )
    security.add_argument(
        "--tls-key",
        type=_cli.pem_private_key,
        metavar="PATH",
        help="the PEM private key of --tls-cert",
    )
    return parser


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Ends in a usage error (exit code 2) for credentials that do not go together."""
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert is not None and args.tls_ca is None:
        parser.error("--tls-cert needs --tls-ca (a client certificate is part of TLS)")
    if args.token is not None and not (args.token.isascii() and args.token.isprintable()):
        parser.error("--token must be printable ASCII")


def _describe(metadata: tls_pb2.ProvisionDutMetadata) -> str:
    return f"{metadata.stage} {metadata.percent}%"


def follow(future: lrofw.OperationFuture[tls_pb2.ProvisionDutResponse], timeout: float) -> int:
    """Prints progress until the operation is done or ``timeout`` passes; returns the exit code."""
    deadline = time.monotonic() + timeout
    shown = ""
    while True:
        remaining = deadline - time.monotonic()
        done = future.wait(timeout=max(0.0, min(POLL_SECONDS, remaining)))
        metadata = future.metadata
        if isinstance(metadata, tls_pb2.ProvisionDutMetadata) and _describe(metadata) != shown:
            shown = _describe(metadata)
            print(f"progress: {shown}", flush=True)
        if done:
            break
        if remaining <= 0:
            print(
                f"error: DEADLINE_EXCEEDED not done after {timeout:g}s; "
                "the operation keeps running on the server",
                flush=True,
            )
            return 1
    response = future.result()
    print(f"done: {text_format.MessageToString(response, as_one_line=True)}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Provisions ``--dut`` and reports the outcome; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    connect_timeout = min(CONNECT_TIMEOUT, args.timeout)
    with auth.open_channel(
        args.target,
        token=args.token,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    ) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            # Over TLS a failed handshake looks the same from here as no server at all.
            hint = "; check --tls-ca, and --tls-cert/--tls-key" if args.tls_ca is not None else ""
            print(
                f"client.py: cannot reach the server at {args.target} "
                f"(not ready within {connect_timeout:g}s{hint})",
                file=sys.stderr,
            )
            return 1
        # grpc_tools writes no type stubs for *_pb2_grpc.py; the ignore tolerates configs that
        # check the generated module and those that skip it.
        stub = tls_pb2_grpc.CommonStub(channel)  # type: ignore[no-untyped-call,unused-ignore]
        request = tls_pb2.ProvisionDutRequest(name=args.dut, image_path=args.image)
        future: lrofw.OperationFuture[tls_pb2.ProvisionDutResponse] | None = None
        try:
            operation = stub.ProvisionDut(request, timeout=args.timeout)
            print(f"operation: {operation.name}", flush=True)
            future = lrofw.OperationFuture(
                channel,
                operation,
                tls_pb2.ProvisionDutResponse,
                metadata_type=tls_pb2.ProvisionDutMetadata,
            )
            return follow(future, args.timeout)
        except lrofw.OperationError as exc:
            print(f"error: {exc.code.name} {exc.message}", flush=True)
            return 1
        except grpc.RpcError as exc:  # the call itself failed, e.g. INVALID_ARGUMENT
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            print(f"error: {code.name} {details}", flush=True)
            return 1
        except KeyboardInterrupt:
            if future is not None:
                future.cancel()
                print(f"cancelled: {operation.name}", flush=True)
            return 130


if __name__ == "__main__":
    sys.exit(main())
