"""How handlers run: a worker thread's driver and the event loop's, around one set of decisions.

Part of :class:`lrofw.Manager` (a mixin, so that each module has one job): the manager decides
what an operation is; this decides how a handler is started, driven and concluded.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from google.protobuf.message import Message

from . import _core, errors
from ._workers import Workers
from .context import AsyncOperationContext, Metadata, OperationContext
from .stores.base import DuplicateRequest, NewOperation, StoreUnavailable, normalize_method

if TYPE_CHECKING:
    from ._background import Background
    from .manager import Manager

logger = logging.getLogger("lrofw.manager")

Operation = _core.Operation

#: Retries (with these pauses, in seconds) when a finished run cannot be written.
_FINISH_RETRIES = (0.1, 0.5, 2.0)


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


class Runs:
    """The manager's handler-running half (see the module docstring)."""

    owner: str
    _lock: threading.Lock
    _idle: threading.Condition
    _active: dict[str, OperationContext]
    _closing: bool
    _executor: Workers
    _max_workers: int
    _loop: asyncio.AbstractEventLoop | None
    _slots: asyncio.Semaphore | None
    _tasks: set[asyncio.Task[None]]
    _background: Background
    _finish: Callable[..., bool]

    def _new_context(
        self,
        runner: MethodRunner,
        name: str,
        invocation_metadata: Metadata = (),
        peer: str = "",
    ) -> OperationContext:
        """The ``op`` a run of ``runner`` gets: awaitable ``sleep`` for async handlers."""
        kind = AsyncOperationContext if runner.is_async else OperationContext
        method = normalize_method(runner.method)
        return kind(
            cast("Manager", self), name, method, runner.metadata_type, invocation_metadata, peer
        )

    def _adopt_loop(self) -> None:
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

    def _new_for(
        self, runner: MethodRunner, request: Message, principal: str | None = None
    ) -> NewOperation:
        key = digest = None
        request_id = runner.request_id(request) if runner.request_id is not None else None
        if request_id:
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

    def _start(
        self,
        ctx: OperationContext,
        runner: MethodRunner,
        request: Message,
        context: contextvars.Context,
    ) -> None:
        with self._lock:
            closing = self._closing
            if not closing:
                self._active[ctx.name] = ctx
                if runner.is_async:
                    assert self._loop is not None
                    run = self._run_async(ctx, runner, request)
                    if _core.running_loop() is self._loop:  # on it: start the task now
                        self._spawn(ctx, run, context)
                    else:
                        self._loop.call_soon_threadsafe(self._spawn, ctx, run, context)
                else:
                    self._executor.submit(context.run, self._run, ctx, runner, request)
        if closing:  # closed between the insert and now: it never runs
            self._finish(ctx.name, None, _core.aborted_status(), quiet=True)

    def _spawn(
        self, ctx: OperationContext, run: Coroutine[Any, Any, None], context: contextvars.Context
    ) -> None:
        """On the event loop: start an async handler's run as a task (in the caller's context)."""
        assert self._loop is not None
        loop = self._loop
        task = context.run(loop.create_task, run)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

        def cancel() -> None:
            _core.call_on_loop(loop, task.cancel)

        ctx.add_stop_callback(cancel)

    def _run(self, ctx: OperationContext, runner: MethodRunner, request: Message) -> None:
        """A worker thread's driver of one sync handler."""
        if not self._begin(ctx, runner):
            return
        try:
            try:
                value = runner.call(request, ctx)
            except BaseException as exc:
                self._conclude(ctx, runner, None, exc)
            else:
                self._conclude(ctx, runner, value, None)
        finally:
            self._end(ctx)

    async def _run_async(
        self, ctx: OperationContext, runner: MethodRunner, request: Message
    ) -> None:
        """The event loop's driver of one async handler (the same decisions as :meth:`_run`)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max_workers)
        async with self._slots:
            if not self._begin(ctx, runner):
                return
            try:
                value = await runner.call(request, ctx)  # type: ignore[misc]
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError) and not ctx.cancelled:
                    # Not a cancel of ours: the event loop is going away under the handler.
                    self._conclude(ctx, runner, None, errors.Aborted(_core.ABORTED_MESSAGE))
                else:
                    self._conclude(ctx, runner, None, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
            else:
                self._conclude(ctx, runner, value, None)
            finally:
                self._end(ctx)

    def _begin(self, ctx: OperationContext, runner: MethodRunner) -> bool:
        with self._lock:
            if self._closing or self._active.get(ctx.name) is not ctx:
                return False  # cancelled while queued, or closing: done already (or soon)
            ctx._started = True
        if runner.timeout is not None:
            self._background.schedule_deadline(ctx, runner.timeout)
        return True

    def _conclude(
        self,
        ctx: OperationContext,
        runner: MethodRunner,
        value: object,
        error: BaseException | None,
    ) -> None:
        if error is not None:
            outcome = _core.outcome_of_exception(error, ctx.name)
        else:
            outcome = _core.outcome_of_return(value, runner.response_type, ctx.name)
        # A stopped handler's op is done already (cancelled, timed out or aborted): whatever it
        # returned or raised is dropped without a word.
        if not ctx.cancelled:
            self._log(outcome, error)
            self._finish_run(ctx, outcome)

    def _end(self, ctx: OperationContext) -> None:
        with self._lock:
            self._active.pop(ctx.name, None)
            self._idle.notify_all()

    def _finish_run(self, ctx: OperationContext, outcome: _core.Outcome) -> None:
        try:
            self._finish(ctx.name, outcome.response, outcome.error, quiet=True)
            return
        except StoreUnavailable:
            logger.warning("%s: the result could not be stored; retrying", ctx.name)
        if isinstance(ctx, AsyncOperationContext):  # never sleep on the event loop
            threading.Thread(target=self._retry_finish, args=(ctx, outcome), daemon=True).start()
        else:
            self._retry_finish(ctx, outcome)

    def _retry_finish(self, ctx: OperationContext, outcome: _core.Outcome) -> None:
        for pause in _FINISH_RETRIES:
            if ctx._signal.wait(pause):
                return  # stopped meanwhile (cancelled, say): the op is done already
            try:
                self._finish(ctx.name, outcome.response, outcome.error, quiet=True)
                return
            except StoreUnavailable:
                continue
        logger.error("%s: the result could not be stored; giving up", ctx.name)

    @staticmethod
    def _log(outcome: _core.Outcome, exc: BaseException | None) -> None:
        if outcome.log is not None:
            logger.log(
                outcome.log_level, outcome.log, exc_info=exc if outcome.log_traceback else None
            )
