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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import Message

from . import _core, errors
from .context import OperationContext, StopSignal

Operation = _core.Operation

logger = logging.getLogger("lrofw.manager")

#: Operations finished here are remembered this many seconds (at most ``RECENT_MAX`` of them), so
#: that a WaitOperation arriving just after its operation finished answers without a read.
RECENT_SECONDS, RECENT_MAX = 2.0, 4096


def _call_all(callbacks: list[Callable[[], None]], what: str = "a waiter's wake-up") -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # one waiter's failure must not keep the others asleep
            logger.exception("%s callback failed", what)


@dataclass(eq=False)
class Run:
    """One operation queued or running here: its handler's context and what running it takes.

    Attributes:
        ctx: what the handler sees (``op``).
        stop: the signal that tells the handler to stop (the one ``ctx`` reads).
        request: the request, held only until the handler starts (a dropped queued run lets go
            of it at once).
        started: the handler has started (set by :meth:`Registry.begin`).
        abandoned: it ignored its timeout; its slot was given back.
        release_slot: gives back an async handler's event-loop slot (once).
        principal: who created its operation (None: nobody), when ``principal_known``; a run
            resumed from the store does not know it.
        settled: its operation's fate was decided or changed (finished, cancelled, deleted,
            here or elsewhere) or the run ended: from then on only the store knows its state.
        returned: its handler has returned (or raised): what is left is storing the outcome,
            which a stop no longer interrupts.
    """

    ctx: OperationContext
    stop: StopSignal
    request: Message | None = None
    started: bool = False
    abandoned: bool = False
    release_slot: Callable[[], None] | None = None
    principal: str | None = None
    principal_known: bool = False
    settled: bool = False
    returned: bool = False

    @property
    def name(self) -> str:
        return self.ctx.name


