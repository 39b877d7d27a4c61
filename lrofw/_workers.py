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
        # Under _lock: the threads, those not running a job (waiting for one, or started and
        # not yet waiting), and the jobs put but not yet taken. A job needs a new thread when
        # more are queued than threads are idle.
        self._threads = 0
        self._idle = 0
        self._queued = 0
        self._abandoned = 0  # threads stuck in a job given up on, replaced by new ones
        self._shut = False

    @property
    def abandoned(self) -> int:
        """Threads stuck in a job that was given up on (see :meth:`abandon`)."""
        return self._abandoned

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on a worker thread; jobs wait in order when all are busy."""
        with self._lock:
            self._queued += 1
            number = self._counted_new() if self._queued > self._idle else 0
        self._jobs.put((fn, args))
        if number:
            self._start(number)

    def _counted_new(self) -> int:
        """Under ``_lock``: count one more thread (idle), if one more may start; its number, or
        0 if none may."""
        if self._threads >= self._count + self._abandoned or self._shut:
            return 0
        self._threads += 1
        self._idle += 1
        return self._threads

    def _start(self, number: int) -> None:
        """Start the thread :meth:`_counted_new` counted (uncounted if the system refuses)."""
        thread = threading.Thread(target=self._work, name=f"{self._name}-{number}", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no more threads: the job waits for one of those there are
            with self._lock:
                self._threads -= 1
                self._idle -= 1
            logger.exception("cannot start worker thread %s-%d", self._name, number)

    def abandon(self) -> int:
        """Give up on the job running in one thread (Python cannot stop a thread): a
        replacement thread takes the next jobs, so the pool keeps ``count`` threads at work.
        The abandoned job must return :data:`RETIRE` when it ends, so that its thread exits.
        Returns how many threads are abandoned now."""
        with self._lock:
            self._abandoned += 1
            abandoned = self._abandoned
            number = self._counted_new()
        if number:
            self._start(number)
        return abandoned

    def _work(self) -> None:
        while True:  # counted idle (by the thread that started it, or after its last job)
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            fn, args = job
            result = None
            try:
                result = fn(*args)
            except BaseException:  # a job's own errors are its business; the worker lives on
                logger.exception("a worker's job failed")
            with self._lock:
                if result is RETIRE:  # abandoned and replaced: this thread is one too many now
                    self._abandoned -= 1
                    self._threads -= 1
                    return
                self._idle += 1

    def shutdown(self) -> None:
        """Let every thread end once the jobs queued before now are done (it does not wait)."""
        with self._lock:
            self._shut = True
            threads = self._threads
        for _ in range(threads):
            self._jobs.put(None)
