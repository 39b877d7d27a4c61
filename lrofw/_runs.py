"""How handlers run: a worker thread's driver and the event loop's, around one set of decisions.

:class:`Runs` is the manager's collaborator for running handlers: it is given the registry of
slots, a ``conclude`` callback that stores a run's outcome, an ``expire`` callback that ends an
operation past its timeout, and a scheduler for timers. It decides nothing about operations; it
starts, drives and ends runs.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2

from . import _core, _tracing, errors
from ._registry import Registry, Run
from ._workers import RETIRE, Workers
from .context import AsyncOperationContext, Metadata, OperationContext, Reporter, StopSignal
from .stores.base import normalize_method

logger = logging.getLogger("lrofw.manager")

Operation = _core.Operation

#: Seconds a handler may go on after it was told to stop at its timeout before it is abandoned
#: (its slot given back; a thread replaced).
ABANDON_AFTER = 1.0


@dataclass(frozen=True, eq=False)
class MethodRunner:
    """How the manager runs one long-running method (built by ``@long_running`` registration).

    Attributes:
        method: the RPC's full name, ``/pkg.Service/Method``.
        call: ``call(request, op)`` runs the handler.
        response_type: what the handler must return.
        metadata_type: what ``op.report`` accepts (any message when None).
        timeout: seconds a run may take, or None.
        request_type: the request message class (needed to resume from a stored request).
        resumable: run again from the stored request when its server stopped mid-run.
        request_id: the AIP-155 request id of a request ("" or None: not idempotent).
        is_async: ``call`` returns a coroutine, run as a task on the server's event loop.
    """

    method: str
    call: Callable[[Message, OperationContext], object]
    response_type: type[Message]
    metadata_type: type[Message] | None = None
    timeout: float | None = None
    request_type: type[Message] | None = None
    resumable: bool = False
    request_id: Callable[[Message], str | None] | None = None
    is_async: bool = False


#: ``conclude(run, outcome)`` stores a run's outcome (blocking; may retry for a while).
Conclude = Callable[[Run, _core.Outcome], None]
#: ``await conclude_now(run, outcome)`` tries once to store a run's outcome from the event loop,
#: without blocking it; False: it was not stored, and ``conclude`` must.
ConcludeNow = Callable[[Run, _core.Outcome], Awaitable[bool]]
#: ``expire(name, status)`` finishes ``name`` with ``status`` if it is not done; True if it did.
Expire = Callable[[str, status_pb2.Status], bool]
#: ``schedule(delay, fn, *args)`` calls ``fn(*args)`` on a background thread after ``delay`` s.
Schedule = Callable[..., None]
#: ``hand_off(fn, *args)`` runs blocking ``fn(*args)`` off the event loop; nobody waits for it.
HandOff = Callable[..., None]


def context_for(
    runner: MethodRunner,
    name: str,
    report: Reporter,
    stop: StopSignal,
    invocation_metadata: Metadata = (),
    peer: str = "",
) -> OperationContext:
    """The ``op`` a run of ``runner`` for ``name`` gets: an :class:`AsyncOperationContext`
    (awaitable ``sleep``) for an ``async def`` handler, else an :class:`OperationContext`.

    Example:
        >>> op = context_for(runner, "operations/1", report, StopSignal("operations/1"))
    """
    kind = AsyncOperationContext if runner.is_async else OperationContext
    method = normalize_method(runner.method)
    return kind(report, stop, name, method, runner.metadata_type, invocation_metadata, peer)


def log_outcome(
    outcome: _core.Outcome, exc: BaseException | None, ctx: OperationContext | None = None
) -> None:
    """Log what an outcome asks to have logged (with ``exc``'s traceback where it says so), as
    a line about ``ctx``'s operation."""
    if outcome.log is not None:
        logger.log(
            outcome.log_level,
            outcome.log,
            exc_info=exc if outcome.log_traceback else None,
            extra=None if ctx is None else _core.about(ctx.name, ctx.method),
        )


def _stop_task(run: Run, task: asyncio.Task[None]) -> None:
    """On the event loop: stop an async run's task, unless its handler has returned. Its outcome
    may then be in flight to the store (a finish that the watcher saw committed before its
    answer arrived, say): cancelling it would only throw the connection away."""
    if not run.returned:
        task.cancel()


class Runs:
    """Starts and drives handler runs: threads for ``def`` handlers, tasks for ``async def``.

    Example:
        >>> runs = Runs(registry, conclude=store_outcome, expire=finish_if_running,
        ...             schedule=background.schedule, hand_off=io.submit, max_workers=8,
        ...             max_abandoned=8, max_response_bytes=2 << 20)
        >>> run = runs.prepare(runner, name, report)
        >>> runs.start(run, runner, request, contextvars.copy_context())
    """

    def __init__(
        self,
        registry: Registry,
        *,
        conclude: Conclude,
        expire: Expire,
        schedule: Schedule,
        hand_off: HandOff,
        conclude_now: ConcludeNow | None = None,
        max_workers: int,
        max_abandoned: int,
        max_response_bytes: int,
    ) -> None:
        self._registry = registry
        self._conclude = conclude
        self._expire = expire
        self._schedule = schedule
        self._hand_off = hand_off
        self._conclude_now = conclude_now
        self._max_workers = max_workers
        self._max_abandoned = max_abandoned
        self._max_response_bytes = max_response_bytes
        self._workers = Workers(max_workers, "lrofw-worker")
        self._loop: asyncio.AbstractEventLoop | None = None  # where async handlers run
        self._slots: asyncio.Semaphore | None = None  # async handlers running at once
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop async handlers run on, once one was adopted."""
        return self._loop

    def prepare(
        self,
        runner: MethodRunner,
        name: str,
        report: Reporter,
        invocation_metadata: Metadata = (),
        peer: str = "",
    ) -> Run:
        """A run of ``runner`` for ``name``, with the ``op`` its handler gets (awaitable
        ``sleep`` for async handlers)."""
        stop = StopSignal(name)
        return Run(context_for(runner, name, report, stop, invocation_metadata, peer), stop)

    def refusal(self) -> str | None:
        """Why a create must be refused now though slots are free, or None."""
        abandoned = self._workers.abandoned
        if abandoned >= self._max_abandoned:
            return (
                f"the server is degraded: {abandoned} handlers ignored their timeout and still "
                "hold threads; retry later or on another server"
            )
        return None

    def adopt_loop(self) -> None:
        """Async handlers run on the event loop of the server that calls them."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if self._loop is None:
                raise errors.FailedPrecondition(
                    "async handlers run on a grpc.aio server's event loop; serve this servicer "
                    "with grpc.aio.server()"
                ) from None
            return
        if self._loop is not None and self._loop is not loop:
            raise errors.FailedPrecondition(
                "this Manager already runs async handlers on another event loop; "
                "use one Manager per grpc.aio server"
            )
        self._loop = loop

    def start(
        self,
        run: Run,
        runner: MethodRunner,
        request: Message,
        context: contextvars.Context,
    ) -> bool:
        """Queue ``run`` of ``runner``; False when closing began (it never runs)."""
        run.request = request
        if not self._registry.add(run):
            run.request = None
            return False
        if runner.is_async:
            loop = self._loop
            assert loop is not None
            if _core.running_loop() is loop:  # on it: start the task now
                self._spawn(run, runner, context)
            else:
                loop.call_soon_threadsafe(self._spawn, run, runner, context)
        else:
            self._workers.submit(context.run, self._run, run, runner)
        return True

    def shutdown(self) -> None:
        """Let the worker threads end once their jobs are done."""
        self._workers.shutdown()

    def _spawn(self, run: Run, runner: MethodRunner, context: contextvars.Context) -> None:
        """On the event loop: start an async handler's run as a task (in the caller's context)."""
        assert self._loop is not None
        loop = self._loop
        driver: Coroutine[Any, Any, None] = self._run_async(run, runner)
        task = context.run(loop.create_task, driver)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

        def cancel() -> None:
            _core.call_on_loop(loop, _stop_task, run, task)

        run.stop.add(cancel)

    def _begin(self, run: Run, runner: MethodRunner) -> Message | None:
        """The request to run, or None when the run must not start (dropped, closing)."""
        request = self._registry.begin(run)
        if request is not None and runner.timeout is not None:
            self._schedule(runner.timeout, self._time_out, run, runner.timeout)
        return request

    def _run(self, run: Run, runner: MethodRunner) -> object:
        """A worker thread's driver of one sync handler."""
        request = self._begin(run, runner)
        if request is None:
            return None
        ctx = run.ctx
        span = _tracing.start(ctx)
        try:
            value: object = None
            error: BaseException | None = None
            try:
                value = runner.call(request, ctx)
            except BaseException as exc:
                error = exc
            del request
            outcome = self._outcome(runner, ctx, value, error, on_loop=False)
            span.end(outcome, run.stop.reason)
            if outcome is not None:  # None: stopped, its op is done already
                log_outcome(outcome, error, ctx)
                self._conclude(run, outcome)
        finally:
            self._registry.end(run)
        return RETIRE if run.abandoned else None

    async def _run_async(self, run: Run, runner: MethodRunner) -> None:
        """The event loop's driver of one async handler (the same decisions as :meth:`_run`)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max_workers)
        slots = self._slots
        await slots.acquire()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                slots.release()

        run.release_slot = release
        ctx = run.ctx
        handed = False  # the outcome went to a thread, which ends the run once it is stored
        try:
            request = self._begin(run, runner)
            if request is None:
                return
            span = _tracing.start(ctx)
            value: object = None
            error: BaseException | None = None
            cancelled: asyncio.CancelledError | None = None  # raised again once concluded
            try:
                value = await runner.call(request, ctx)  # type: ignore[misc]
            except BaseException as exc:
                error = exc
                if isinstance(exc, asyncio.CancelledError):
                    cancelled = exc
            run.returned = True
            del request
            outcome = self._outcome(runner, ctx, value, error, on_loop=True)
            span.end(outcome, run.stop.reason)
            if outcome is not None:  # None: stopped, its op is done already
                log_outcome(outcome, error, ctx)
                handed = True
                if cancelled is None and await self._concluded_now(run, outcome):
                    self._registry.end(run)
                else:
                    # Stored from a thread (the event loop never waits for the store), and
                    # not awaited: a cancelled task must not await at all.
                    self._hand_off(self._conclude_and_end, run, outcome)
            if cancelled is not None:
                raise cancelled
        finally:
            if not handed:
                self._registry.end(run)
            release()

    def _outcome(
        self,
        runner: MethodRunner,
        ctx: OperationContext,
        value: object,
        error: BaseException | None,
        *,
        on_loop: bool,
    ) -> _core.Outcome | None:
        return _core.run_outcome(
            value,
            error,
            runner.response_type,
            ctx.name,
            stopped=ctx.cancelled,
            max_response_bytes=self._max_response_bytes,
            on_loop=on_loop,
        )

    async def _concluded_now(self, run: Run, outcome: _core.Outcome) -> bool:
        """Whether the outcome was stored from the event loop (when the store can do that
        without blocking it); when False, it is left to :meth:`_conclude_and_end`."""
        if self._conclude_now is None:
            return False
        try:
            return await self._conclude_now(run, outcome)
        except asyncio.CancelledError:
            # Cancelled while storing (a stop does not cancel a run whose handler returned, see
            # _stop_task; the event loop shutting down does): stored from a thread, for the
            # first writer to win; the task stays cancelled.
            self._hand_off(self._conclude_and_end, run, outcome)
            raise

    def _conclude_and_end(self, run: Run, outcome: _core.Outcome) -> None:
        try:
            self._conclude(run, outcome)
        finally:
            self._registry.end(run)

    def _time_out(self, run: Run, timeout: float) -> None:
        """A run passed its method's timeout: end its op DEADLINE_EXCEEDED and stop it; if it
        has not stopped ``ABANDON_AFTER`` seconds later, abandon it."""
        if not self._registry.is_running(run):
            return
        if self._expire(run.name, _core.deadline_status(timeout)):
            run.stop.set(grpc.StatusCode.DEADLINE_EXCEEDED)
            self._schedule(ABANDON_AFTER, self._abandon, run)

    def _abandon(self, run: Run) -> None:
        if not self._registry.is_running(run):
            return  # it stopped as asked
        run.abandoned = True
        self._registry.end(run)  # its slot goes back to the pool
        if run.release_slot is not None:  # a task: its event-loop slot too
            loop = self._loop
            if loop is not None:
                _core.call_on_loop(loop, run.release_slot)
            logger.warning(
                "%s: the handler ignored its timeout; its slot is given back",
                run.name,
                extra=_core.about(run.name, run.ctx.method),
            )
            return
        abandoned = self._workers.abandon()
        logger.warning(
            "%s: the handler ignored its timeout; its thread is abandoned and replaced "
            "(%d abandoned)",
            run.name,
            abandoned,
            extra=_core.about(run.name, run.ctx.method),
        )
        if abandoned >= self._max_abandoned:
            logger.error(
                "%d handlers ignored their timeout and still hold threads (max_abandoned=%d): "
                "new operations are refused with RESOURCE_EXHAUSTED until they end",
                abandoned,
                self._max_abandoned,
            )
