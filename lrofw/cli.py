"""The ``lrofw`` command: list, inspect, wait on, cancel and delete a server's operations.

Run as ``lrofw ops list --target HOST:PORT`` (the console script) or ``python -m lrofw``; the
options and exit codes are in ``lrofw --help`` and docs/operating.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any, NoReturn, TextIO

import grpc
from google.longrunning import operations_pb2_grpc
from google.longrunning import operations_proto_pb2 as operations_pb2

from . import _cli_render as render
from . import errors
from ._cli_connect import Bearer, Failure, Options, connect, reflection
from .client import DEFAULT_POLICY, wait

__all__ = ["EXIT_CODES", "main"]

#: The exit codes, as ``lrofw --help`` lists them.
EXIT_CODES = {
    0: "success (get/wait: the operation finished with a response, or get of an unfinished one)",
    1: "the operation ended with an error (its code name and message printed), the RPC answered "
    "an error status (NOT_FOUND etc., printed), or wait's --timeout passed first",
    2: "usage or connection failure (one line on stderr)",
    130: "interrupted (Ctrl-C)",
}

LIST_NAME = "operations"  # ListOperationsRequest.name: the collection
PROGRESS_EVERY = 1.0  # seconds between wait's looks at the operation's metadata

_EPILOG = """\
--timeout S: for list, get, cancel and delete, the deadline of each call; for wait (which
may hold for hours) the longest wait in all, each call within it held by lrofw's wait policy.
Connection options may come before or after the subcommand.

The token comes from --token or the LROFW_TOKEN environment variable and is sent as
'authorization: Bearer TOKEN' on every call.

