"""The manager's background threads: the housekeeper and, for shared stores, the watcher.

The housekeeper runs timers (a run's timeout, say), expires finished operations, renews the
manager's lease and resolves operations orphaned by managers that stopped. The watcher notices
changes made by other processes (a cancel, a finish, a delete, a hand-over) and has waiters woken,
handlers stopped and handed-over operations resumed. Each loop only schedules: it is given the
chores as callables and decides nothing itself.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("lrofw.manager")


def _failed(what: str, exc: Exception, then: str) -> None:
    """Log a background chore's failure: the error's own message (a store error's says what to
    do: restore a backup, check the server) in the line itself, the traceback after it."""
    logger.error("%s failed; %s: %s", what, then, exc, exc_info=exc)


def _guarded(what: str, fn: Callable[..., object], *args: object) -> None:
    # A failing store must not end a background thread: log, and try again next round.
    try:
        fn(*args)
    except Exception as exc:
        _failed(what, exc, "will retry")


@dataclass(frozen=True)
class Chores:
    """What the background threads do, as callables (None: not on this store).

    Attributes:
        expire: removes expired operations.
        renew: renews the manager's lease (shared stores).
        recover: resolves orphaned operations (shared stores).
        version: the shared store's change counter (shared stores).
        watching: whether anything here depends on other processes' changes.
        check_watched: wakes waiters and stops handlers after another process's change.
        changed: told first whenever another process changed the store.
    """

    expire: Callable[[], object]
    renew: Callable[[], object] | None = None
    recover: Callable[[], object] | None = None
    version: Callable[[], int] | None = None
    watching: Callable[[], bool] = lambda: False
    check_watched: Callable[[], object] = lambda: None
    changed: Callable[[], object] = lambda: None


class Background:
    """Runs the manager's periodic work and timers until :meth:`stop`.

    Example:
        >>> background = Background(Chores(expire=manager.expire), expiry_interval=60.0,
        ...                         lease=15.0, poll=0.05)
        >>> background.start()
        >>> background.schedule(1.5, print, "a second and a half later")
    """

    def __init__(self, chores: Chores, *, expiry_interval: float, lease: float, poll: float):
        self._chores = chores
        self._expiry_interval = expiry_interval
        self._lease = lease
        self._poll = poll
        self._stopped = False
        self._poked = False  # the store said it changed: the watcher looks without waiting
        self._wake = threading.Condition(threading.Lock())
        self._order = itertools.count()  # ties between timers keep their order
        self._timers: list[tuple[float, int, Callable[..., object], tuple[Any, ...]]] = []
        self._threads = [
            threading.Thread(target=self._housekeep, name="lrofw-housekeeper", daemon=True)
        ]
        # The store's change counter the watcher starts from, read now, before the manager does
        # anything: the watcher's first look then tells another process's change from none,
        # however late it comes. (Were its first look the start, operations that finished here
        # before it would be forgotten as though another process had changed them.)
        self._seen: int | None = None  # not known: the first look counts as a change
        if chores.version is not None:
            with contextlib.suppress(Exception):  # the watcher's first look logs a failure
                self._seen = chores.version()
            self._threads.append(
                threading.Thread(target=self._watch, name="lrofw-watcher", daemon=True)
            )

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop both threads and wait for them (idempotent)."""
        with self._wake:
            self._stopped = True
            self._wake.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread() and thread.is_alive():
                thread.join()

    def poke(self) -> None:
        """The shared store says it changed: the watcher looks now, not at its next poll."""
        with self._wake:
            self._poked = True
            self._wake.notify_all()

    def schedule(self, delay: float, fn: Callable[..., object], *args: Any) -> None:
        """Call ``fn(*args)`` on the housekeeper thread ``delay`` seconds from now."""
        with self._wake:
            entry = (time.monotonic() + delay, next(self._order), fn, args)
            heapq.heappush(self._timers, entry)
            self._wake.notify_all()

    def _housekeep(self) -> None:
        chores = self._chores
        now = time.monotonic()
        next_expiry = now + self._expiry_interval
        next_renew = now + self._lease / 3
        next_recover = now + self._lease
        while True:
            due: list[tuple[float, int, Callable[..., object], tuple[Any, ...]]] = []
            with self._wake:
                if self._stopped:
                    return  # checked under the lock stop() notifies with: no lost wake-up
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    due.append(heapq.heappop(self._timers))
                until = next_expiry
                if chores.renew is not None:
                    until = min(until, next_renew, next_recover)
                if self._timers:
                    until = min(until, self._timers[0][0])
                if not due and now < until:
                    self._wake.wait(until - now)
                    continue
            for _, _, fn, args in due:
                _guarded(f"a timer ({getattr(fn, '__name__', fn)})", fn, *args)
            now = time.monotonic()
            if chores.renew is not None and now >= next_renew:
                _guarded("renewing the lease", chores.renew)
                next_renew = now + self._lease / 3
            if chores.recover is not None and now >= next_recover:
                _guarded("resolving orphaned operations", chores.recover)
                next_recover = now + self._lease
            if now >= next_expiry:
                _guarded("expiring finished operations", chores.expire)
                next_expiry = time.monotonic() + self._expiry_interval

    def _watch(self) -> None:
        chores = self._chores
        assert chores.version is not None
        seen = self._seen
        failing = False  # log an outage once, not at every tick
        while True:
            with self._wake:
                if self._stopped:
                    return
                if not self._poked:
                    self._wake.wait(self._poll)
                self._poked = False
            try:
                version = chores.version()
                if version == seen:
                    continue
                seen = version
                chores.changed()
                if chores.watching():
                    chores.check_watched()
                # Another manager may have handed operations over as it closed: take them now,
                # not a lease later.
                if chores.recover is not None:
                    chores.recover()
                if failing:
                    failing = False
                    logger.warning("watching the shared store works again")
            except Exception as exc:
                seen = None
                if not failing:
                    failing = True
                    _failed("watching the shared store", exc, "will retry quietly")