class Registry:
    """Operations this manager holds in memory (queued or running), waiters, and closing.

    Args:
        capacity: how many operations may be queued or running at once (``max_workers +
            max_queued``); past it :meth:`reserve` refuses with RESOURCE_EXHAUSTED.
        workers: how many may run at once (``max_workers``; None: ``capacity``). When closing
            begins, that many minus those running of the queued runs (the oldest) have a worker
            free for them: they still start and get the grace; only the rest never start.

    Example:
        >>> registry = Registry(capacity=10)
        >>> unsubscribe = registry.subscribe("operations/1", print)
    """

    def __init__(self, capacity: int, workers: int | None = None) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._capacity = capacity
        self._workers = capacity if workers is None else workers
        self._admitted: set[str] = set()  # queued at closing with a worker free: may still start
        self._active: dict[str, Run] = {}  # queued or running here
        self._reserved = 0  # creates between their capacity check and their insert
        self._waiters: dict[str, list[Callable[[], None]]] = {}
        # The finished state of waited operations, kept while they are waited on: a woken
        # waiter takes a copy instead of reading the store again.
        self._finished: dict[str, Operation] = {}
        # Operations finished here lately, oldest first: (state, principal, when). Forgotten
        # when deleted or expired here, and all at once when another process changed the store.
        self._recent: OrderedDict[str, tuple[Operation, str | None, float]] = OrderedDict()
        self._draining = False
        self._drain_listeners: list[Callable[[], None]] = []
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

    def add(self, run: Run) -> bool:
        """Hold ``run`` as queued here; False (not held) when closing began."""
        with self._lock:
            if self._closing:
                return False
            self._active[run.name] = run
            return True

    def begin(self, run: Run) -> Message | None:
        """Mark queued ``run`` as started and hand over its request; None when it was dropped
        (cancelled or deleted while queued) or closing began, so its handler must not run."""
        with self._lock:
            request, run.request = run.request, None
            if self._active.get(run.name) is not run:
                return None
            if self._closing and run.name not in self._admitted:
                return None
            run.started = True
            return request

    def end(self, run: Run) -> None:
        """``run`` is over (or abandoned): its slot is free. Its waiters are woken unless its
        operation was settled already (they read the store: a wait that relied on the run, see
        :meth:`subscribe_running`, never outlives it)."""
        with self._lock:
            if self._active.get(run.name) is run:
                del self._active[run.name]
            self._idle.notify_all()
            unsettled, run.settled = not run.settled, True
            callbacks = list(self._waiters.get(run.name, ())) if unsettled else []
        _call_all(callbacks)

    def dequeue(self, name: str) -> Run | None:
        """Drop ``name`` if it is queued (not started): its slot and its request are let go at
        once and it never starts."""
        with self._lock:
            run = self._active.get(name)
            if run is None or run.started:
                return None
            del self._active[name]
            run.request = None
            self._idle.notify_all()
            return run

    def get(self, name: str) -> Run | None:
        """The run of ``name`` if it is queued or running here."""
        with self._lock:
            return self._active.get(name)

    def is_running(self, run: Run) -> bool:
        """True while ``run`` holds its slot and has started."""
        with self._lock:
            return run.started and self._active.get(run.name) is run

    def count(self) -> int:
        """How many operations are queued or running here."""
        with self._lock:
            return len(self._active)

    def load(self) -> tuple[dict[str, int], int, int]:
        """``(running, queued, waiters)``: handlers running here by method, runs queued for a
        worker, and waiters (WaitOperation calls, subscriptions) held here. Read at scrape
        time by :mod:`lrofw.metrics`, not counted on the hot path.

        Example:
            >>> manager.registry.load()
            ({'/chromiumos.config.api.test.tls.Common/ProvisionDut': 2}, 0, 1)
        """
        with self._lock:
            runs = list(self._active.values())
            waiters = sum(len(callbacks) for callbacks in self._waiters.values())
        running: dict[str, int] = {}
        queued = 0
        for run in runs:
            if run.started:
                running[run.ctx.method] = running.get(run.ctx.method, 0) + 1
            else:
                queued += 1
        return running, queued, waiters

    def wait_gone(self, name: str, timeout: float) -> bool:
        """Block until ``name`` is neither queued nor running here (its handler returned, was
        abandoned, or never starts), or ``timeout`` seconds pass; True if it is gone.

        Example:
            >>> manager.cancel(op.name)
            >>> manager.registry.wait_gone(op.name, timeout=2.0)  # the handler stopped
            True
        """
        with self._idle:
            return self._idle.wait_for(lambda: name not in self._active, max(0.0, timeout))

    # --- waiters ------------------------------------------------------------------------------

    def subscribe(self, name: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when ``name`` is notified or the registry closes (at once if it
        has); returns the function that unsubscribes."""
        return self.subscribe_running(name, callback)[0]

    def subscribe_running(
        self, name: str, callback: Callable[[], None]
    ) -> tuple[Callable[[], None], Run | None]:
        """:meth:`subscribe`, and, read in the same instant, the run of ``name`` if it is queued
        or running here and its operation is unsettled (so not done, and present): a wait may
        then block without reading the store, since whatever settles it wakes the waiter (its
        finish or cancel here, :meth:`end`, or the shared-store watcher for another process's
        change). None while closing: a wait then answers with the current state at once."""
        with self._lock:
            self._waiters.setdefault(name, []).append(callback)
            closed = self._closed.is_set()
            run = self._active.get(name)
            live = run if run is not None and not run.settled and not self._closing else None
        if closed:
            callback()

        def unsubscribe() -> None:
            with self._lock:
                callbacks = self._waiters.get(name)
                if callbacks is not None and callback in callbacks:
                    callbacks.remove(callback)
                    if not callbacks:
                        del self._waiters[name]
                        self._finished.pop(name, None)

        return unsubscribe, live

    def notify(
        self, name: str, finished: Operation | None = None, principal: str | None = None
    ) -> None:
        """Wake every waiter of ``name``; ``finished`` is its state if it just finished (the
        waiters get copies of it from :meth:`finished`, and later waits from :meth:`recent` for
        a while, for callers who may see ``principal``'s operations). Its run here, if any, is
        settled. Without ``finished`` (deleted, expired, changed elsewhere) it is no longer
        recent."""
        with self._lock:
            run = self._active.get(name)
            if run is not None:
                run.settled = True
            callbacks = list(self._waiters.get(name, ()))
            if finished is not None and callbacks:
                self._finished[name] = finished
            if finished is None:
                self._recent.pop(name, None)
            else:
                self._remember(name, finished, principal)
        _call_all(callbacks)

    def _remember(self, name: str, op: Operation, principal: str | None) -> None:
        now = time.monotonic()
        recent = self._recent
        recent[name] = (op, principal, now)
        recent.move_to_end(name)
        while recent and (
            len(recent) > RECENT_MAX or next(iter(recent.values()))[2] < now - RECENT_SECONDS
        ):
            recent.popitem(last=False)

    def recent(self, name: str) -> tuple[Operation, str | None] | None:
        """A copy of ``name``'s state and its principal if it finished here within the last
        ``RECENT_SECONDS`` and nothing since made that doubtful; else None."""
        with self._lock:
            entry = self._recent.get(name)
            if entry is None or entry[2] < time.monotonic() - RECENT_SECONDS:
                return None
        return _core.copy(entry[0]), entry[1]

    def forget_recent(self) -> None:
        """Another process changed the store (it may have deleted what finished here)."""
        with self._lock:
            self._recent.clear()

    def finished(self, name: str) -> Operation | None:
        """A copy of ``name``'s finished state, if it finished while waited on; else None
        (then the store knows: it may have been deleted, or the wait ended for another reason).
        """
        with self._lock:
            op = self._finished.get(name)
        return None if op is None else _core.copy(op)

    def is_waited(self, name: str) -> bool:
        """True while someone waits on ``name``."""
        with self._lock:
            return name in self._waiters

    def watched(self) -> tuple[list[str], dict[str, Run]]:
        """What a shared store's watcher must check: waited names, and runs queued or running
        here that are not settled yet."""
        with self._lock:
            active = {n: r for n, r in self._active.items() if not r.settled}
            return list(self._waiters), active

    def watching(self) -> bool:
        """True when anything here depends on other processes' changes."""
        with self._lock:
            return bool(self._waiters) or bool(self._active)

    # --- closing ------------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        """True once draining began (:meth:`begin_drain`): the server is on its way out."""
        return self._draining

    def on_drain(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` once, when draining begins (at once if it has); returns the
        function that unsubscribes."""
        with self._lock:
            if not self._draining:
                self._drain_listeners.append(callback)

                def unsubscribe() -> None:
                    with self._lock:
                        if callback in self._drain_listeners:
                            self._drain_listeners.remove(callback)

                return unsubscribe
        _call_all([callback], "a drain listener's")
        return lambda: None

    def begin_drain(self) -> bool:
        """Start draining: call every :meth:`on_drain` listener (failures logged). True only
        for the first call: the one that goes on to close."""
        with self._lock:
            if self._draining:
                return False
            self._draining = True
            listeners, self._drain_listeners = self._drain_listeners, []
        _call_all(listeners, "a drain listener's")
        return True

    def begin_close(self) -> tuple[bool, list[Run]]:
        """Start closing: ``(first, queued)``. Only the first call gets True and takes the
        queued runs that no free worker would start (they never start; their requests are let
        go); the oldest queued runs that a free worker would start at once are left to run
        (handed to a worker just before closing began, they are as good as running). Every
        waiter is woken: a wait answers with the current state from now on, it does not hold.
        """
        with self._lock:
            if self._closing:
                return False, []
            self._closing = True
            callbacks = [cb for cbs in self._waiters.values() for cb in cbs]
            waiting = [run for run in self._active.values() if not run.started]
            free = max(0, self._workers - (len(self._active) - len(waiting)))
            self._admitted = {run.name for run in waiting[:free]}
            queued = waiting[free:]
            for run in queued:
                del self._active[run.name]
                run.request = None
            self._idle.notify_all()
        _call_all(callbacks)
        return True, queued

    def drain(self, grace: float | None) -> list[Run]:
        """Wait until nothing runs here or ``grace`` seconds pass (None: no limit); return the
        runs still going then (they keep their slots until they end)."""
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
