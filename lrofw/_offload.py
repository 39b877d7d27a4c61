"""Store calls for an event loop: made from threads of their own, so the loop never waits for a
file or a database.

:class:`Offload` is the manager's collaborator for asyncio: ``await offload.run(fn, *args)`` runs a
blocking call on its threads (directly, when the store does not block), and ``latest(key, fn,
value)`` hands a write over where only the newest value matters (progress reports), one write per
burst.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ._workers import Workers

T = TypeVar("T")

#: Threads that carry an asyncio server's store calls (reads and writes) off its event loop. The
#: SQLite store commits the writes that meet there as one group.
THREADS = 8


class Offload:
    """Runs blocking calls for coroutines on a small pool of threads, started on first use.

    Args:
        blocking: whether the calls block (a file, a database); when False they run directly.

    Example:
        >>> offload = Offload(blocking=True)
        >>> op = await offload.run(store.get, name)
        >>> offload.shutdown()
    """

    def __init__(self, *, blocking: bool) -> None:
        self.blocking = blocking
        self._lock = threading.Lock()
        # The manager's lean pool (one queue put per call, threads started on demand), not
        # run_in_executor: a call here is a hop to a thread and back, several per operation,
        # and concurrent.futures' Future, condition and chaining cost more than the hop itself.
        self._workers = Workers(THREADS, "lrofw-io")
        self._latest: dict[object, tuple[Callable[[Any], object], Any]] = {}  # not yet written
        self._draining: set[object] = set()  # keys a thread is writing the values of, in turn
        self._drained = threading.Condition(self._lock)  # notified when a key leaves _draining
        self._inboxes: dict[asyncio.AbstractEventLoop, _Inbox] = {}

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``: on a thread of the pool when calls block, directly when they do not."""
        if not self.blocking:
            return fn(*args)
        loop = asyncio.get_running_loop()
        inbox = self._inboxes.get(loop)
        if inbox is None:
            with self._lock:
                inbox = self._inboxes.setdefault(loop, _Inbox(loop))
        future: asyncio.Future[T] = loop.create_future()
        self._workers.submit(_call, inbox, future, fn, args)
        return await future

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        """``fn(*args)`` on a thread of the pool when calls block, directly when they do not;
        nobody waits for it."""
        if self.blocking:
            self._workers.submit(fn, *args)
        else:
            fn(*args)

    def latest(self, key: object, fn: Callable[[Any], object], value: Any) -> None:
        """Call ``fn(value)`` on a thread soon, for the newest ``value`` given for ``key`` by
        then: values that come while one waits replace it (one call per burst). The calls for
        one key are made one after another, in the order of their values."""
        with self._lock:
            waiting = key in self._latest
            self._latest[key] = (fn, value)
        if not waiting:
            self._workers.submit(self._drain, key)

    def busy(self, key: object) -> bool:
        """Whether a value given to :meth:`latest` for ``key`` may not be written yet."""
        with self._lock:
            return key in self._latest or key in self._draining

    def flush(self, key: object) -> None:
        """Return once every value given to :meth:`latest` for ``key`` before this call is
        written: those waiting are written on this thread (it blocks; from a coroutine, use
        ``await offload.run(offload.flush, key)``).

        Example:
            >>> offload.flush(name)  # the last progress report is stored before the outcome
        """
        self._drain(key, wait=True)

    def _drain(self, key: object, *, wait: bool = False) -> None:
        """Write ``key``'s newest value, and each one given meanwhile, until none is left. A
        thread finding another one at it leaves the values to it, or (``wait``) waits for it
        and then writes what is still left."""
        with self._lock:
            while key in self._draining:
                if not wait:
                    return  # the thread at it writes this key's value too
                self._drained.wait()
            if key not in self._latest:
                return
            self._draining.add(key)
        try:
            while True:
                with self._lock:
                    entry = self._latest.pop(key, None)
                    if entry is None:  # done: in the same hold as the look, so that a value
                        self._draining.discard(key)  # given next is drained by a thread of
                        self._drained.notify_all()  # its own
                        return
                fn, value = entry
                fn(value)
        except BaseException:
            with self._lock:
                self._draining.discard(key)
                self._drained.notify_all()
                left = key in self._latest
            if left:  # given while this one was written: not to be stranded
                self._workers.submit(self._drain, key)
            raise

    def shutdown(self) -> None:
        """Let the threads end once their calls are done (it does not wait); a later call
        starts new ones."""
        with self._lock:
            workers, self._workers = self._workers, Workers(THREADS, "lrofw-io")
        workers.shutdown()


class _Inbox:
    """Results for one event loop's waiting coroutines. Threads post them; the first post into
    an empty inbox wakes the loop, which settles every result posted by then: under load, one
    wake-up of the loop serves many calls."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []

    def post(self, future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        with self._lock:
            self._items.append((future, result, exc))
            first = len(self._items) == 1
        if first:
            self._loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for future, result, exc in items:
            if future.done():  # the awaiting coroutine was cancelled meanwhile
                continue
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)


def _call(
    inbox: _Inbox, future: asyncio.Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    """On a pool thread: ``fn(*args)``, its result or exception posted to ``future``'s loop."""
    try:
        result = fn(*args)
    except BaseException as exc:
        inbox.post(future, None, exc)
    else:
        inbox.post(future, result, None)
