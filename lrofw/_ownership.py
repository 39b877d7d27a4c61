"""Ownership on shared stores: leases, recovery of orphaned operations, hand-over at close, and
watching for other processes' changes.

:class:`Ownership` is the manager's collaborator over the store and the registry: it is given a
``finish`` callback to end an operation and a ``resume`` callback to run one again here; the
background threads drive it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2

from . import _core
from ._registry import Registry, Run
from ._runs import MethodRunner
from .stores.base import Orphan, Store

logger = logging.getLogger("lrofw.manager")

#: How many orphans one recovery pass takes at a time.
_RECOVERY_BATCH = 1000

#: ``finish(name, status)`` ends ``name`` with ``status`` if it is not done; True if it did.
Finish = Callable[[str, status_pb2.Status], bool]
#: ``resume(name, runner, request)`` runs ``runner`` again here for the claimed ``name``.
Resume = Callable[[str, MethodRunner, Message], None]


def gave_up_status(attempts: int) -> status_pb2.Status:
    """The error of a resumable operation whose servers kept stopping under it."""
    return _core.status(
        grpc.StatusCode.ABORTED,
        f"gave up after {attempts} attempts: the server running it stopped each time before "
        "it finished",
    )


class Ownership:
    """Leases, recovery and hand-over of one manager's operations on a shared store.

    Args:
        store: the store.
        registry: the manager's registry (what runs and waits here).
        owner: this manager's owner id.
        lease: seconds a claim lasts without renewal.
        clock: wall-clock time.
        max_attempts: runs of a resumable operation that may lose their server before it is
            ended ABORTED instead of run again.
        finish: ends an operation with a status (first writer wins).
        resume: runs a claimed resumable operation again here.
        can_run: whether ``runner`` can run here now (an async one needs an event loop).

    Example:
        >>> ownership.recover()
        0
    """

    def __init__(
        self,
        store: Store,
        registry: Registry,
        *,
        owner: str,
        lease: float,
        clock: Callable[[], float],
        max_attempts: int,
        finish: Finish,
        resume: Resume,
        can_run: Callable[[MethodRunner], bool],
    ) -> None:
        self._store = store
        self._registry = registry
        self._owner = owner
        self._lease = lease
        self._clock = clock
        self._started_at = clock()
        self._max_attempts = max_attempts
        self._finish = finish
        self._resume = resume
        self._can_run = can_run
        self._lock = threading.Lock()
        self._runners: dict[str, MethodRunner] = {}

    def register(self, runner: MethodRunner) -> None:
        """Make a method known, so that its orphans can be resumed here."""
        with self._lock:
            self._runners[runner.method] = runner

    def renew_lease(self) -> None:
        """Keep this manager's claim on its operations alive for another lease."""
        self._store.renew(self._owner, self._clock() + self._lease)

    def recover(self) -> int:
        """Resolve operations whose owner stopped (its lease lapsed, or it handed them over):
        ABORTED, or run again here when their method is resumable and registered here and they
        have not lost their server ``max_attempts`` times. Returns how many it resolved."""
        resolved = 0
        with self._lock:
            runners = dict(self._runners)
        young = self._clock() - self._started_at < self._lease
        while not self._registry.closing:
            before = resolved
            orphans = self._store.orphans(self._clock(), _RECOVERY_BATCH)
            for orphan in orphans:
                resolved += self._resolve(orphan, runners, young)
            if len(orphans) < _RECOVERY_BATCH or resolved == before:
                break  # all seen, or only orphans left for others (or for later)
        return resolved

    def _resolve(self, orphan: Orphan, runners: dict[str, MethodRunner], young: bool) -> int:
        if orphan.owner == self._owner and self._registry.get(orphan.name) is not None:
            return 0  # running here: this manager's own lease lapsed for a moment (renewed soon)
        runner = runners.get(orphan.method)
        if runner is not None and not self._can_run(runner):
            runner = None  # no event loop to run it on yet
        resumable = orphan.request is not None
        if resumable:
            # A hand-over (no owner) is no loss; a lapsed lease is.
            attempts = orphan.lost + (0 if orphan.owner is None else 1)
            if attempts >= self._max_attempts:
                if self._claimed(orphan) and self._finish(orphan.name, gave_up_status(attempts)):
                    logger.error(
                        "%s: aborted, its server stopped %d times before it finished",
                        orphan.name,
                        attempts,
                        extra=_core.about(orphan.name, orphan.method),
                    )
                    return 1
                return 0
        if resumable and runner is not None and runner.resumable:
            if self._store.claim(orphan.name, orphan.owner, self._owner):
                self._resume_stored(orphan.name, runner, orphan.request or b"")
                return 1
            return 0
        if resumable and runner is None and young:
            return 0  # give its method a moment to be registered here
        if self._claimed(orphan) and self._finish(orphan.name, _core.aborted_status()):
            logger.warning(
                "%s: aborted, its server stopped before it finished",
                orphan.name,
                extra=_core.about(orphan.name, orphan.method),
            )
            return 1
        return 0

    def _claimed(self, orphan: Orphan) -> bool:
        """Take ``orphan`` over before ending it, so that a rescuer working from an older list
        never ends an operation another rescuer has just claimed and resumed (compare-and-set on
        the owner it was orphaned by)."""
        return self._store.claim(orphan.name, orphan.owner, self._owner)

    def _resume_stored(self, name: str, runner: MethodRunner, data: bytes) -> None:
        assert runner.request_type is not None
        try:
            request = runner.request_type.FromString(data)
        except Exception:
            logger.exception(
                "%s: the stored request cannot be read; aborting",
                name,
                extra=_core.about(name, runner.method),
            )
            self._finish(name, _core.aborted_status())
            return
        logger.warning(
            "%s: its server stopped; running it again here",
            name,
            extra=_core.about(name, runner.method),
        )
        self._resume(name, runner, request)

    def hand_over(self, runs: list[Run], resumable: Callable[[str], bool]) -> list[Run]:
        """At close: hand each run of a resumable method over to other managers (its owner
        cleared, so a peer or the next start resumes it at once); returns the runs that could
        not be handed over (to be ended ABORTED)."""
        left: list[Run] = []
        for run in runs:
            handed = False
            if resumable(run.ctx.method):
                run.stop.set()  # first: what it returns from now on is dropped
                try:
                    handed = self._store.hand_over(run.name, self._owner)
                except Exception:
                    logger.exception(
                        "%s: could not be handed over",
                        run.name,
                        extra=_core.about(run.name, run.ctx.method),
                    )
                if handed:
                    logger.info(
                        "%s: handed over for another server to resume",
                        run.name,
                        extra=_core.about(run.name, run.ctx.method),
                    )
            if not handed:
                left.append(run)
        return left

    def is_resumable(self, method: str) -> bool:
        """True when ``method`` is registered here as resumable."""
        with self._lock:
            runner = self._runners.get(method)
        return runner is not None and runner.resumable

    def check_watched(self) -> None:
        """Another process changed the shared store: wake waiters of operations now done or gone,
        and stop handlers here whose operation someone else finished (a cancel, say)."""
        waited, active = self._registry.watched()
        states = self._store.states([*waited, *active])
        for name in waited:
            if states.get(name, True):
                self._registry.notify(name)
        for name, run in active.items():
            done = states.get(name)
            if done is None or done:  # deleted or finished elsewhere: its state is the store's
                self._registry.notify(name)  # settles the run (and wakes its waiters, if any)
            if done:  # finished elsewhere (a cancel, say): its handler stops (a delete does not)
                run.stop.set()