exit codes:
""" + "\n".join(
    textwrap.fill(text, 88, initial_indent=f"  {code:<4}", subsequent_indent=" " * 6)
    for code, text in EXIT_CODES.items()
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lrofw: {message} (see lrofw --help)\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"seconds must be > 0, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _connection_options() -> _Parser:
    """The options every subcommand takes; SUPPRESS keeps a value given before the subcommand."""
    common = _Parser(add_help=False)
    group = common.add_argument_group("connection")
    keep = argparse.SUPPRESS
    group.add_argument("--target", metavar="HOST:PORT", default=keep, help="the server")
    group.add_argument(
        "--tls-ca",
        metavar="PATH",
        default=keep,
        help="use TLS, trusting the CA certificates in this PEM file (with only --tls-cert: "
        "the default roots)",
    )
    group.add_argument(
        "--tls-cert",
        metavar="PATH",
        default=keep,
        help="a client certificate (PEM) for mutual TLS; needs --tls-key",
    )
    group.add_argument("--tls-key", metavar="PATH", default=keep, help="the key of --tls-cert")
    group.add_argument(
        "--token",
        metavar="TOKEN",
        default=keep,
        help="sent as 'authorization: Bearer TOKEN' (default: $LROFW_TOKEN)",
    )
    group.add_argument(
        "--timeout",
        metavar="S",
        type=_seconds,
        default=keep,
        help="each call's deadline; for wait, the longest wait in all",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=keep,
        help="print operations as JSON (one object per line for list)",
    )
    return common


def parser() -> argparse.ArgumentParser:
    """The ``lrofw`` argument parser (``lrofw --help``).

    Example:
        >>> parser().parse_args(["ops", "get", "operations/x", "--target", "h:1"]).name
        'operations/x'
    """
    common = _connection_options()
    top: argparse.ArgumentParser = _Parser(
        prog="lrofw",
        description="Look at and act on the long-running operations of a gRPC server "
        "(google.longrunning.Operations).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    groups = top.add_subparsers(dest="group", required=True, metavar="ops")
    ops = groups.add_parser("ops", help="operations: list, get, wait, cancel, delete")
    commands = ops.add_subparsers(dest="command", required=True, parser_class=_Parser)
    kinds = {
        "list": "list operations (one page, or --all)",
        "get": "show one operation",
        "wait": "wait until an operation is done, showing its progress",
        "cancel": "ask the server to cancel an operation",
        "delete": "delete an operation's record (does not cancel it)",
    }
    for command, text in kinds.items():
        sub = commands.add_parser(
            command,
            help=text,
            description=text,
            parents=[common],
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if command == "list":
            sub.add_argument(
                "--filter",
                metavar="EXPR",
                default="",
                help="an AIP-160 filter, e.g. 'done = false'",
            )
            sub.add_argument(
                "--page-size",
                metavar="N",
                type=_non_negative,
                default=0,
                help="operations per page (0: the server's default)",
            )
            sub.add_argument("--all", action="store_true", help="follow every page")
        else:
            sub.add_argument("name", metavar="NAME", help="the operation's name")
    return top


class Command:
    """One run of a subcommand: the stub, the call metadata and where output goes."""

    def __init__(self, channel: grpc.Channel, options: Options, out: TextIO, err: TextIO):
        if options.token:
            channel = grpc.intercept_channel(channel, Bearer(options.token))
        self.stub = operations_pb2_grpc.OperationsStub(channel)
        self.options = options
        self.types = render.Types(reflection(channel))
        self.out, self.err = out, err

    def call(self, method: str, request: Any) -> Any:
        """One RPC with the metadata and the per-call deadline; Failure for an error status."""
        try:
            return getattr(self.stub, method)(request, timeout=self.options.timeout)
        except grpc.RpcError as exc:
            raise _rpc_failure(method, exc) from None

    def show(self, op: operations_pb2.Operation) -> None:
        """Print one operation: a JSON line or a readable block."""
        if self.options.json:
            print(render.as_json(op, self.types), file=self.out)
        else:
            print(render.block(op, self.types), file=self.out)

    def ended(self, op: operations_pb2.Operation) -> int:
        """Show ``op``; exit code 1 (with its error on stderr) if it ended with one, else 0."""
        self.show(op)
        if op.done and op.HasField("error"):
            print(f"lrofw: {op.name} failed: {render.result_text(op)}", file=self.err)
            return 1
        return 0

    def list(self, args: argparse.Namespace) -> int:
        request = operations_pb2.ListOperationsRequest(
            name=LIST_NAME, filter=args.filter, page_size=args.page_size
        )
        rows: list[operations_pb2.Operation] = []
        while True:
            page = self.call("ListOperations", request)
            for op in page.operations:
                if self.options.json:
                    print(render.as_json(op, self.types), file=self.out, flush=True)
                else:
                    rows.append(op)
            if not page.next_page_token:
                break
            if not args.all:
                print("lrofw: more operations: add --all to list every page", file=self.err)
                break
            request.page_token = page.next_page_token
        if not self.options.json:
            print(render.table(rows), file=self.out)
        return 0

    def get(self, args: argparse.Namespace) -> int:
        return self.ended(self.call("GetOperation", operations_pb2.GetOperationRequest(
            name=args.name)))  # fmt: skip

    def wait(self, args: argparse.Namespace) -> int:
        end = None if self.options.timeout is None else time.monotonic() + self.options.timeout
        bar = self.err.isatty()
        latest: operations_pb2.Operation | None = None
        shown = ""
        while True:
            left = None if end is None else end - time.monotonic()
            step = PROGRESS_EVERY if left is None else max(0.0, min(PROGRESS_EVERY, left))
            try:
                done = wait(self.stub, args.name, timeout=step, policy=DEFAULT_POLICY)
            except errors.OperationTimeout as exc:
                if isinstance(exc.operation, operations_pb2.Operation):
                    latest = exc.operation
            except errors.OperationError as exc:
                raise Failure(f"WaitOperation {args.name}: {exc.code.name}: {exc}", 1) from None
            else:
                if bar and shown:
                    print(file=self.err)
                return self.ended(done)
            line = render.progress(latest, self.types, bar)
            if bar:
                print(f"\r{line}\x1b[K", end="", file=self.err, flush=True)
            elif line != shown:
                print(f"{args.name}: {line}", file=self.err, flush=True)
            shown = line
            if left is not None and left <= step:
                if bar:
                    print(file=self.err)
                if latest is not None:
                    self.show(latest)
                raise Failure(
                    f"{args.name} was not done after {self.options.timeout:g} s (--timeout)", 1
                )

    def cancel(self, args: argparse.Namespace) -> int:
        self.call("CancelOperation", operations_pb2.CancelOperationRequest(name=args.name))
        print(f"cancel requested: {args.name}", file=self.out)
        return 0

    def delete(self, args: argparse.Namespace) -> int:
        self.call("DeleteOperation", operations_pb2.DeleteOperationRequest(name=args.name))
        print(f"deleted: {args.name}", file=self.out)
        return 0


def _rpc_failure(method: str, exc: grpc.RpcError) -> Failure:
    """An error status as one line: UNAVAILABLE is a connection failure (2), the rest 1."""
    code = getattr(exc, "code", lambda: None)() or grpc.StatusCode.UNKNOWN
    details = getattr(exc, "details", lambda: "")() or ""
    return Failure(f"{method}: {code.name}: {details}", 2 if code is grpc.StatusCode.UNAVAILABLE
                   else 1)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lrofw`` command; returns its exit code (see :data:`EXIT_CODES`).

    Example:
        >>> main(["ops", "list", "--target", "127.0.0.1:50051"])  # prints the table
        0
    """
    out, err = sys.stdout, sys.stderr
    try:
        args = parser().parse_args(argv)
        options = Options.of(args)
        channel = connect(options)
        with channel:
            command = Command(channel, options, out, err)
            code: int = getattr(command, args.command)(args)
            return code
    except Failure as failure:
        print(f"lrofw: {failure}", file=err)
        return failure.exit_code
    except KeyboardInterrupt:
        print("\nlrofw: interrupted", file=err)
        return 130
    except BrokenPipeError:
        # The reader went away (``lrofw ops list | head``): nothing more to say, to anyone.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
