"""Run the whole example: start server.py, provision a DUT with client.py, show a failure, stop.

Usage::

    python examples/tls_provision/demo.py [--store URL] [--step-seconds S] [--aio]
    python examples/tls_provision/demo.py --tokens tokens.txt --token s3cret \
        --tls-cert server.pem --tls-key server.key --tls-ca ca.pem

Exits 0 when every step behaved as expected: ``some host`` is provisioned (client exit 0),
``unknown host`` fails with NOT_FOUND (client exit 1), and the server exits 0 on SIGTERM.
Every wait has a timeout, so the demo cannot hang. With ``--aio`` the server runs its asyncio
variant (``server.py --aio``); the client is the same standard client either way.

The credential flags are handed on: ``--tokens``, ``--tls-cert``, ``--tls-key`` and
``--tls-client-ca`` to server.py, ``--token`` and ``--tls-ca`` to client.py (and
``--tls-client-cert``/``--tls-client-key`` as its ``--tls-cert``/``--tls-key``). With ``--tokens``
the demo also checks that a call without a token is refused with UNAUTHENTICATED.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import _cli

HERE = Path(__file__).resolve().parent
LISTEN_TIMEOUT = 30.0  # seconds for the server to print "listening on"
STOP_TIMEOUT = 15.0  # seconds for the server to exit after SIGTERM
LISTENING = "listening on "


def _pump(stream: IO[str], prefix: str, lines: queue.Queue[str]) -> None:
    """Echoes each line of ``stream`` with ``prefix`` and queues it, until end of file."""
    for line in stream:
        print(f"{prefix}{line}", end="", flush=True)
        lines.put(line.rstrip("\n"))


@contextlib.contextmanager
def running_server(
    store: str | None, step_seconds: float, aio: bool = False, extra: Sequence[str] = ()
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Starts server.py on a free port (with the flags ``extra`` too); yields the process and its
    ``HOST:PORT``.

    On the way out the server is killed if it is still running, so no process is left behind.
    """
    flags = ["--address", "127.0.0.1:0", "--step-seconds", f"{step_seconds:g}"]
    if store is not None:  # else the server's default: SQLite, the embedded default store
        flags += ["--store", store]
    if aio:
        flags.append("--aio")
    flags += extra
    command = [sys.executable, str(HERE / "server.py"), *flags]
    print(f"$ server.py {' '.join(shlex.quote(f) for f in flags)}", flush=True)
    # The server's log (stderr) is interleaved with its stdout and echoed with a prefix.
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as server:
        assert server.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(
            target=_pump, args=(server.stdout, "server| ", lines), daemon=True
        )
        reader.start()
        try:
            yield server, _await_listening(server, lines)
        finally:
            if server.poll() is None:
                server.kill()
            server.wait(timeout=STOP_TIMEOUT)
            reader.join(timeout=STOP_TIMEOUT)


def _await_listening(server: subprocess.Popen[str], lines: queue.Queue[str]) -> str:
    """Returns the address from the server's ``listening on`` line, or raises RuntimeError."""
    deadline = time.monotonic() + LISTEN_TIMEOUT
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=min(remaining, 0.2))
        except queue.Empty:
            if server.poll() is not None:
                raise RuntimeError(
                    f"server exited with {server.returncode} before listening"
                ) from None
            continue
        if line.startswith(LISTENING):
            return line[len(LISTENING) :]
    raise RuntimeError(f"server printed no {LISTENING!r} line within {LISTEN_TIMEOUT:g}s")


def run_client(target: str, dut: str, timeout: float, extra: Sequence[str] = ()) -> tuple[int, str]:
    """Runs client.py for ``dut`` (with the flags ``extra`` too), echoing its output; returns its
    exit code and output."""
    command = [
        sys.executable,
        str(HERE / "client.py"),
        "--target", target,
        "--dut", dut,
        "--timeout", str(timeout),
        *extra,
    ]  # fmt: skip
    shown = " ".join(_masked([shlex.quote(flag) for flag in extra]))
    print(
        f"$ client.py --target {target} --dut {dut!r} --timeout {timeout:g} {shown}".rstrip(),
        flush=True,
    )
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as client:
        assert client.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(
            target=_pump, args=(client.stdout, "client| ", lines), daemon=True
        )
        reader.start()
        try:
            code = client.wait(timeout=timeout + 10.0)
        except subprocess.TimeoutExpired:
            client.kill()
            code = client.wait()
            print(f"demo: client.py did not finish within {timeout + 10.0:g}s; killed", flush=True)
        reader.join(timeout=5.0)
    return code, "\n".join(lines.queue)


