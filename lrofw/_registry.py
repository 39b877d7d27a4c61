"""The registry of one manager's live state: operations queued or running here, their waiters,
and whether the manager is closing. One lock guards all of it; nothing here does I/O.

The manager, the handler runner and ownership each hold the same :class:`Registry` and talk to it
through these methods only, so the rules about a slot (reserved, queued, started, ended,
abandoned) are written once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from . import errors
from .context import OperationContext

logger = logging.getLogger("lrofw.manager")


def _call_all(callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # one waiter's failure must not keep the others asleep
            logger.exception("a waiter's wake-up callback failed")


class Registry:
    """Operations this manager holds in memory (queued or running), waiters, and closing.

    Args:
        capacity: how many operations may be queued or running at once (``max_workers +
            max_queued``); past it :meth:`reserve` refuses with RESOURCE_EXHAUSTED.

    Example:
        >>> registry = Registry(capacity=10)
        >>> unsubscribe = registry.subscribe("operations/1", print)
    """

    def __init__(self, capacity: int) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._capacity = capacity
        self._active: dict[str, OperationContext] = {}  # queued or running here
        self._reserved = 0  # creates between their capacity check and their insert
        self._waiters: dict[str, list[Callable[[], None]]] = {}
        self._closing = False
        self._closed = threading.Event()

    # --- slots --------------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """True once closing began: nothing new is admitted."""
        return self._closing

    @property
    def closed(self) -> bool:
        """True once closing ended: every waiter was woken."""
        return self._closed.is_set()

    def check_open(self) -> None:
        """Raises UNAVAILABLE once closing began."""
        if self._closing:
            raise errors.Unavailable("the server is shutting down; retry on another server")

    def reserve(self, refusal: Callable[[], str | None] = lambda: None) -> None:
        """Take a slot for a create about to insert its operation (give it back with
        :meth:`unreserve` once it is inserted or failed). ``refusal()`` may name a reason to
        refuse with RESOURCE_EXHAUSTED even below capacity.

        Raises:
            errors.Unavailable: closing.
            errors.ResourceExhausted: every slot is taken, or ``refusal()`` said why not.
        """
        with self._lock:
            self.check_open()
            busy = len(self._active) + self._reserved
            if busy >= self._capacity:
                raise errors.ResourceExhausted(
                    f"the server is busy: {busy} operations are running or queued; retry later"
                )
            reason = refusal()
            if reason is not None:
                raise errors.ResourceExhausted(reason)
            self._reserved += 1

    def unreserve(self) -> None:
        with self._lock:
            self._reserved -= 1

    def add(self, ctx: OperationContext) -> bool:
        """Hold ``ctx`` as queued here; False (not held) when closing began."""
        with self._lock:
            if self._closing:
                return False
            self._active[ctx.name] = ctx
            return True

    def begin(self, ctx: OperationContext) -> bool:
        """Mark queued ``ctx`` as started; False when it was dropped (cancelled or deleted while
        queued) or closing began, so its handler must not run."""
        with self._lock:
            if self._closing or self._active.get(ctx.name) is not ctx:
                return False
            ctx._started = True
            return True

    def end(self, ctx: OperationContext) -> None:
        """``ctx``'s run is over (or abandoned): its slot is free."""
        with self._lock:
            if self._active.get(ctx.name) is ctx:
                del self._active[ctx.name]
            self._idle.notify_all()

    def dequeue(self, name: str) -> OperationContext | None:
        """Drop ``name`` if it is queued (not started): its slot is free and it never starts."""
        with self._lock:
            ctx = self._active.get(name)
            if ctx is None or ctx._started:
                return None
            del self._active[name]
            self._idle.notify_all()
            return ctx

    def get(self, name: str) -> OperationContext | None:
        """The context of ``name`` if it is queued or running here."""
        with self._lock:
            return self._active.get(name)

    def is_running(self, ctx: OperationContext) -> bool:
        """True while ``ctx`` holds its slot and has started."""
        with self._lock:
            return ctx._started and self._active.get(ctx.name) is ctx

    def count(self) -> int:
        """How many operations are queued or running here."""
        with self._lock:
            return len(self._active)

    # --- waiters ------------------------------------------------------------------------------

    def subscribe(self, name: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when ``name`` is notified or the registry closes (at once if it
        has); returns the function that unsubscribes."""
        with self._lock:
            self._waiters.setdefault(name, []).append(callback)
            closed = self._closed.is_set()
        if closed:
            callback()

        def unsubscribe() -> None:
            with self._lock:
                callbacks = self._waiters.get(name)
                if callbacks is not None and callback in callbacks:
                    callbacks.remove(callback)
                    if not callbacks:
                        del self._waiters[name]

        return unsubscribe

    def notify(self, name: str) -> None:
        """Wake every waiter of ``name``."""
        with self._lock:
            callbacks = list(self._waiters.get(name, ()))
        _call_all(callbacks)

    def is_waited(self, name: str) -> bool:
        """True while someone waits on ``name``."""
        with self._lock:
            return name in self._waiters

    def watched(self) -> tuple[list[str], dict[str, OperationContext]]:
        """What a shared store's watcher must check: waited names, and running contexts."""
        with self._lock:
            running = {n: c for n, c in self._active.items() if c._started}
            return list(self._waiters), running

    def watching(self) -> bool:
        """True when anything here depends on other processes' changes."""
        with self._lock:
            return bool(self._waiters) or any(c._started for c in self._active.values())

    # --- closing ------------------------------------------------------------------------------

    def begin_close(self) -> tuple[bool, list[OperationContext]]:
        """Start closing: ``(first, queued)``. Only the first call gets True and takes the
        queued contexts (they never start)."""
        with self._lock:
            if self._closing:
                return False, []
            self._closing = True
            queued = [ctx for ctx in self._active.values() if not ctx._started]
            for ctx in queued:
                del self._active[ctx.name]
            self._idle.notify_all()
            return True, queued

    def drain(self, grace: float | None) -> list[OperationContext]:
        """Wait until nothing runs here or ``grace`` seconds pass (None: no limit); return the
        contexts still running then (they keep their slots until they end)."""
        with self._lock:
            end = None if grace is None else time.monotonic() + grace
            while self._active:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._idle.wait(left)
            return list(self._active.values())

    def finish_close(self) -> None:
        """Closing ended: mark closed and wake every waiter (idempotent)."""
        with self._lock:
            self._closed.set()
            callbacks = [cb for cbs in self._waiters.values() for cb in cbs]
        _call_all(callbacks)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until :meth:`finish_close` ran; False if ``timeout`` passed first."""
        return self._closed.wait(timeout)
