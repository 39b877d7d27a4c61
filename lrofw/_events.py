"""What happens to operations, told to observers (metrics): :class:`Observer` is what an
observer implements, :class:`Events` is what the manager and its collaborators tell.

With no observer every event costs one method call over an empty tuple, so the manager's hot
path stays as it is without metrics. Gauges (running, queued, waiters) are not events: an
observer reads them when it is asked (:meth:`lrofw._registry.Registry.load`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from .stores.base import Record, StoreCorrupted, StoreError, StoreUnavailable

logger = logging.getLogger("lrofw")

__all__ = ["Events", "Observer", "store_error_kind"]


class Observer(Protocol):
    """Told of every event of one manager (a method that raises is logged and ignored).

    Example:
        >>> class Printer:
        ...     def started(self, method): print("started", method)
        ...     def finished(self, method, code, seconds): print(method, code)
        ...     def rescued(self, count): pass
        ...     def expired(self, count): pass
        ...     def store_error(self, kind): pass
        >>> remove = manager.events.add(Printer())
    """

    def started(self, method: str) -> None:
        """An operation was created (``method``: ``/pkg.Service/Method``, or ``""``)."""

    def finished(self, method: str, code: int, seconds: float) -> None:
        """An operation was finished here: its ``google.rpc.Code`` (0 for a response) and how
        long after its creation."""

    def rescued(self, count: int) -> None:
        """``count`` operations whose owner stopped were resolved here (aborted or resumed)."""

    def expired(self, count: int) -> None:
        """``count`` finished operations were removed: older than the manager's ttl."""

    def store_error(self, kind: str) -> None:
        """The store failed: ``kind`` is ``unavailable``, ``corrupted`` or ``other``."""


def store_error_kind(exc: BaseException) -> str | None:
    """``unavailable``, ``corrupted`` or ``other`` for a store's error; None for anything else.

    Example:
        >>> store_error_kind(StoreUnavailable("database is locked"))
        'unavailable'
    """
    if isinstance(exc, StoreUnavailable):
        return "unavailable"
    if isinstance(exc, StoreCorrupted):
        return "corrupted"
    if isinstance(exc, StoreError):
        return "other"
    return None


class Events:
    """The observers of one manager, and the events told to them.

    Example:
        >>> events = Events()
        >>> remove = events.add(observer)
        >>> events.started("/pkg.Service/Method")
        >>> remove()
    """

    def __init__(self) -> None:
        self._observers: tuple[Observer, ...] = ()

    def add(self, observer: Observer) -> Callable[[], None]:
        """Tell ``observer`` of every event from now on; returns the function that stops it."""
        self._observers = (*self._observers, observer)

        def remove() -> None:
            self._observers = tuple(o for o in self._observers if o is not observer)

        return remove

    def started(self, method: str) -> None:
        for observer in self._observers:
            _tell(observer.started, method)

    def finished(self, record: Record) -> None:
        """``record`` was just finished here (its stored, done state)."""
        if not self._observers:
            return
        op = record.operation
        code = op.error.code if op.HasField("error") else 0
        end = record.create_time if record.done_time is None else record.done_time
        seconds = max(0.0, end - record.create_time)
        for observer in self._observers:
            _tell(observer.finished, record.method, code, seconds)

    def rescued(self, count: int) -> None:
        if count:
            for observer in self._observers:
                _tell(observer.rescued, count)

    def expired(self, count: int) -> None:
        if count:
            for observer in self._observers:
                _tell(observer.expired, count)

    def failed(self, exc: BaseException) -> None:
        """``exc`` was raised on the way to the store: counted when it is a store's error."""
        if not self._observers:
            return
        kind = store_error_kind(exc)
        if kind is not None:
            for observer in self._observers:
                _tell(observer.store_error, kind)


def _tell(method: Callable[..., None], *args: object) -> None:
    try:
        method(*args)
    except Exception:  # an observer's bug must not fail an operation
        logger.exception("an lrofw observer failed in %s", getattr(method, "__name__", method))
