"""The manager's background threads: the housekeeper and, for shared stores, the watcher.

The housekeeper ends runs that pass their timeout, expires finished operations, renews the
manager's lease and resolves operations orphaned by managers that stopped. The watcher notices
changes made by other processes (a cancel, a finish, a delete) and wakes waiters and stops
handlers here. Each loop only schedules; the decisions are the manager's.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import OperationContext
    from .manager import Manager

logger = logging.getLogger("lrofw.manager")


def _guarded(what: str, fn: Callable[..., object], *args: object) -> None:
    # A failing store must not end a background thread: log, and try again next round.
    try:
        fn(*args)
    except Exception:
        logger.exception("%s failed; will retry", what)


class Background:
    """Runs the manager's periodic work until :meth:`stop`."""

    def __init__(self, manager: Manager, *, expiry_interval: float, lease: float, poll: float):
        self._manager = manager
        self._expiry_interval = expiry_interval
        self._lease = lease
        self._poll = poll
        self._stopped = False
        self._wake = threading.Condition(threading.Lock())
        self._deadlines: list[tuple[float, str, OperationContext, float]] = []
        self._threads = [
            threading.Thread(target=self._housekeep, name="lrofw-housekeeper", daemon=True)
        ]
        if manager.store.shared:
            self._threads.append(
                threading.Thread(target=self._watch, name="lrofw-watcher", daemon=True)
            )

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()

    def schedule_deadline(self, ctx: OperationContext, timeout: float) -> None:
        with self._wake:
            heapq.heappush(self._deadlines, (time.monotonic() + timeout, ctx.name, ctx, timeout))
            self._wake.notify_all()

    def _housekeep(self) -> None:
        manager = self._manager
        shared = manager.store.shared
        now = time.monotonic()
        next_expiry = now + self._expiry_interval
        next_renew = now + self._lease / 3
        next_recover = now + self._lease
        while True:
            due: list[tuple[float, str, OperationContext, float]] = []
            with self._wake:
                if self._stopped:
                    return  # checked under the lock stop() notifies with: no lost wake-up
                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    due.append(heapq.heappop(self._deadlines))
                until = next_expiry
                if shared:
                    until = min(until, next_renew, next_recover)
                if self._deadlines:
                    until = min(until, self._deadlines[0][0])
                if not due and now < until:
                    self._wake.wait(until - now)
                    continue
            for _, name, ctx, timeout in due:
                _guarded("ending a run past its timeout", manager._time_out, name, ctx, timeout)
            now = time.monotonic()
            if shared and now >= next_renew:
                _guarded("renewing the lease", manager._renew_lease)
                next_renew = now + self._lease / 3
            if shared and now >= next_recover:
                _guarded("resolving orphaned operations", manager.recover)
                next_recover = now + self._lease
            if now >= next_expiry:
                _guarded("expiring finished operations", manager.expire)
                next_expiry = time.monotonic() + self._expiry_interval

    def _watch(self) -> None:
        manager = self._manager
        seen = None
        while True:
            with self._wake:
                if self._stopped:
                    return
                self._wake.wait(self._poll)
            if not manager._watching():
                seen = None
                continue
            try:
                version = manager.store.version()
                if version != seen:
                    seen = version
                    manager._check_watched()
            except Exception:
                seen = None
                logger.exception("watching the shared store failed; will retry")
