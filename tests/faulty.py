"""A failure-injecting store: wraps any store and makes chosen calls fail, for the fault tests.

Plain code imported by the tests. ``Faulty(store)`` forwards every call; ``fail(method, exc,
times=None)`` makes the next ``times`` calls of ``method`` (all, when None) raise ``exc`` instead,
and ``heal(method)`` ends that; a fault of ``method`` applies to ``method_async`` too (the SQLite
and PostgreSQL stores' ``insert_async`` and ``finish_async``, which an asyncio server calls
instead).
``threads`` records the thread of every call, so a test can tell whether a store call ran on an
event loop's thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Faulty:
    """Forwards to ``store``, failing the calls it was told to fail."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._faults: dict[str, tuple[BaseException | Callable[[], BaseException], int | None]] = {}
        self.calls: list[tuple[str, int]] = []  # (method, thread ident)
        self.shared = store.shared
        self.blocking = getattr(store, "blocking", True)

    def fail(
        self,
        method: str,
        exc: BaseException | Callable[[], BaseException],
        times: int | None = None,
    ) -> None:
        """Make the next ``times`` calls of ``method`` raise ``exc`` (every call when None)."""
        with self._lock:
            self._faults[method] = (exc, times)

    def heal(self, method: str) -> None:
        """Let ``method`` through again."""
        with self._lock:
            self._faults.pop(method, None)

    def threads_of(self, *methods: str) -> set[int]:
        """The threads that made calls of ``methods`` (all methods when none are named)."""
        with self._lock:
            return {t for m, t in self.calls if not methods or m in methods}

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls.append((name, threading.get_ident()))
                fault = self._faults.get(name.removesuffix("_async"))
                if fault is not None:
                    exc, times = fault
                    if times is not None:
                        if times <= 1:
                            del self._faults[name.removesuffix("_async")]
                        else:
                            self._faults[name.removesuffix("_async")] = (exc, times - 1)
            if fault is not None:
                raise exc() if callable(exc) else exc
            return target(*args, **kwargs)

        return call
