"""How server.py stops, whatever its handlers do: stop signals, a bounded shutdown, a bounded loop.

- :class:`Stopper` turns SIGTERM and SIGINT into a request to shut down, for the whole life of the
  process. Once shutting down has begun (:meth:`Stopper.bound`) the process ends with its exit
  code (0) when shutting down takes longer than its budget, or at once on a second SIGTERM or
  SIGINT, logging what it leaves behind. Python cannot stop a thread, and a task that swallows
  ``CancelledError`` cannot be stopped either: without this bound one such handler would keep the
  process alive for ever.
- :func:`run_loop` is ``asyncio.run`` without its unbounded last step: tasks still pending when the
  server's coroutine returns are cancelled and given a moment, and those that ignore it are
  abandoned instead of awaited.

Example::

    stopper = Stopper(describe=lambda: ["operations/1 (flashing)"])
    with stopper.signals():
        ...                                   # start serving
        stopper.wait()                        # until SIGTERM or SIGINT
        stopper.bound(grace + SHUTDOWN_MARGIN)
        ...                                   # shut down
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from types import FrameType
from typing import Any, TypeVar

logger = logging.getLogger("tls_provision.server")

#: The signals that shut the server down.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_STOP_NUMBERS = frozenset(int(sig) for sig in STOP_SIGNALS)

#: How long shutting down may take beyond ``--grace-seconds`` before the process exits anyway.
#: Closing needs the grace plus at most about a second (stopping the RPC server); the rest is
#: headroom for a loaded machine, within the 5 s that the README promises.
SHUTDOWN_MARGIN = 3.0

#: How long tasks still pending at the end of the asyncio server get to end once cancelled.
SETTLE_SECONDS = 1.0

T = TypeVar("T")


class Stopper:
    """Stop signals and the bound on shutting down (see the module docstring).

    Args:
        describe: what is still running, one entry each, for the log when the process exits
            without waiting for it.
    """

    def __init__(self, describe: Callable[[], list[str]] = list) -> None:
        self._describe = describe
        #: The process's exit code when it ends without waiting (the one main() would return).
        self.exit_code = 0
        self._received: signal.Signals | None = None
        self._last: signal.Signals | None = None
        self._stops = 0
        self._wakeup: socket.socket | None = None
        self._watchdog: threading.Thread | None = None

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """Within the block SIGTERM and SIGINT are counted (and end :meth:`wait`) instead of
        ending the process; the previous handlers are restored after it.

        A Python signal handler runs on the main thread, between bytecodes. When the kernel hands
        the signal to another thread (grpc's or the manager's), a main thread blocked on a lock
        would not notice it; so the signals are read from a socket instead, that the C-level
        handler writes each signal's number to from whichever thread received it
        (``signal.set_wakeup_fd``): the main thread reads it while serving, the watchdog thread
        while shutting down.
        """

        def ignore(_signum: int, _frame: FrameType | None) -> None:
            """Counted through the wakeup socket; the handler only replaces the default action."""

        reader, writer = socket.socketpair()
        with reader, writer:
            writer.setblocking(False)
            reader.setblocking(False)
            previous = {sig: signal.signal(sig, ignore) for sig in STOP_SIGNALS}
            previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            self._wakeup = reader
            try:
                yield
            finally:
                signal.set_wakeup_fd(previous_fd)
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                self._wakeup = None

    def _take(self, data: bytes) -> None:
        for number in data:
            if number in _STOP_NUMBERS:
                self._stops += 1
                self._last = signal.Signals(number)
                self._received = self._received or self._last

    def _read(self, wakeup: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while data := wakeup.recv(64):
                self._take(data)

    def wait(self) -> None:
        """Blocks until a stop signal arrives (inside :meth:`signals`)."""
        wakeup = self._wakeup
        assert wakeup is not None, "wait inside signals()"
        self._read(wakeup)
        while self._received is None:
            select.select([wakeup], [], [])
            self._read(wakeup)
        self._stopping()

    async def wait_async(self) -> None:
        """:meth:`wait` for a running event loop: awaits the same socket."""
        wakeup = self._wakeup
        assert wakeup is not None, "wait inside signals()"
        loop = asyncio.get_running_loop()
        self._read(wakeup)
        while self._received is None:
            self._take(await loop.sock_recv(wakeup, 64))
        self._stopping()

    def _stopping(self) -> None:
        logger.info("received %s, shutting down", getattr(self._received, "name", "no signal"))

    def bound(self, seconds: float) -> None:
        """From now on the process ends after ``seconds``, or at once on another stop signal,
        whatever is still running. Only the first call counts (inside :meth:`signals`)."""
        if self._watchdog is not None or self._wakeup is None:
            return
        deadline = time.monotonic() + seconds
        self._watchdog = threading.Thread(
            target=self._watch, args=(deadline, seconds), name="shutdown-watchdog", daemon=True
        )
        self._watchdog.start()

    def _watch(self, deadline: float, seconds: float) -> None:
        wakeup = self._wakeup
        assert wakeup is not None
        seen = min(self._stops, 1)  # the signal that began shutting down, if one did
        while True:
            if self._stops > seen:
                # A daemon thread: whatever the main thread is blocked on, this still runs.
                name = self._last.name if self._last is not None else "a stop signal"
                self._exit_now(logging.WARNING, f"received {name} while shutting down")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._exit_now(logging.ERROR, f"shutting down took more than {seconds:g}s")
            try:
                if select.select([wakeup], [], [], remaining)[0]:
                    self._read(wakeup)
            except (OSError, ValueError):  # signals() ended and closed it: only the clock is left
                time.sleep(remaining)

    def _exit_now(self, level: int, reason: str) -> None:
        try:
            left = self._describe()
        except Exception:  # the log line matters more than what it lists
            left = ["(could not list what is still running)"]
        logger.log(
            level,
            "%s; exiting now with code %d, abandoning %s",
            reason,
            self.exit_code,
            ", ".join(left) if left else "nothing known to be running",
        )
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        # Not sys.exit: that would wait for the very threads and tasks that do not end.
        os._exit(self.exit_code)


def run_loop(main: Coroutine[Any, Any, T], settle: float = SETTLE_SECONDS) -> T:
    """Runs ``main`` on a new event loop, like ``asyncio.run``, but never waits without bound.

    ``asyncio.run`` cancels the tasks still pending at the end and then waits until every one has
    ended: a task that swallows ``CancelledError`` keeps it waiting for ever. Here they get
    ``settle`` seconds; those still running are logged and abandoned with the loop. The loop's
    default executor is shut down without waiting for its threads either.

    Example:
        >>> run_loop(serve_aio(serving))
    """
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_pending(loop, settle)
            loop.run_until_complete(_bounded(loop.shutdown_asyncgens(), settle))
        finally:
            asyncio.set_event_loop(None)
            loop.close()


async def _bounded(awaitable: Coroutine[Any, Any, None], seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(awaitable, seconds)


def _cancel_pending(loop: asyncio.AbstractEventLoop, settle: float) -> None:
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    if not pending:
        return
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.wait(pending, timeout=settle))
    stuck = [task for task in pending if not task.done()]
    for task in pending:
        if task.done() and not task.cancelled() and task.exception() is not None:
            logger.error("a task ended with an exception on shutdown", exc_info=task.exception())
    if not stuck:
        return
    logger.warning(
        "abandoning %d task(s) that did not end within %gs of being cancelled: %s",
        len(stuck),
        settle,
        ", ".join(task.get_name() for task in stuck),
    )
    abandoned = set(stuck)

    def quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Collecting an abandoned task logs "Task was destroyed but it is pending!": said above.
        if context.get("task") not in abandoned:
            loop.default_exception_handler(context)

    loop.set_exception_handler(quiet)
