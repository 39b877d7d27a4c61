"""The manager's worker threads: a fixed pool taking jobs from one queue.

What :class:`lrofw.Manager` needs of an executor and nothing more: ``submit(fn, *args)``,
``abandon()`` and ``shutdown()``. Unlike ``concurrent.futures.ThreadPoolExecutor`` it makes no
``Future`` per job (the manager never reads one: a run reports through the store), and a job is
one put on a C-implemented ``SimpleQueue``; threads start on demand up to the bound.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("lrofw.manager")

#: What a job returns to end the thread that ran it (a thread that was abandoned, see
#: :meth:`Workers.abandon`, and has been replaced meanwhile).
RETIRE = object()


class Workers:
    """Up to ``count`` daemon threads named ``{name}-N`` running submitted jobs in order.

    Example:
        >>> workers = Workers(8, "lrofw-worker")
        >>> workers.submit(print, "hello")
        >>> workers.shutdown()
    """

    def __init__(self, count: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[..., object], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._count = count
        self._name = name
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting for a job (read without the lock: a hint)
        self._abandoned = 0  # threads stuck in a job given up on, replaced by new ones
        self._shut = False

    @property
    def abandoned(self) -> int:
        """Threads stuck in a job that was given up on (see :meth:`abandon`)."""
        return self._abandoned

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on a worker thread; jobs wait in order when all are busy."""
        self._jobs.put((fn, args))
        if self._idle == 0 and self._threads < self._count + self._abandoned:
            self._grow()

    def _grow(self) -> None:
        with self._lock:
            if self._threads < self._count + self._abandoned and not self._shut:
                self._threads += 1
                threading.Thread(
                    target=self._work, name=f"{self._name}-{self._threads}", daemon=True
                ).start()

    def abandon(self) -> int:
        """Give up on the job running in one thread (Python cannot stop a thread): a
        replacement thread takes the next jobs, so the pool keeps ``count`` threads at work.
        The abandoned job must return :data:`RETIRE` when it ends, so that its thread exits.
        Returns how many threads are abandoned now."""
        with self._lock:
            self._abandoned += 1
            abandoned = self._abandoned
        self._grow()
        return abandoned

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            self._idle += 1
            job = jobs.get()
            self._idle -= 1
            if job is None:
                return
            fn, args = job
            try:
                result = fn(*args)
            except BaseException:  # a job's own errors are its business; the worker lives on
                logger.exception("a worker's job failed")
                continue
            if result is RETIRE:  # abandoned and replaced: this thread is one too many now
                with self._lock:
                    self._abandoned -= 1
                    self._threads -= 1
                return

    def shutdown(self) -> None:
        """Let every thread end once the jobs queued before now are done (it does not wait)."""
        with self._lock:
            self._shut = True
            threads = self._threads
        for _ in range(threads):
            self._jobs.put(None)
