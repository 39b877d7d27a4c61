"""Manager: the operation state machine over a Store, the executor, waiters, expiry and close."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import contextvars
import datetime
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2

from . import _core, errors, listing
from ._access import Caller, may_see, not_found_message
from ._background import Background
from ._ownership import Ownership
from ._runs import MethodRunner, Runs
from ._workers import Workers
from .context import Metadata, OperationContext
from .stores.base import (
    DuplicateRequest,
    NewOperation,
    Record,
    Store,
)
from .stores.memory import MemoryStore

__all__ = ["DEFAULT_TTL", "Manager", "MethodRunner"]

logger = logging.getLogger(__name__)

Operation = _core.Operation

DEFAULT_TTL = datetime.timedelta(days=30)

#: How many expired operations one expiry pass removes before it lets other work in.
_EXPIRY_BATCH = 1000


def _seconds(value: float | datetime.timedelta, what: str) -> float:
    seconds = value.total_seconds() if isinstance(value, datetime.timedelta) else float(value)
    if not seconds > 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return seconds


def _release(gate: threading.Lock) -> None:
    with contextlib.suppress(RuntimeError):  # released already: woken twice
        gate.release()


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Manager(Runs, Ownership):
    """Runs long-running operations and answers questions about them.

    One manager serves one set of operations (one store); give it to
    :func:`lrofw.add_servicer_to_server` and it backs both your decorated methods and the
    ``google.longrunning.Operations`` service. It can also be driven by hand, like the Go original:
    ``new_operation``, then ``set_metadata`` / ``set_result`` / ``set_error`` from your own code.

    On a durable store (SQLite) every unfinished operation is owned by the manager running it, which
    renews a lease on the store. When a manager starts, and every ``lease`` seconds, operations
    whose owner's lease has lapsed (its process died) are resolved: ABORTED, or run again for
    methods declared ``resumable``. Operations changed by another process (cancelled, finished,
    deleted) wake waiters and stop handlers here within ``poll_interval``.

    Args:
        store: where operations live; an in-memory store by default.
        max_workers: handlers running at once: threads of the manager's executor for ``def``
            handlers, and as many tasks on the event loop for ``async def`` handlers (each
            kind has its own bound; ``max_queued`` counts both).
        max_queued: handlers waiting for a worker; past it, creates fail with RESOURCE_EXHAUSTED.
        ttl: how long a finished operation is kept (seconds or a timedelta); 30 days by default.
        max_wait: the longest one WaitOperation call holds, in seconds.
        name_prefix: the collection operation names live in: ``{name_prefix}/{uuid4}``.
        clock: wall-clock time source, for finish times, expiry and leases (tests pass a fake one).
        expiry_interval: seconds between background expiry passes.
        page_token_key: secret that signs page tokens; by default the store's own (shared by every
            process using the same store file or database).
        lease: seconds an owner's claim on its running operations lasts without renewal.
        poll_interval: seconds between checks of a shared store for other processes' changes.

    Example:
        >>> manager = lrofw.Manager(max_workers=4)
        >>> op = manager.new_operation()
        >>> manager.set_result(op.name, MyResponse())
        True
        >>> manager.get(op.name).done
        True
        >>> manager.close()
    """

    def __init__(
        self,
        store: Store | None = None,
        *,
        max_workers: int = 8,
        max_queued: int = 1000,
        ttl: float | datetime.timedelta = DEFAULT_TTL,
        max_wait: float = 60.0,
        name_prefix: str = "operations",
        clock: Callable[[], float] = time.time,
        expiry_interval: float = 60.0,
        page_token_key: bytes | None = None,
        lease: float = 15.0,
        poll_interval: float = 0.05,
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        if max_queued < 0:
            raise ValueError(f"max_queued must not be negative, got {max_queued}")
        if not name_prefix or name_prefix.startswith("/") or name_prefix.endswith("/"):
            raise ValueError(
                f"name_prefix must be a collection like 'operations', not {name_prefix!r}"
            )
        self.store: Store = MemoryStore() if store is None else store
        self.name_prefix = name_prefix
        self.max_wait = _seconds(max_wait, "max_wait")
        self.ttl = _seconds(ttl, "ttl")
        self.lease = _seconds(lease, "lease")
        #: This manager's id as the owner of the operations it runs.
        self.owner = uuid.uuid4().hex
        self._capacity = max_workers + max_queued
        self._max_workers = max_workers
        self._loop: asyncio.AbstractEventLoop | None = None  # where async handlers run
        self._slots: asyncio.Semaphore | None = None  # async handlers running at once
        self._tasks: set[asyncio.Task[None]] = set()
        self._clock = clock
        self._started_at = clock()
        key = self.store.token_key() if page_token_key is None else page_token_key
        self._tokens = listing.PageTokens(key)
        self._executor = Workers(max_workers, "lrofw-worker")
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active: dict[str, OperationContext] = {}  # queued or running here
        self._reserved = 0  # creates between their capacity check and their insert
        self._waiters: dict[str, builtins.list[Callable[[], None]]] = {}
        self._runners: dict[str, MethodRunner] = {}
        self._closing = False
        self._closed = threading.Event()
        self._background = Background(
            self,
            expiry_interval=_seconds(expiry_interval, "expiry_interval"),
            lease=self.lease,
            poll=_seconds(poll_interval, "poll_interval"),
        )
        if self.store.shared:
            self._renew_lease()
            self.recover()
        self._background.start()

    # --- creating and running -----------------------------------------------------------------

    def _insert(self, op: Operation, new: NewOperation) -> Operation:
        return self.store.insert(op, self._clock(), new).operation

    def new_operation(self, method: str = "", metadata: Message | None = None) -> Operation:
        """Create an unfinished operation that your own code will finish (this manager owns it:
        if its process dies first, a manager that starts later on the same store aborts it).

        Example:
            >>> op = manager.new_operation(metadata=MyProgress(percent=0))
            >>> manager.set_result(op.name, MyResponse())
            True
        """
        self._check_open()
        op = Operation(name=f"{self.name_prefix}/{uuid.uuid4()}")
        if metadata is not None:
            op.metadata.CopyFrom(_core.pack(metadata))
        return self._insert(op, NewOperation(method, self.owner))

    def register(self, runner: MethodRunner) -> None:
        """Make a method known, so that its orphaned operations can be resumed here. Done by
        :func:`lrofw.add_servicer_to_server`."""
        with self._lock:
            self._runners[runner.method] = runner
        if runner.is_async:
            with contextlib.suppress(errors.FailedPrecondition):  # else at its first call
                self._adopt_loop()
        if runner.resumable and self.store.shared and not self._closing:
            self.recover()

    def launch(
        self,
        runner: MethodRunner,
        request: Message,
        *,
        invocation_metadata: Metadata = (),
        peer: str = "",
        principal: str | None = None,
    ) -> Operation:
        """Create an operation and run ``runner.call(request, op)`` for it on the executor.

        Used by ``@long_running``; the caller's contextvars are carried into the worker. With a
        request id, a repeat of the same request returns the operation it created and starts
        nothing (AIP-155). ``principal`` (the caller, when the server identifies callers) is
        stored with the operation, and request ids are scoped to it: the same id from two
        principals makes two operations.

        Raises:
            errors.Unavailable: the manager is closing, or the store cannot be written.
            errors.ResourceExhausted: ``max_workers + max_queued`` operations are already active.
            errors.AlreadyExists: the request id was used before with a different request.
        """
        if runner.is_async:
            self._adopt_loop()
        new = self._new_for(runner, request, principal)
        with self._lock:
            self._check_open()
            busy = len(self._active) + self._reserved
            if busy >= self._capacity:
                raise errors.ResourceExhausted(
                    f"the server is busy: {busy} operations are running or queued; retry later"
                )
            self._reserved += 1
        try:
            op = self._insert(Operation(name=f"{self.name_prefix}/{uuid.uuid4()}"), new)
        except DuplicateRequest as dup:
            return self._repeat(dup, new)
        finally:
            with self._lock:
                self._reserved -= 1
        ctx = self._new_context(runner, op.name, invocation_metadata, peer)
        self._start(ctx, runner, request, contextvars.copy_context())
        return op

    # --- changing operations ------------------------------------------------------------------

    def set_metadata(self, name: str, metadata: Message) -> bool:
        """Replace an unfinished operation's metadata; False if it is done.

        Raises:
            errors.NotFound: no such operation.

        Example:
            >>> manager.set_metadata(op.name, MyProgress(percent=50))
            True
        """
        _core.check_name(name, self.name_prefix)
        if self.store.set_metadata(name, _core.pack(metadata)):
            return True
        if self.store.get(name) is None:
            raise errors.NotFound(f"operation {name} not found")
        return False

    def set_result(self, name: str, response: Message) -> bool:
        """Finish an operation with ``response``. False (and a warning in the log) if it was
        already done: the first completion wins.

        Raises:
            errors.NotFound: no such operation.

        Example:
            >>> manager.set_result(op.name, MyResponse())
            True
        """
        _core.check_name(name, self.name_prefix)
        return self._finish(name, _core.pack(response), None, quiet=False)

    def set_error(self, name: str, error: errors.OperationError | status_pb2.Status) -> bool:
        """Finish an operation with an error; False (and a warning) if it was already done.

        Raises:
            errors.NotFound: no such operation.

        Example:
            >>> manager.set_error(op.name, lrofw.OperationError(grpc.StatusCode.NOT_FOUND, "no"))
            True
        """
        _core.check_name(name, self.name_prefix)
        status = error.to_status() if isinstance(error, errors.OperationError) else error
        if status.code == 0:
            raise ValueError("set_error needs a non-OK status")
        return self._finish(name, None, status, quiet=False)

    def _finish(
        self,
        name: str,
        response: any_pb2.Any | None,
        error: status_pb2.Status | None,
        *,
        quiet: bool,
    ) -> bool:
        """Finish ``name`` (first writer wins). A refused completion is logged; when not
        ``quiet`` a missing op raises NotFound and a done one logs a warning."""
        record = self.store.finish(name, self._clock(), response=response, error=error)
        if record is not None:
            self._notify(name)
            return True
        current = self.store.get(name)
        if current is None and not quiet:
            raise errors.NotFound(f"operation {name} not found")
        state = (
            "it is gone"
            if current is None
            else (f"it already ended with code {_core.error_code(current.operation)}")
        )
        level = logging.DEBUG if quiet else logging.WARNING
        logger.log(level, "%s: completion refused, %s", name, state)
        return False

    def cancel(self, name: str, *, caller: Caller | None = None) -> Operation:
        """Cancel an operation: it is done with CANCELLED at once and its handler is signalled.
        A done operation is returned unchanged.

        Raises:
            errors.NotFound: no such operation (or ``caller`` may not see it).

        Example:
            >>> manager.cancel(op.name).error.code
            1
        """
        _core.check_name(name, self.name_prefix)
        if caller is not None:
            self._visible(name, caller)  # its principal never changes: checked once is enough
        record = self.store.finish(name, self._clock(), error=_core.cancelled_status())
        if record is None:
            return self.get(name, caller=caller)
        self._stop_handler(name)
        self._notify(name)
        return record.operation

    def delete(self, name: str, *, caller: Caller | None = None) -> None:
        """Forget an operation and wake its waiters; it does not cancel running work.

        Raises:
            errors.NotFound: no such operation (or ``caller`` may not see it).

        Example:
            >>> manager.delete(op.name, caller=lrofw.Caller("alice"))
        """
        _core.check_name(name, self.name_prefix)
        if caller is not None:
            self._visible(name, caller)
        if not self.store.delete(name):
            raise errors.NotFound(not_found_message(name))
        self._notify(name)

    def _stop_handler(self, name: str) -> None:
        with self._lock:
            ctx = self._active.get(name)
            if ctx is not None and not ctx._started:
                del self._active[name]  # queued: give its slot back now
                self._idle.notify_all()
        if ctx is not None:
            ctx._stop()

    # --- reading ------------------------------------------------------------------------------

    def get(self, name: str, *, caller: Caller | None = None) -> Operation:
        """Return a copy of the operation.

        ``caller`` (None: a trusted caller that sees everything) sees only what it may (see
        :class:`lrofw.Caller`); any other operation is NOT_FOUND, exactly as a missing one.

        Raises:
            errors.InvalidArgument: the name is malformed.
            errors.NotFound: no such operation (or ``caller`` may not see it).

        Example:
            >>> manager.get(op.name, caller=lrofw.Caller("alice")).done
            False
        """
        _core.check_name(name, self.name_prefix)
        return self._visible(name, caller).operation

    def _visible(self, name: str, caller: Caller | None) -> Record:
        """The record of ``name`` if it exists and ``caller`` may see it: else the one NotFound,
        the same for both, so that a caller cannot tell another's operation from none."""
        record = self.store.get(name)
        if record is None or not may_see(caller, record.principal):
            raise errors.NotFound(not_found_message(name))
        return record

    def list(
        self,
        filter: str = "",
        page_size: int = 0,
        page_token: str = "",
        collection: str = "",
        *,
        caller: Caller | None = None,
    ) -> tuple[builtins.list[Operation], str]:
        """List operations newest first: one page and the token of the next ("" at the end).

        ``filter`` is the AIP-160 subset of :mod:`lrofw.listing`; ``collection`` may be "" or the
        manager's ``name_prefix``. ``caller`` (None: a trusted caller) lists only what it may
        see; with an ``authorize`` hook the page is filtered after it is read, so it may hold
        fewer than ``page_size`` operations (even none) and still have a next page token
        (AIP-158 allows this: go on while the token is not empty). A page token is bound to the
        caller's principal as to the filter.

        Raises:
            errors.InvalidArgument: bad collection, filter, page size or page token.

        Example:
            >>> ops, token = manager.list(filter="done = true AND error.code = 0", page_size=10)
        """
        if collection not in ("", self.name_prefix):
            raise errors.InvalidArgument(
                f"name must be empty or {self.name_prefix!r} to list operations, "
                f"got {collection[:80]!r}"
            )
        try:
            size = listing.effective_page_size(page_size)
            node = listing.parse_filter(filter)
            binding = f"{self.name_prefix}\x00{node}"
            if caller is not None:
                binding += f"\x00{caller.principal}"
            before = self._tokens.decode(page_token, binding) if page_token else None
        except ValueError as exc:  # FilterError and PageTokenError are ValueErrors
            raise errors.InvalidArgument(str(exc)) from exc
        if caller is None:
            records, cursor = self.store.list(node, before, size)
        elif caller.authorize is None:  # only its own: the store selects them
            records, cursor = self.store.list(node, before, size, principal=caller.principal)
        else:  # a policy only Python can apply: read a page, keep what it allows
            records, cursor = self.store.list(node, before, size)
            records = [r for r in records if may_see(caller, r.principal)]
        token = "" if cursor is None else self._tokens.encode(cursor, binding)
        return [r.operation for r in records], token

    # --- waiting ------------------------------------------------------------------------------

    def subscribe(self, name: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from any thread) whenever ``name`` finishes or is deleted, and when
        the manager closes; returns the function that unsubscribes. Subscribe, then read: a
        change between the two is not missed.

        Example:
            >>> event = threading.Event()
            >>> unsubscribe = manager.subscribe(op.name, event.set)
        """
        with self._lock:
            self._waiters.setdefault(name, []).append(callback)
            closed = self._closed.is_set()
        if closed:
            callback()

        def unsubscribe() -> None:
            with self._lock:
                callbacks = self._waiters.get(name)
                if callbacks is not None:
                    callbacks.remove(callback)
                    if not callbacks:
                        del self._waiters[name]

        return unsubscribe

    def _notify(self, name: str) -> None:
        with self._lock:
            callbacks = list(self._waiters.get(name, ()))
        for callback in callbacks:
            callback()

    @contextlib.contextmanager
    def _waiting(
        self, name: str, wake: Callable[[], None], timeout: float | None, caller: Caller | None
    ) -> Iterator[Operation | None]:
        """Subscribe, then read: yields the op if the wait is already over (done, zero timeout,
        closed manager), else None; unsubscribes on the way out."""
        unsubscribe = self.subscribe(name, wake)
        try:
            op = self.get(name, caller=caller)
            over = op.done or (timeout is not None and timeout <= 0) or self._closed.is_set()
            yield op if over else None
        finally:
            unsubscribe()

    def wait(
        self,
        name: str,
        timeout: float | None = None,
        *,
        wake: threading.Event | None = None,
        caller: Caller | None = None,
    ) -> Operation:
        """Block until the operation is done or ``timeout`` seconds pass (None: no limit), then
        return its latest state. Returns at once after the manager closed.

        ``wake``, if given, is the event the wait blocks on: setting it from elsewhere ends the
        wait early (the Operations servicer sets it when the client cancels the call).
        ``caller`` (None: trusted) waits only for an operation it may see, as :meth:`get`.

        Raises:
            errors.NotFound: there is no such operation (or ``caller`` may not see it), or it
                was deleted while waiting.

        Example:
            >>> manager.wait(op.name, timeout=5.0).done
            True
        """
        notify: Callable[[], object]
        block: Callable[[], object]
        if wake is not None:
            notify, block = wake.set, functools.partial(wake.wait, timeout)
        else:  # a held lock is the cheapest thing a thread can block on: released to wake
            gate = threading.Lock()
            gate.acquire()
            notify = functools.partial(_release, gate)
            block = functools.partial(gate.acquire, timeout=-1 if timeout is None else timeout)
        with self._waiting(name, notify, timeout, caller) as op:
            if op is None:
                block()
        return op or self.get(name, caller=caller)

    async def wait_async(
        self, name: str, timeout: float | None = None, *, caller: Caller | None = None
    ) -> Operation:
        """:meth:`wait` for asyncio: awaits without holding a thread.

        Example:
            >>> (await manager.wait_async(op.name, timeout=5.0)).done
            True
        """
        # A bare future and a timer: thousands of these wait at once, so each costs what it
        # must (no Event, no extra Task as asyncio.wait_for would start).
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            _core.call_on_loop(loop, _settle, woken, direct=True)

        with self._waiting(name, wake, timeout, caller) as op:
            if op is None:
                timer = None if timeout is None else loop.call_later(timeout, _settle, woken)
                try:
                    await woken
                finally:
                    if timer is not None:
                        timer.cancel()
        return op or self.get(name, caller=caller)

    def expire(self, now: float | None = None) -> int:
        """Remove finished operations older than the TTL (runs in the background every
        ``expiry_interval``; call it yourself with a fake clock in tests). Returns how many.

        Example:
            >>> manager.expire(now=time.time() + 31 * 86400)
            12
        """
        cutoff = (self._clock() if now is None else now) - self.ttl
        total = 0
        while True:
            names = self.store.expire(cutoff, _EXPIRY_BATCH)
            for name in names:
                self._notify(name)
            total += len(names)
            if len(names) < _EXPIRY_BATCH:
                return total

    # --- closing ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has started: new operations are refused."""
        return self._closing

    def _check_open(self) -> None:
        if self._closing:
            raise errors.Unavailable("the server is shutting down; retry on another server")

    def close(self, grace: float | None = 10.0) -> None:
        """Stop: refuse new operations (UNAVAILABLE), end queued ones (not started yet) with
        ABORTED at once, let running handlers finish for up to ``grace`` seconds (None: as long
        as they take), end the rest with ABORTED and signal their handlers, and wake every
        waiter. Idempotent; a store you passed in stays open.

        Example:
            >>> manager.close(grace=5.0)
            >>> manager.close()  # again: nothing happens
        """
        with self._lock:
            if self._closing:
                first = False
            else:
                self._closing = first = True
        if not first:
            self._closed.wait()
            return
        with self._lock:  # a queued handler never starts once closing began (see _begin)
            queued = [ctx for ctx in self._active.values() if not ctx._started]
            for ctx in queued:
                del self._active[ctx.name]
        self._abort(queued)
        with self._lock:
            end = None if grace is None else time.monotonic() + grace
            while self._active:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._idle.wait(left)
            left_over = list(self._active.values())
        self._abort(left_over)
        self._executor.shutdown()
        with self._lock:
            self._closed.set()
            callbacks = [cb for cbs in self._waiters.values() for cb in cbs]
        for callback in callbacks:
            callback()
        self._background.stop()
        if self.store.shared:
            try:
                self.store.release(self.owner)
            except Exception:
                logger.exception("releasing the lease failed; it lapses by itself")

    def _abort(self, runs: builtins.list[OperationContext]) -> None:
        for ctx in runs:
            self._finish(ctx.name, None, _core.aborted_status(), quiet=True)
            ctx._stop()

    async def aclose(self, grace: float | None = 10.0) -> None:
        """:meth:`close` for asyncio: the event loop keeps running (and async handlers keep
        finishing) while the manager waits for them.

        Example:
            >>> await manager.aclose(grace=5.0)
        """
        await asyncio.get_running_loop().run_in_executor(None, self.close, grace)

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