def _masked(flags: Sequence[str]) -> list[str]:
    """``flags`` with the value of ``--token`` hidden, for echoing the command."""
    return ["***" if i > 0 and flags[i - 1] == "--token" else f for i, f in enumerate(flags)]


def build_parser() -> argparse.ArgumentParser:
    """Returns the command-line parser; bad values end in a usage error (exit code 2)."""
    parser = argparse.ArgumentParser(description="Run the lrofw TLS example end to end.")
    parser.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="passed to server.py --store (default: the server's default, a SQLite file)",
    )
    parser.add_argument(
        "--step-seconds",
        type=_cli.non_negative_seconds,
        default=0.2,
        metavar="S",
        help="passed to server.py --step-seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--aio",
        action="store_true",
        help="run server.py --aio: a grpc.aio server with the async def handler",
    )
    server_flags = parser.add_argument_group(
        "handed to server.py", "callers and TLS (see docs/security.md)"
    )
    for flag in SERVER_FLAGS:
        server_flags.add_argument(flag, metavar="PATH", help=f"server.py {flag}")
    client_flags = parser.add_argument_group("handed to client.py")
    client_flags.add_argument("--token", metavar="TOKEN", help="client.py --token")
    client_flags.add_argument("--tls-ca", metavar="PATH", help="client.py --tls-ca")
    client_flags.add_argument("--tls-client-cert", metavar="PATH", help="client.py --tls-cert")
    client_flags.add_argument("--tls-client-key", metavar="PATH", help="client.py --tls-key")
    return parser


#: The flags the demo hands to server.py unchanged.
SERVER_FLAGS = ("--tokens", "--tls-cert", "--tls-key", "--tls-client-ca")
#: The demo's flags handed to client.py, and the client's name for each.
CLIENT_FLAGS = {
    "--token": "--token",
    "--tls-ca": "--tls-ca",
    "--tls-client-cert": "--tls-cert",
    "--tls-client-key": "--tls-key",
}


def handed_on(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """The ``flags`` given on the demo's command line, under their names for the other script."""
    handed: list[str] = []
    for ours, theirs in flags.items():
        value = getattr(args, ours.lstrip("-").replace("-", "_"))
        if value is not None:
            handed += [theirs, value]
    return handed


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; returns 0 when everything behaved as expected, else 1."""
    args = build_parser().parse_args(argv)
    client_timeout = 3 * args.step_seconds + 30.0
    failures: list[str] = []
    server_flags = handed_on(args, {flag: flag for flag in SERVER_FLAGS})
    client_flags = handed_on(args, CLIENT_FLAGS)
    try:
        with running_server(args.store, args.step_seconds, args.aio, server_flags) as (
            server,
            target,
        ):
            code, output = run_client(target, "some host", client_timeout, client_flags)
            if code != 0 or "done:" not in output:
                failures.append(f"'some host' should succeed; client exited {code}")
            code, output = run_client(target, "unknown host", client_timeout, client_flags)
            if code != 1 or "error: NOT_FOUND" not in output:
                failures.append(f"'unknown host' should fail with NOT_FOUND; client exited {code}")
            if args.tokens is not None:
                tokenless = handed_on(
                    args, {k: v for k, v in CLIENT_FLAGS.items() if k != "--token"}
                )
                code, output = run_client(target, "some host", client_timeout, tokenless)
                if code != 1 or "error: UNAUTHENTICATED" not in output:
                    failures.append(
                        f"a call without a token should be UNAUTHENTICATED; client exited {code}"
                    )
            print("$ kill -TERM <server>", flush=True)
            server.send_signal(signal.SIGTERM)
            try:
                code = server.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                failures.append(f"server did not exit within {STOP_TIMEOUT:g}s of SIGTERM")
            else:
                if code != 0:
                    failures.append(f"server exited {code} after SIGTERM, expected 0")
    except RuntimeError as exc:
        failures.append(str(exc))
    for failure in failures:
        print(f"demo: FAILED: {failure}", file=sys.stderr, flush=True)
    if failures:
        return 1
    print("demo: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
