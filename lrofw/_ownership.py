"""Ownership on shared stores: leases, recovery of orphaned operations, and watching for other
processes' changes. Part of :class:`lrofw.Manager` (a mixin), driven by ``_background``.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import _core
from .context import OperationContext
from .stores.base import Store

if TYPE_CHECKING:
    from ._runs import MethodRunner

logger = logging.getLogger("lrofw.manager")

#: How many orphans one recovery pass takes at a time.
_RECOVERY_BATCH = 1000


class Ownership:
    """The manager's shared-store half (see the module docstring)."""

    store: Store
    owner: str
    lease: float
    _lock: threading.Lock
    _clock: Callable[[], float]
    _started_at: float
    _closing: bool
    _active: dict[str, OperationContext]
    _waiters: dict[str, list[Callable[[], None]]]
    _runners: dict[str, MethodRunner]
    _loop: object
    _finish: Callable[..., bool]
    _notify: Callable[[str], None]
    _start: Callable[..., None]
    _new_context: Callable[..., OperationContext]

    def _time_out(self, name: str, ctx: OperationContext, timeout: float) -> None:
        with self._lock:
            running = self._active.get(name) is ctx
        if running and self._finish(name, None, _core.deadline_status(timeout), quiet=True):
            ctx._stop()

    def _renew_lease(self) -> None:
        self.store.renew(self.owner, self._clock() + self.lease)

    def recover(self) -> int:
        """Resolve operations whose owner stopped (its lease lapsed): ABORTED, or run again here
        when their method is resumable and registered with this manager. Runs at start and every
        ``lease`` seconds on shared stores. Returns how many it resolved.

        Example:
            >>> manager.recover()
            3
        """
        resolved = 0
        with self._lock:
            runners = dict(self._runners)
        young = self._clock() - self._started_at < self.lease
        while not self._closing:
            before = resolved
            orphans = self.store.orphans(self._clock(), _RECOVERY_BATCH)
            for orphan in orphans:
                runner = runners.get(orphan.method)
                if runner is not None and runner.is_async and self._loop is None:
                    runner = None  # no event loop to run it on yet
                if orphan.request is not None and runner is not None and runner.resumable:
                    if self.store.claim(orphan.name, orphan.owner, self.owner):
                        self._resume(orphan.name, runner, orphan.request)
                        resolved += 1
                elif orphan.request is not None and runner is None and young:
                    continue  # resumable: give its method a moment to be registered here
                elif self._finish(orphan.name, None, _core.aborted_status(), quiet=True):
                    logger.warning(
                        "%s: aborted, its server stopped before it finished", orphan.name
                    )
                    resolved += 1
            if len(orphans) < _RECOVERY_BATCH or resolved == before:
                break  # all seen, or only orphans left for others (or for later)
        return resolved

    def _resume(self, name: str, runner: MethodRunner, data: bytes) -> None:
        assert runner.request_type is not None
        try:
            request = runner.request_type.FromString(data)
        except Exception:
            logger.exception("%s: the stored request cannot be read; aborting", name)
            self._finish(name, None, _core.aborted_status(), quiet=True)
            return
        logger.warning("%s: its server stopped; running it again here", name)
        ctx = self._new_context(runner, name)
        self._start(ctx, runner, request, contextvars.Context())

    def _watching(self) -> bool:
        with self._lock:
            return bool(self._waiters) or any(c._started for c in self._active.values())

    def _check_watched(self) -> None:
        """Another process changed the shared store: wake waiters of operations now done or gone,
        and stop handlers here whose operation someone else finished (a cancel, say)."""
        with self._lock:
            waited = list(self._waiters)
            running = {n: c for n, c in self._active.items() if c._started}
        states = self.store.states([*waited, *running])
        for name in waited:
            if states.get(name, True):
                self._notify(name)
        for name, ctx in running.items():
            if states.get(name, False):
                ctx._stop()
