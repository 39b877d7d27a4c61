"""A Redis of the benchmark's own, so that running it can never touch anyone's data.

:func:`redis_server` starts ``redis-server`` on a free port of 127.0.0.1, in a temporary directory,
with persistence off (``--save "" --appendonly no``), waits for its ``Ready to accept
connections`` line, and stops it (SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`) when the
``with`` block ends, also on an exception or Ctrl-C. On Linux the server is also told to exit when
the benchmark process dies (``PR_SET_PDEATHSIG``), so a killed run leaves no Redis behind either.

When ``redis-server`` is not installed, it raises :class:`RedisServerMissing`, a
:class:`benchmarks._proc.Skipped`: the contender that needs it is skipped, not failed.

Example::

    with redis_server() as redis:
        print(redis.url, redis.pid)        # redis://127.0.0.1:41234/0 ...
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from benchmarks._proc import Skipped

EXECUTABLE = "redis-server"
HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
#: Another process may take the free port between our look and Redis' bind: try again this often.
ATTEMPTS = 3
READY = "Ready to accept connections"
#: The environment variable through which a benchmark hands its Redis' URL to the processes it
#: starts (``benchmarks._celery_app`` reads it in the Celery worker and in each client).
URL_VARIABLE = "LROFW_BENCH_REDIS_URL"
IN_USE = "Address already in use"
_PR_SET_PDEATHSIG = 1


class RedisServerMissing(Skipped):
    """``redis-server`` is not on PATH."""


@dataclass
class RedisServer:
    """A running ``redis-server`` of our own: its process, port and what it has printed."""

    process: subprocess.Popen[str]
    port: int
    output: list[str] = field(default_factory=list)
    #: Reads the server's output into :attr:`output` until it exits.
    reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``: the whole server is ours, database 0 will do."""
        return f"redis://{HOST}:{self.port}/0"

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.output[-lines:])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def die_with_parent() -> Callable[[], None] | None:
    """On Linux, a hook run in the child before exec: SIGTERM it when this process dies.

    The kernel sends the signal when the *thread* that started the child exits, so it is only
    used from the main thread (which lives as long as the process).
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return hook


def _start(executable: str, directory: str) -> RedisServer:
    """One attempt: start the server on a free port and wait until it is ready (or has exited)."""
    port = _free_port()
    arguments = [
        ("--port", str(port)),
        ("--bind", HOST),
        ("--save", ""),  # no snapshots
        ("--appendonly", "no"),
        ("--dir", directory),
        ("--daemonize", "no"),
        ("--logfile", ""),  # to stdout, where READY is looked for
    ]
    process = subprocess.Popen(
        [executable, *(part for pair in arguments for part in pair)],
        cwd=directory,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Its own session: a Ctrl-C in the terminal reaches the benchmark, which then stops the
        # Celery worker before this server, not all three at once.
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    server = RedisServer(process, port)
    settled = threading.Event()
    assert process.stdout is not None
    stdout = process.stdout

    def drain() -> None:
        for line in stdout:
            server.output.append(line.rstrip("\n"))
            if READY in line:
                settled.set()
        settled.set()  # end of output: the server has exited

    server.reader = threading.Thread(target=drain, name=f"redis-server:{port}", daemon=True)
    server.reader.start()
    if not settled.wait(START_TIMEOUT):
        _stop(server)
        raise RuntimeError(
            f"redis-server did not get ready within {START_TIMEOUT:.0f} s:\n{server.tail()}"
        )
    if not any(READY in line for line in server.output):
        _stop(server)  # it has exited: collect it and close its output
    return server


def _stop(server: RedisServer) -> None:
    """SIGTERM (Redis exits at once, saving nothing with --save ""), SIGKILL after a bound."""
    process = server.process
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()
    if server.reader is not None:
        server.reader.join(STOP_TIMEOUT)
    if process.stdout is not None:
        process.stdout.close()


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A fresh, empty ``redis-server`` on a free port, stopped and its directory removed on exit.

    Raises:
        RedisServerMissing: ``redis-server`` is not on PATH.
        RuntimeError: it did not start (its last lines of output are in the message).
    """
    executable = shutil.which(EXECUTABLE)
    if executable is None:
        raise RedisServerMissing(
            f"{EXECUTABLE} is not on PATH; install Redis (for example `apt-get install "
            f"redis-server`) to include this contender. The benchmark starts a Redis of its own "
            f"and never uses one that is already running."
        )
    with tempfile.TemporaryDirectory(prefix="lrofw-bench-redis-") as directory:
        for attempt in range(1, ATTEMPTS + 1):
            server = _start(executable, directory)
            if server.process.poll() is None:
                break
            if attempt == ATTEMPTS or not any(IN_USE in line for line in server.output):
                raise RuntimeError(
                    f"redis-server exited with code {server.process.returncode} at start:\n"
                    f"{server.tail()}"
                )
        try:
            yield server
        finally:
            _stop(server)
