"""Processes for the benchmarks: start a server, read its CPU time and memory from ``/proc``.

Everything here reads Linux's ``/proc`` (the benchmarks run on Linux only):

- :func:`cpu_seconds` — user + system CPU time of a process (all its threads), or of a whole
  process tree with ``tree=True`` (Celery's prefork worker is a parent and its children);
- :func:`peak_rss_kb` — the high-water mark of resident memory (``VmHWM``), summed over a tree
  with ``tree=True``; :func:`rss_kb` — resident memory now (``VmRSS``);
- :func:`spawn` — start a server process and wait for its ``listening on HOST:PORT`` line;
  :func:`serve_until_signalled` — the other end: a server process's main loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def exit_on_sigterm() -> None:
    """Make SIGTERM (a CI timeout, ``kill``) raise SystemExit in the main thread, like Ctrl-C
    raises KeyboardInterrupt, so the ``finally`` blocks that stop servers, workers and the
    Celery benchmark's own Redis run instead of the process vanishing without them."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


class Skipped(Exception):
    """A contender this machine cannot run (a program it needs is missing): the report says
    so in a line of its own, and the run does not count it as a failure."""


def _stat_fields(pid: int) -> list[str]:
    text = pathlib.Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    return text[text.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` alive now (children, grandchildren, ...)."""
    parents: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _one_cpu(pid: int) -> float:
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    # utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_seconds(pid: int, *, tree: bool = False) -> float:
    """User + system CPU seconds used so far by ``pid`` (and its descendants with ``tree``)."""
    pids = [pid, *children(pid)] if tree else [pid]
    return sum(_one_cpu(p) for p in pids)


def _status_kb(pid: int, key: str) -> int:
    try:
        lines = pathlib.Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def peak_rss_kb(pid: int, *, tree: bool = False) -> int:
    """Peak resident memory in KB (``VmHWM``), summed over the tree with ``tree``."""
    pids = [pid, *children(pid)] if tree else [pid]
    return sum(_status_kb(p, "VmHWM") for p in pids)


def rss_kb(pid: int) -> int:
    """Resident memory now in KB (``VmRSS``)."""
    return _status_kb(pid, "VmRSS")


@dataclass
class Spawned:
    """A server process started by :func:`spawn`; ``target`` is its ``HOST:PORT``."""

    process: subprocess.Popen[str]
    target: str
    output: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid, tree=True)

    def peak_kb(self) -> int:
        return peak_rss_kb(self.pid, tree=True)


LISTENING = re.compile(r"listening on (\S+:\d+)")


@contextlib.contextmanager
def spawn(
    args: list[str], *, timeout: float = 30.0, env: dict[str, str] | None = None
) -> Iterator[Spawned]:
    """Run ``python args...`` from the repository root until it prints ``listening on HOST:PORT``.

    Yields the process and its target; on exit sends SIGTERM (then SIGKILL after 10 s). The
    process's stdout and stderr are drained into ``Spawned.output`` so that it never blocks on a
    full pipe.
    """
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None
    stdout = process.stdout
    output: list[str] = []
    found = threading.Event()
    target: list[str] = []

    def drain() -> None:
        for line in stdout:
            output.append(line.rstrip("\n"))
            match = LISTENING.search(line)
            if match and not target:
                target.append(match.group(1))
                found.set()
        found.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        if not found.wait(timeout) or not target:
            raise RuntimeError(f"{' '.join(args)} did not start:\n" + "\n".join(output[-30:]))
        yield Spawned(process, target[0], output)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(5)


def sleep_until(when: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``when``."""
    delay = when - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def serve_until_signalled(
    aio: bool,
    serve_aio: Callable[[Any], Awaitable[None]],
    serve_sync: Callable[[Any, threading.Event], None],
    args: Any,
) -> int:
    """A benchmark server process's main: ``serve_aio(args)`` on an event loop (it stops itself
    on SIGTERM/SIGINT), or ``serve_sync(args, stop)`` until SIGTERM/SIGINT sets ``stop``."""
    if aio:
        asyncio.run(serve_aio(args))  # type: ignore[arg-type]
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve_sync(args, stop)
    return 0


def serve_sync_until(server: Any, stop: threading.Event, *cleanup: Callable[[], object]) -> None:
    """Serve a ``grpc.server`` on 127.0.0.1 (a free port), print ``listening on HOST:PORT``,
    and once ``stop`` is set run ``cleanup`` in order and stop the server."""
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    try:
        stop.wait()
    finally:
        for step in cleanup:
            step()
        server.stop(grace=0.5).wait(timeout=5.0)


async def serve_aio_until_signalled(server: Any, *cleanup: Callable[[], object]) -> None:
    """:func:`serve_sync_until` for a ``grpc.aio`` server: serves until SIGTERM or SIGINT, then
    runs ``cleanup`` in order (awaiting what they return when it is awaitable)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        for step in cleanup:
            result = step()
            if inspect.isawaitable(result):
                await result
