"""Finishing operations: the first writer wins, waiters are woken, and a run's outcome is stored
whatever happens to the store on the way.

:class:`Finisher` is the manager's collaborator for every completion (a handler's outcome, a
cancel, a timeout, an abort, ``set_result``): it is given the store, the registry whose waiters it
wakes, and the clock.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from google.protobuf import any_pb2
from google.rpc import status_pb2

from . import _core, errors
from ._access import not_found_message
from ._events import Events
from ._registry import Registry, Run
from .stores.base import Record, Store, StoreUnavailable

logger = logging.getLogger("lrofw.manager")

#: A store's optional ``finish_async(name, now, *, response, error, owner)``: ``finish`` for a
#: coroutine, without blocking its event loop.
FinishAsync = Callable[..., Awaitable[Record | None]]

#: Pauses (seconds) between attempts to store a run's outcome: doubling, up to the last.
RETRY_FIRST, RETRY_MAX = 0.05, 5.0


class Finisher:
    """Finishes operations on ``store`` and wakes their waiters in ``registry``.

    Args:
        store: the store.
        registry: whose waiters are woken when an operation finishes.
        clock: wall-clock time, for finish times.
        owner: the manager's owner id: a run's outcome is stored only while the manager still
            owns its operation (fencing; see ``stores/base.py``).
        events: told of each operation finished here, and of the store's errors on the way.

    Example:
        >>> finisher.finish(name, _core.pack(response), None, quiet=False)
        True
    """

    def __init__(
        self,
        store: Store,
        registry: Registry,
        clock: Callable[[], float],
        owner: str | None = None,
        events: Events | None = None,
    ) -> None:
        self._store = store
        self._events = Events() if events is None else events
        self._registry = registry
        self._clock = clock
        self._owner = owner
        self._finish_async: FinishAsync | None = getattr(store, "finish_async", None)

    def finish(
        self,
        name: str,
        response: any_pb2.Any | None,
        error: status_pb2.Status | None,
        *,
        quiet: bool,
        owner: str | None = None,
    ) -> bool:
        """Finish ``name`` (first writer wins; with ``owner``, only while it owns ``name``). A
        refused completion is logged; when not ``quiet`` a missing op raises NotFound and a done
        one logs a warning."""
        record = self._store.finish(
            name, self._clock(), response=response, error=error, owner=owner
        )
        if record is not None:
            self._finished(name, record)
            return True
        current = self._store.get(name)
        if current is None and not quiet:
            raise errors.NotFound(not_found_message(name))
        level = logging.DEBUG if quiet else logging.WARNING
        if current is None:
            state = "it is gone"
        elif current.operation.done:
            state = f"it already ended with code {_core.error_code(current.operation)}"
        else:
            # Fenced: this manager lost its claim (cut off from the store past its lease, say).
            state, level = "another server took it over", logging.WARNING
        logger.log(level, "%s: completion refused, %s", name, state, extra=_core.about(name))
        return False

    def _finished(self, name: str, record: Record) -> None:
        self._events.finished(record)
        self._registry.notify(name, record.operation, principal=record.principal)

    @property
    def can_conclude_now(self) -> bool:
        """Whether the store can store an outcome from an event loop without blocking it
        (it has ``finish_async``): :meth:`conclude_now` can then succeed."""
        return self._finish_async is not None

    async def conclude_now(self, run: Run, outcome: _core.Outcome) -> bool:
        """One attempt to store a run's outcome from the event loop, through the store's
        ``finish_async``; False when it was not stored (no such method, the store failed, or
        the completion was refused): :meth:`conclude` then stores it, or says why not.

        Example:
            >>> if not await finisher.conclude_now(run, outcome):
            ...     await asyncio.to_thread(finisher.conclude, run, outcome)
        """
        if self._finish_async is None:
            return False
        name = run.name
        try:
            record = await self._finish_async(
                name,
                self._clock(),
                response=outcome.response,
                error=outcome.error,
                owner=self._owner,  # fenced, as conclude's
            )
        except Exception:  # conclude meets it again, and reports and retries it
            return False
        if record is None:
            return False
        self._finished(name, record)
        return True

    def end_with(self, name: str, status: status_pb2.Status) -> bool:
        """Finish ``name`` with an error status if it is not done (quietly); True if it did."""
        return self.finish(name, None, status, quiet=True)

    def conclude(self, run: Run, outcome: _core.Outcome) -> None:
        """Store a run's outcome. If it cannot be stored, INTERNAL with a safe message instead;
        while the store is unavailable, retry with backoff until stored, until the operation is
        ended by someone else, or until the manager has closed (the next start resolves it)."""
        name = run.name
        about = _core.about(name, run.ctx.method)
        pause = RETRY_FIRST
        warned = False
        while True:
            try:
                # Fenced: a run's outcome is dropped once another manager took its operation.
                self.finish(name, outcome.response, outcome.error, quiet=True, owner=self._owner)
                return
            except StoreUnavailable as exc:
                self._events.failed(exc)
                if not warned:
                    warned = True
                    logger.warning(
                        "%s: the outcome cannot be stored yet (%s); retrying",
                        name,
                        exc,
                        extra=about,
                    )
            except Exception as exc:
                self._events.failed(exc)
                fallback = _core.internal_outcome(name, "its outcome could not be stored")
                if outcome.error == fallback.error:
                    logger.exception(
                        "%s: not even INTERNAL could be stored; retrying", name, extra=about
                    )
                else:
                    logger.exception("%s: its outcome could not be stored", name, extra=about)
                    outcome = fallback
                    continue
            # Stopped meanwhile (cancelled, say): its op is done already. Closed: left for the
            # next start to resolve (the manager's lease is released as it closes).
            if run.stop.wait(pause) or self._registry.closed:
                if self._registry.closed:
                    logger.error(
                        "%s: the outcome was never stored; left to recovery", name, extra=about
                    )
                return
            pause = min(pause * 2, RETRY_MAX)
