"""Manager: the operation state machine over a Store, the executor, waiters, expiry and close."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import contextvars
import datetime
import functools
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2

from . import _check, _core, errors, listing
from ._access import Caller, may_see, not_found_message
from ._background import Background, Chores
from ._events import Events
from ._finishing import Finisher
from ._offload import Offload
from ._ownership import Ownership
from ._registry import Registry, Run
from ._runs import MethodRunner, Runs
from .context import Metadata
from .stores import open_store
from .stores.base import (
    DuplicateRequest,
    NewOperation,
    Record,
    Store,
    StoreError,
    normalize_method,
)
from .stores.memory import MemoryStore

__all__ = ["DEFAULT_TTL", "MAX_REQUEST_ID_LENGTH", "Manager", "MethodRunner"]

logger = logging.getLogger(__name__)

Operation = _core.Operation

DEFAULT_TTL = datetime.timedelta(days=30)

T = TypeVar("T")

#: How many expired operations one expiry pass removes before it lets other work in.
_EXPIRY_BATCH = 1000

#: The longest AIP-155 request id accepted (request ids are meant to be UUIDs).
MAX_REQUEST_ID_LENGTH = 128

#: A ListOperations page stops before this many bytes of operations (clients take 4 MB).
MAX_LIST_BYTES = 3_500_000


#: A store's optional ``insert_async(operation, now, new)``: ``insert`` for a coroutine, without
#: blocking its event loop.
InsertAsync = Callable[[Operation, float, NewOperation], Awaitable[Record]]

#: What a store must have for a manager to use it (``blocking`` is optional).
_STORE_NEEDS = ("insert", "get", "finish", "delete", "list", "expire", "close", "shared")


def _store(store: object) -> Store:
    """The store a manager's ``store`` argument names: a Store as it is, a URL opened (by
    :func:`lrofw.stores.open_store`, the one place URLs are parsed), None a new MemoryStore."""
    if store is None:
        return MemoryStore()
    if isinstance(store, str):
        return open_store(store)
    missing = [what for what in _STORE_NEEDS if not hasattr(store, what)]
    if not missing:
        return store  # type: ignore[return-value]  # the Store protocol, checked by hand
    raise TypeError(
        "store must be an lrofw.stores.Store or a store URL such as 'sqlite:ops.db' or "
        f"'memory:', got {_check.shown(store)} (it has no {', '.join(missing)})"
    )


def _release(gate: threading.Lock) -> None:
    with contextlib.suppress(RuntimeError):  # released already: woken twice
        gate.release()


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Manager:
    """Runs long-running operations and answers questions about them.

    One manager serves one set of operations (one store); give it to
    :func:`lrofw.add_servicer_to_server` and it backs both your decorated methods and the
    ``google.longrunning.Operations`` service. It can also be driven by hand, like the Go original:
    ``new_operation``, then ``set_metadata`` / ``set_result`` / ``set_error`` from your own code.

    On a durable store (SQLite) every unfinished operation is owned by the manager running it, which
    renews a lease on the store. When a manager starts, and every ``lease`` seconds, operations
    whose owner's lease has lapsed (its process died) are resolved: ABORTED, or run again for
    methods declared ``resumable``. Operations changed by another process (cancelled, finished,
    deleted, handed over) wake waiters, stop handlers and are resumed here within
    ``poll_interval``.

    An operation always ends: whatever a handler returns or raises, the manager stores its
    outcome, or INTERNAL with a safe message when that outcome cannot be stored, and retries with
    backoff while the store is unavailable, until it is stored or the manager closes (then the
    next manager to start on the store resolves it at once).

    Args:
        store: where operations live: a :class:`lrofw.stores.Store`, or a store URL
            (``"sqlite:ops.db"``, ``"memory:"``; see :func:`lrofw.stores.open_store`); a new
            in-memory store by default. A store the manager opens (from a URL, or the default)
            is closed by :meth:`close`; a Store passed in stays open, for its owner to close.
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
        max_abandoned: handler threads that ignored their timeout and still run, past which new
            operations are refused with RESOURCE_EXHAUSTED (``max_workers`` by default).
        max_attempts: runs of a ``resumable`` operation that may lose their server (a crash, a
            lapsed lease) before it is ended ABORTED instead of run again.
        max_list_scan: operations one ListOperations call examines at most; a page may come back
            short with a ``next_page_token`` (AIP-158).
        max_metadata_bytes: the largest metadata ``op.report()`` accepts, serialized.
        max_response_bytes: the largest response a handler may return, serialized.

    Raises:
        TypeError: an argument of the wrong type (the message names it and what it got).
        ValueError: an argument out of range, or a store URL that names no supported store.
        lrofw.stores.StoreOpenError: the store a URL names cannot be opened.

    Example:
        >>> manager = lrofw.Manager(store="sqlite:ops.db", max_workers=4)
        >>> op = manager.new_operation()
        >>> manager.set_result(op.name, MyResponse())
        True
        >>> manager.get(op.name).done
        True
        >>> manager.close()
    """

    def __init__(
        self,
        store: Store | str | None = None,
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
        max_abandoned: int | None = None,
        max_attempts: int = 3,
        max_list_scan: int = 10_000,
        max_metadata_bytes: int = _core.MAX_METADATA_BYTES,
        max_response_bytes: int = _core.MAX_RESPONSE_BYTES,
    ) -> None:
        max_workers = _check.count("max_workers", max_workers, 1)
        max_queued = _check.count("max_queued", max_queued, 0)
        name_prefix = _check.text("name_prefix", name_prefix)
        if not name_prefix or name_prefix.startswith("/") or name_prefix.endswith("/"):
            raise ValueError(
                f"name_prefix must be a collection like 'operations', not {name_prefix!r}"
            )
        max_attempts = _check.count("max_attempts", max_attempts, 1)
        self.max_list_scan = _check.count("max_list_scan", max_list_scan, 1)
        self.max_metadata_bytes = _check.count("max_metadata_bytes", max_metadata_bytes, 1)
        self.max_response_bytes = _check.count("max_response_bytes", max_response_bytes, 1)
        if max_abandoned is not None:
            max_abandoned = _check.count("max_abandoned", max_abandoned, 0)
        self.max_wait = _check.positive_seconds("max_wait", max_wait)
        self.ttl = _check.positive_seconds("ttl", ttl, timedelta_ok=True)
        self.lease = _check.positive_seconds("lease", lease)
        expiry_interval = _check.positive_seconds("expiry_interval", expiry_interval)
        poll_interval = _check.positive_seconds("poll_interval", poll_interval)
        clock = _check.function("clock", clock, "() -> seconds since the epoch")
        if page_token_key is not None:
            if not isinstance(page_token_key, (bytes, bytearray)):
                # Only the type: the value is a secret.
                raise TypeError(
                    f"page_token_key must be bytes, got {type(page_token_key).__name__}"
                )
            if len(page_token_key) < 16:
                raise ValueError(
                    f"page_token_key must be at least 16 bytes long, got {len(page_token_key)}"
                )
        #: The store was opened here (from a URL, or the default one): closed by :meth:`close`.
        self._owns_store = store is None or isinstance(store, str)
        self.store: Store = _store(store)
        with contextlib.ExitStack() as undo:  # a store opened here is closed if starting fails
            if self._owns_store:
                undo.callback(self.store.close)
            self.name_prefix = name_prefix
            #: This manager's id as the owner of the operations it runs.
            self.owner = uuid.uuid4().hex
            self._clock = clock
            key = self.store.token_key() if page_token_key is None else page_token_key
            self._tokens = listing.PageTokens(key)
            # Store calls block (file or network I/O) unless the store says they do not.
            self._offload = Offload(blocking=bool(getattr(self.store, "blocking", True)))
            # A blocking store may also write from an event loop without blocking it (the
            # SQLite and PostgreSQL stores' insert_async and finish_async): an asyncio server's
            # creates and finishes then take no thread of the manager's.
            insert_async = getattr(self.store, "insert_async", None)
            self._insert_async: InsertAsync | None = (
                insert_async if self._offload.blocking else None
            )
            #: What runs and waits here; shared with the runner and ownership.
            self.registry = Registry(max_workers + max_queued, max_workers)
            #: Told of what happens to operations (:mod:`lrofw.metrics` observes it).
            self.events = Events()
            #: Set by a second close(): the first one's notice ends at once.
            self._notice_cut = threading.Event()
            self._finisher = Finisher(self.store, self.registry, clock, self.owner, self.events)
            shared = self.store.shared
            self._ownership = Ownership(
                self.store,
                self.registry,
                owner=self.owner,
                lease=self.lease,
                clock=clock,
                max_attempts=max_attempts,
                finish=self._finisher.end_with,
                resume=self._resume,
                can_run=lambda runner: not runner.is_async or self._runs.loop is not None,
            )
            self._background = Background(
                Chores(
                    expire=self.expire,
                    renew=self._ownership.renew_lease if shared else None,
                    recover=self.recover if shared else None,
                    version=self.store.version if shared else None,
                    watching=self.registry.watching,
                    check_watched=self._ownership.check_watched,
                    changed=self.registry.forget_recent,
                ),
                expiry_interval=expiry_interval,
                lease=self.lease,
                poll=poll_interval,
            )
            self._runs = Runs(
                self.registry,
                conclude=self._conclude,
                expire=self._finisher.end_with,
                schedule=self._background.schedule,
                hand_off=self._offload.submit,
                conclude_now=(
                    self._conclude_now
                    if self._offload.blocking and self._finisher.can_conclude_now
                    else None
                ),
                max_workers=max_workers,
                max_abandoned=max_workers if max_abandoned is None else max_abandoned,
                max_response_bytes=self.max_response_bytes,
            )
            if shared:
                self._ownership.renew_lease()
                self.recover()
            on_change = getattr(self.store, "on_change", None)
            if shared and callable(on_change):  # a store told of changes: look at once
                on_change(self._background.poke)
            self._background.start()
            undo.pop_all()

    # --- creating and running -----------------------------------------------------------------

    def _insert(self, op: Operation, new: NewOperation) -> Operation:
        try:
            record = self.store.insert(op, self._clock(), new)
        except StoreError as exc:
            self.events.failed(exc)
            raise
        return self._inserted(new, record)

    def _inserted(self, new: NewOperation, record: Record) -> Operation:
        self.events.started(new.method)
        return record.operation

    def new_operation(self, method: str = "", metadata: Message | None = None) -> Operation:
        """Create an unfinished operation that your own code will finish (this manager owns it:
        if its process dies first, a manager that starts later on the same store aborts it).

        Example:
            >>> op = manager.new_operation(metadata=MyProgress(percent=0))
            >>> manager.set_result(op.name, MyResponse())
            True
        """
        self.registry.check_open()
        op = Operation(name=f"{self.name_prefix}/{_core.random_id()}")
        if metadata is not None:
            op.metadata.CopyFrom(self._packed_metadata(metadata))
        return self._insert(op, NewOperation(method, self.owner))

    def register(self, runner: MethodRunner) -> None:
        """Make a method known, so that its orphaned operations can be resumed here. Done by
        :func:`lrofw.add_servicer_to_server`."""
        self._ownership.register(runner)
        if runner.is_async:
            with contextlib.suppress(errors.FailedPrecondition):  # else at its first call
                self._runs.adopt_loop()
        if runner.resumable and self.store.shared and not self.registry.closing:
            self.recover()

    def recover(self) -> int:
        """Resolve operations whose owner stopped (its lease lapsed, or it handed them over as
        it closed): ABORTED, or run again here when their method is resumable and registered
        with this manager. Runs at start, every ``lease`` seconds and whenever another process
        changed a shared store. Returns how many it resolved.

        Example:
            >>> manager.recover()
            3
        """
        rescued = self._ownership.recover()
        self.events.rescued(rescued)
        return rescued

    def _new_for(
        self, runner: MethodRunner, request: Message, principal: str | None = None
    ) -> NewOperation:
        key = digest = None
        request_id = runner.request_id(request) if runner.request_id is not None else None
        if request_id:
            if len(request_id) > MAX_REQUEST_ID_LENGTH:
                raise errors.InvalidArgument(
                    f"request_id is {len(request_id)} characters long; at most "
                    f"{MAX_REQUEST_ID_LENGTH} are allowed (use a UUID)"
                )
            key = f"{runner.method}\n{request_id}"
            if principal is not None:
                # Scoped per principal, so one caller's id neither reaches nor names another's
                # operation. A digest keeps the key free of newlines (``_repeat`` reads the id
                # after the first one) and of any principal's own text.
                scope = hashlib.sha256(principal.encode("utf-8", "surrogatepass")).hexdigest()
                key = f"{scope}:{key}"
            digest = hashlib.sha256(request.SerializeToString(deterministic=True)).digest()
        stored = request.SerializeToString() if runner.resumable else None
        return NewOperation(
            normalize_method(runner.method), self.owner, stored, key, digest, principal=principal
        )

    @staticmethod
    def _repeat(dup: DuplicateRequest, new: NewOperation) -> Operation:
        if dup.request_hash == new.request_hash:
            return dup.record.operation  # the same request again: the same operation
        request_id = (new.request_key or "").split("\n", 1)[-1]
        raise errors.AlreadyExists(
            f"request_id {request_id!r} was already used for a different request "
            f"(operation {dup.record.operation.name}); use a new request_id for a new request"
        )

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
            errors.ResourceExhausted: ``max_workers + max_queued`` operations are already
                active, or ``max_abandoned`` handler threads ignored their timeout.
            errors.AlreadyExists: the request id was used before with a different request.
            errors.InvalidArgument: the request id is longer than 128 characters.
        """
        new = self._launching(runner, request, principal)
        try:
            op = self._insert(self._fresh(), new)
        except DuplicateRequest as dup:
            return self._repeat(dup, new)
        finally:
            self.registry.unreserve()
        self._start(runner, request, op, invocation_metadata, peer, principal)
        return op

    def _launching(
        self, runner: MethodRunner, request: Message, principal: str | None
    ) -> NewOperation:
        """What :meth:`launch` stores; a place reserved for it (``registry.unreserve`` after
        the insert)."""
        if runner.is_async:
            self._runs.adopt_loop()
        new = self._new_for(runner, request, principal)
        self.registry.reserve(self._runs.refusal)
        return new

    def _fresh(self) -> Operation:
        return Operation(name=f"{self.name_prefix}/{_core.random_id()}")

    def _start(
        self,
        runner: MethodRunner,
        request: Message,
        op: Operation,
        invocation_metadata: Metadata,
        peer: str,
        principal: str | None,
    ) -> None:
        """Start the run of ``op`` just created (in a copy of the caller's contextvars)."""
        run = self._runs.prepare(runner, op.name, self._reporter(runner), invocation_metadata, peer)
        run.principal, run.principal_known = principal, True
        if not self._runs.start(run, runner, request, contextvars.copy_context()):
            # Closed between the insert and now: it never runs.
            self._end_runs([run])

    async def launch_async(
        self,
        runner: MethodRunner,
        request: Message,
        *,
        invocation_metadata: Metadata = (),
        peer: str = "",
        principal: str | None = None,
    ) -> Operation:
        """:meth:`launch` for a coroutine on an event loop: the store is written from a thread
        of the manager's (see :meth:`run_blocking`), never from the loop.

        Example:
            >>> op = await manager.launch_async(runner, request)
        """
        if runner.is_async:
            self._runs.adopt_loop()  # this loop: the one its handler's task will run on
        if self._insert_async is not None:
            # Shielded: a create whose caller went away meanwhile still starts what it stored.
            return await asyncio.shield(
                self._launch_now(runner, request, invocation_metadata, peer, principal)
            )
        # In a copy of this coroutine's contextvars (a trace's span, say): the thread that
        # runs launch carries them into the handler's run, as a sync server's RPC thread does.
        launch = functools.partial(
            contextvars.copy_context().run,
            self.launch,
            runner,
            request,
            invocation_metadata=invocation_metadata,
            peer=peer,
            principal=principal,
        )
        return await self.run_blocking(launch)

    async def _launch_now(
        self,
        runner: MethodRunner,
        request: Message,
        invocation_metadata: Metadata,
        peer: str,
        principal: str | None,
    ) -> Operation:
        """:meth:`launch` on the event loop, for a store that inserts without blocking it."""
        assert self._insert_async is not None
        new = self._launching(runner, request, principal)
        try:
            op = self._inserted(new, await self._insert_async(self._fresh(), self._clock(), new))
        except DuplicateRequest as dup:
            return self._repeat(dup, new)
        except StoreError as exc:
            self.events.failed(exc)
            raise
        finally:
            self.registry.unreserve()
        self._start(runner, request, op, invocation_metadata, peer, principal)
        return op

    def _resume(self, name: str, runner: MethodRunner, request: Message) -> None:
        run = self._runs.prepare(runner, name, self._reporter(runner))
        if not self._runs.start(run, runner, request, contextvars.Context()):
            self._end_runs([run])

    # --- changing operations ------------------------------------------------------------------

    def _packed_metadata(self, metadata: Message) -> any_pb2.Any:
        return _core.packed_metadata(metadata, self.max_metadata_bytes)

    def set_metadata(self, name: str, metadata: Message) -> bool:
        """Replace an unfinished operation's metadata; False if it is done.

        Raises:
            errors.NotFound: no such operation.
            errors.InvalidArgument: the metadata is over ``max_metadata_bytes``.

        Example:
            >>> manager.set_metadata(op.name, MyProgress(percent=50))
            True
        """
        _core.check_name(name, self.name_prefix)
        if self.store.set_metadata(name, self._packed_metadata(metadata)):
            return True
        if self.store.get(name) is None:
            raise errors.NotFound(not_found_message(name))
        return False

    def _reporter(self, runner: MethodRunner) -> Callable[[str, Message], bool]:
        """What a run's ``op.report`` does: stored at once, or (an async handler on a blocking
        store) handed to a thread so the event loop never waits for the store."""
        return self._report_soon if runner.is_async and self._offload.blocking else self._report

    def _report(self, name: str, metadata: Message) -> bool:
        packed = self._packed_metadata(metadata)  # too large: the handler's own error
        try:
            return self.store.set_metadata(name, packed, owner=self.owner)  # fenced
        except StoreError as exc:
            self.events.failed(exc)
            logger.warning(
                "%s: a progress report was dropped: %s", name, exc, extra=_core.about(name)
            )
            return False

    def _conclude(self, run: Run, outcome: _core.Outcome) -> None:
        """Store a run's outcome (from a thread), after its last progress reports: an async
        handler's go to the store from threads (_report_soon), and a report stored after the
        outcome would be refused."""
        self._offload.flush(run.name)
        self._finisher.conclude(run, outcome)

    async def _conclude_now(self, run: Run, outcome: _core.Outcome) -> bool:
        """:meth:`_conclude` from the event loop (see Finisher.conclude_now)."""
        if self._offload.busy(run.name):
            await self._offload.run(self._offload.flush, run.name)
        return await self._finisher.conclude_now(run, outcome)

    def _report_soon(self, name: str, metadata: Message) -> bool:
        packed = self._packed_metadata(metadata)  # too large: the handler's own error, raised here
        self._offload.latest(name, functools.partial(self._report, name), packed)
        return True

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
        return self._finisher.finish(name, _core.pack(response), None, quiet=False)

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
        return self._finisher.finish(name, None, status, quiet=False)

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
        self.events.finished(record)
        self._stop_handler(name, grpc.StatusCode.CANCELLED)
        self.registry.notify(name, record.operation, principal=record.principal)
        return record.operation

    def delete(self, name: str, *, caller: Caller | None = None) -> None:
        """Forget an operation and wake its waiters. Running work goes on (its outcome is
        dropped); a queued run is dropped and never starts.

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
        self.registry.dequeue(name)  # queued: it never starts
        self.registry.notify(name)

    def _stop_handler(self, name: str, reason: grpc.StatusCode) -> None:
        run = self.registry.dequeue(name) or self.registry.get(name)  # queued: slot freed now
        if run is not None:
            run.stop.set(reason)

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
        manager's ``name_prefix``. One call examines at most ``max_list_scan`` operations and
        returns less than 3.5 MB, so a page may be short (even empty) with a token to go on.
        ``caller`` (None: a trusted caller) lists only what it may see; with an ``authorize``
        hook the page is filtered after it is read, so it may hold fewer than ``page_size``
        operations too. A page token is bound to the caller's principal as to the filter.

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
            node, canonical = listing.parsed(filter)
            binding = f"{self.name_prefix}\x00{canonical}"
            if caller is not None:
                binding += f"\x00{caller.principal}"
            before = self._tokens.decode(page_token, binding) if page_token else None
        except ValueError as exc:  # FilterError and PageTokenError are ValueErrors
            raise errors.InvalidArgument(str(exc)) from exc
        bounds: dict[str, Any] = {"max_scan": self.max_list_scan, "max_bytes": MAX_LIST_BYTES}
        if caller is None:
            records, cursor = self.store.list(node, before, size, **bounds)
        elif caller.authorize is None:  # only its own: the store selects them
            records, cursor = self.store.list(
                node, before, size, principal=caller.principal, **bounds
            )
        else:  # a policy only Python can apply: read a page, keep what it allows
            records, cursor = self.store.list(node, before, size, **bounds)
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
        return self.registry.subscribe(name, callback)

    def _over(self, op: Operation, timeout: float | None) -> bool:
        """A wait on ``op`` is over before it began: done, zero timeout, or closing (a closing
        server answers waits with the current state at once: the client asks another)."""
        return op.done or (timeout is not None and timeout <= 0) or self.registry.closing

    def _subscribe_wait(
        self, name: str, wake: Callable[[], None], timeout: float | None, caller: Caller | None
    ) -> tuple[Callable[[], None], bool, Operation | None]:
        """Subscribe ``wake`` to ``name`` for a wait; and what is known without reading the
        store: ``(unsubscribe, running, known)``. ``running``: it runs (or is queued) here
        unsettled, so a wait that blocks (not a zero timeout) may block at once; whatever
        settles it wakes the waiter, which then reads its state (see
        ``Registry.subscribe_running``). ``known``: its state, if it finished here moments ago
        (see ``Registry.recent``). Neither: read it. Both only for a ``caller`` who may see it.
        """
        unsubscribe, run = self.registry.subscribe_running(name, wake)
        if run is not None:
            running = (
                run.principal_known
                and may_see(caller, run.principal)
                and (timeout is None or timeout > 0)
            )
            return unsubscribe, running, None
        recent = self.registry.recent(name)
        if recent is not None and may_see(caller, recent[1]):
            return unsubscribe, False, recent[0]
        return unsubscribe, False, None

    @contextlib.contextmanager
    def _waiting(
        self, name: str, wake: Callable[[], None], timeout: float | None, caller: Caller | None
    ) -> Iterator[Operation | None]:
        """Subscribe, then read (unless this process knows): yields the op if the wait is
        already over (done, zero timeout, closed manager), else None; unsubscribes on the way
        out."""
        unsubscribe, running, known = self._subscribe_wait(name, wake, timeout, caller)
        try:
            if running:
                yield None
                return
            op = self.get(name, caller=caller) if known is None else known
            yield op if self._over(op, timeout) else None
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
        """Block until the operation is done or ``timeout`` seconds pass, then return its latest
        state: on timeout it returns the operation not done (check ``.done``), as WaitOperation
        answers; it never raises OperationTimeout. ``timeout``: None (or ``math.inf``) no limit,
        0 read once; negative or NaN is a ValueError, a non-number a TypeError (the rule every
        wait shares: docs/clients.md#timeouts).

        ``wake``, if given, is the event the wait blocks on: setting it from elsewhere ends the
        wait early (the Operations servicer sets it when the client cancels the call). Once
        closing began (see :meth:`close`) a wait returns the current state at once.
        ``caller`` (None: trusted) waits only for an operation it may see, as :meth:`get`.

        Raises:
            errors.NotFound: there is no such operation (or ``caller`` may not see it), or it
                was deleted while waiting.
            TypeError, ValueError: ``timeout`` is not None or a number of seconds >= 0.

        Example:
            >>> manager.wait(op.name, timeout=5.0).done
            True
        """
        timeout = _check.timeout(timeout)
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
                op = self.registry.finished(name)  # woken by its finish: no second read
        return op or self.get(name, caller=caller)

    async def wait_async(
        self, name: str, timeout: float | None = None, *, caller: Caller | None = None
    ) -> Operation:
        """:meth:`wait` for asyncio: awaits without holding a thread, and reads a blocking store
        from a thread, never from the event loop. The same ``timeout`` rule and result.

        Example:
            >>> (await manager.wait_async(op.name, timeout=5.0)).done
            True
        """
        timeout = _check.timeout(timeout)
        # A bare future and a timer: thousands of these wait at once, so each costs what it
        # must (no Event, no extra Task as asyncio.wait_for would start).
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            _core.call_on_loop(loop, _settle, woken, direct=True)

        unsubscribe, running, known = self._subscribe_wait(name, wake, timeout, caller)
        try:
            if not running:
                op = (
                    await self.run_blocking(self._get_for, name, caller) if known is None else known
                )
                if self._over(op, timeout):
                    return op
            timer = None if timeout is None else loop.call_later(timeout, _settle, woken)
            try:
                await woken
            finally:
                if timer is not None:
                    timer.cancel()
            done = self.registry.finished(name)  # woken by its finish: no second read
        finally:
            unsubscribe()
        if done is not None:
            return done
        return await self.run_blocking(self._get_for, name, caller)

    def _get_for(self, name: str, caller: Caller | None) -> Operation:
        return self.get(name, caller=caller)

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` (a call that may touch the store) for a coroutine: on a thread of
        the manager's own when the store blocks (a file, a database), so the event loop never
        waits for it; directly when it does not (the memory store).

        Example:
            >>> op = await manager.run_blocking(manager.get, name)
        """
        return await self._offload.run(fn, *args)

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
                self.registry.notify(name)
            total += len(names)
            if len(names) < _EXPIRY_BATCH:
                self.events.expired(total)
                return total

    # --- closing ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` refuses new operations (after its ``notice``)."""
        return self.registry.closing

    @property
    def draining(self) -> bool:
        """True once :meth:`close` has begun, from the start of its ``notice``.

        Example:
            >>> manager.draining
            False
        """
        return self.registry.draining

    def on_close(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` once, when :meth:`close` begins (before its ``notice``; at once
        if it has begun), from the thread that closes; returns the function that unsubscribes.
        A callback that raises is logged and closing goes on. The health service of
        ``add_servicer_to_server(..., health=True)`` turns NOT_SERVING this way.

        Example:
            >>> unsubscribe = manager.on_close(lambda: print("draining"))
            >>> manager.close(grace=1.0)
            draining
        """
        callback = _check.function("callback", callback, "() -> None")
        return self.registry.on_drain(callback)

    def close(self, grace: float | None = 10.0, *, notice: float = 0.0) -> None:
        """Drain and stop, in this order (docs/deploying.md):

        1. the :meth:`on_close` callbacks run (health turns NOT_SERVING);
        2. for ``notice`` seconds everything is served as before, while load balancers and
           clients see the health change and move to other servers;
        3. new operations are refused with UNAVAILABLE ("retry on another server"), and every
           WaitOperation, held or new, answers at once with the operation's current state;
        4. running handlers get up to ``grace`` seconds to finish (None: as long as they take);
        5. what is left (queued at once, running after the grace) ends ABORTED; on a shared
           store runs of ``resumable`` methods are handed over instead: their owner is
           cleared and another manager on the store, or the next one to start, resumes them
           at once.

        Idempotent and exception-safe: a second call cuts the first one's notice short and
        waits for it to end; a failure on
        the way (a stop callback, the store) is logged and closing goes on. A store the manager
        opened (from a URL, or the default one) is closed last; a store you passed in stays
        open, yours to close.

        Raises:
            TypeError, ValueError: ``grace`` is not None or a number of seconds >= 0, or
                ``notice`` is not a number of seconds >= 0.

        Example:
            >>> manager.close(grace=5.0, notice=1.0)
            >>> manager.close()  # again: nothing happens
        """
        if grace is not None:
            grace = _check.non_negative_seconds("grace", grace)
        notice = _check.non_negative_seconds("notice", notice)
        if not self.registry.begin_drain():
            self._notice_cut.set()
            self.registry.wait_closed()
            return
        try:
            if notice:
                self._notice_cut.wait(notice)  # serving as before, while clients move away
            _, queued = self.registry.begin_close()
            self._end_runs(queued)
            self._end_runs(self.registry.drain(grace))
        finally:
            for what, step in (
                ("stopping the workers", self._runs.shutdown),
                ("waking the waiters", self.registry.finish_close),
                ("stopping the background threads", self._background.stop),
                ("releasing the lease", self._release),
                ("stopping the store I/O threads", self._offload.shutdown),
                ("closing the store", self._close_store),
            ):
                try:
                    step()
                except Exception:
                    logger.exception("closing the manager: %s failed; going on", what)

    def _end_runs(self, runs: builtins.list[Run]) -> None:
        """End runs the manager stops: hand resumable ones over (shared store), abort the rest."""
        for run in runs:
            run.request = None
        if self.store.shared:
            runs = self._ownership.hand_over(runs, self._ownership.is_resumable)
        for run in runs:
            try:
                self._finisher.end_with(run.name, _core.aborted_status())
            except Exception:
                logger.exception(
                    "%s: could not be aborted; left to recovery",
                    run.name,
                    extra=_core.about(run.name, run.ctx.method),
                )
            run.stop.set(grpc.StatusCode.ABORTED)

    def _release(self) -> None:
        if self.store.shared:
            self.store.release(self.owner)

    def _close_store(self) -> None:
        if self._owns_store:
            self.store.close()

    async def aclose(self, grace: float | None = 10.0, *, notice: float = 0.0) -> None:
        """:meth:`close` for asyncio: the event loop keeps running (and async handlers keep
        finishing) while the manager waits for them.

        Example:
            >>> await manager.aclose(grace=5.0, notice=1.0)
        """
        if grace is not None:
            grace = _check.non_negative_seconds("grace", grace)
        notice = _check.non_negative_seconds("notice", notice)
        close = functools.partial(self.close, grace, notice=notice)
        await asyncio.get_running_loop().run_in_executor(None, close)

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
