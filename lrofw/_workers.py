"""The manager's worker threads: a fixed pool taking jobs from one queue.

What :class:`lrofw.Manager` needs of an executor and nothing more: ``submit(fn, *args)``,
``abandon()`` and ``shutdown()``. Unlike ``concurrent.futures.ThreadPoolExecutor`` it makes no
``Future`` per job (the manager never reads one: a run reports through the store), and a job is
one put on a C-implemented ``SimpleQueue``; threads start on demand up to the bound.

When to start a thread: at once when no thread is idle. When one is, a job queued behind the
job that thread is about to take does not start another at once: the idle thread takes both in
turn if the first is short, so a trickle of short jobs keeps one thread busy rather than waking
each of several in turn. A job so queued may wait at most about twice ``patience`` behind a
long one: a watcher thread, awake only while such jobs wait, starts threads for them when no job
has been taken for ``patience``.
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

#: Seconds with no job taken after which jobs waiting beside an idle thread get threads of their
#: own (see :class:`Workers`).
PATIENCE = 0.005


class Workers:
    """Up to ``count`` daemon threads named ``{name}-N`` running submitted jobs in order.

    Example:
        >>> workers = Workers(8, "lrofw-worker")
        >>> workers.submit(print, "hello")
        >>> workers.shutdown()
    """

    def __init__(self, count: int, name: str, *, patience: float = PATIENCE) -> None:
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
        self._taken = 0  # jobs taken so far: the watcher's sign that jobs are moving
        self._abandoned = 0  # threads stuck in a job given up on, replaced by new ones
        self._patience = patience
        self._watching = False  # under _lock: the watcher is looking (or about to)
        self._watcher: threading.Thread | None = None
        self._watch = threading.Semaphore(0)  # released to start the watcher looking
        self._closed = threading.Event()  # set by shutdown (under _lock): no thread starts

    @property
    def abandoned(self) -> int:
        """Threads stuck in a job that was given up on (see :meth:`abandon`)."""
        return self._abandoned

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on a worker thread; jobs wait in order when all are busy."""
        with self._lock:
            self._queued += 1
            watch = False
            if self._idle == 0:
                number = self._counted_new()
            else:  # an idle thread takes it, after the jobs queued before it
                number = 0
                if self._queued > self._idle and not self._watching and self._may_grow():
                    self._watching = watch = True
        self._jobs.put((fn, args))
        if number:
            self._start(number)
        elif watch:
            self._start_watching()

    def _may_grow(self) -> bool:
        """Under ``_lock``: whether one more thread may start."""
        return self._threads < self._count + self._abandoned and not self._closed.is_set()

    def _counted_new(self) -> int:
        """Under ``_lock``: count one more thread (idle), if one more may start; its number, or
        0 if none may."""
        if not self._may_grow():
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
                self._taken += 1
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

    def _start_watching(self) -> None:
        """Wake the watcher (started the first time), which :meth:`submit` marked watching."""
        if self._watcher is None:
            self._watcher = threading.Thread(
                target=self._watch_loop, name=f"{self._name}-watch", daemon=True
            )
            try:
                self._watcher.start()
            except RuntimeError:  # no more threads: jobs wait for the threads there are
                self._watcher = None
                with self._lock:
                    self._watching = False
                logger.exception("cannot start thread %s-watch", self._name)
                return
        self._watch.release()

    def _watch_loop(self) -> None:
        """While jobs wait beside an idle thread: every ``patience``, if no job was taken since
        the last look, start a thread for each job more than there are idle threads. Stops
        looking once no job waits so, or no thread may start."""
        while True:
            self._watch.acquire()
            seen = -1
            while True:
                self._closed.wait(self._patience)
                with self._lock:
                    short = self._queued - self._idle
                    if short <= 0 or not self._may_grow():
                        self._watching = False
                        if self._closed.is_set():
                            return
                        break
                    numbers = []
                    if self._taken == seen:  # stuck: the idle threads took nothing meanwhile
                        numbers = [self._counted_new() for _ in range(short)]
                    seen = self._taken
                for number in numbers:
                    if number:
                        self._start(number)

    def shutdown(self) -> None:
        """Let every thread end once the jobs queued before now are done (it does not wait)."""
        with self._lock:
            self._closed.set()
            threads = self._threads
        for _ in range(threads):
            self._jobs.put(None)
        if self._watcher is not None:
            self._watch.release()  # to see the shutdown and end, if it was not looking
