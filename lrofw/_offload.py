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
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

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
        self._pool: ThreadPoolExecutor | None = None
        self._latest: dict[object, tuple[Callable[[Any], object], Any]] = {}

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``: on a thread of the pool when calls block, directly when they do not."""
        if not self.blocking:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._threads(), fn, *args)

    def latest(self, key: object, fn: Callable[[Any], object], value: Any) -> None:
        """Call ``fn(value)`` on a thread soon, for the newest ``value`` given for ``key`` by
        then: values that come while one waits replace it (one call per burst)."""
        with self._lock:
            waiting = key in self._latest
            self._latest[key] = (fn, value)
        if not waiting:
            self._threads().submit(self._flush, key)

    def _flush(self, key: object) -> None:
        with self._lock:
            fn, value = self._latest.pop(key, (None, None))
        if fn is not None:
            fn(value)

    def _threads(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="lrofw-io")
            return self._pool

    def shutdown(self) -> None:
        """Let the threads end once their calls are done (it does not wait); a later call
        starts new ones."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)
