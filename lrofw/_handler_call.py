"""``call_handler``: run a ``@long_running`` method's body without a server, as a server would.

The body gets a real :class:`lrofw.OperationContext` (an :class:`lrofw.AsyncOperationContext`
for an ``async def``) whose reports are recorded instead of stored, and what it returns or raises
goes through the manager's own decision (:func:`lrofw._core.run_outcome`), so the result is the
operation a server would have ended with.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2

from . import _check, _core, _rpc, errors, registration
from ._runs import ABANDON_AFTER, MethodRunner, context_for, log_outcome
from .context import OperationContext, StopSignal
from .decorator import MethodSpec, spec_of

logger = logging.getLogger("lrofw.testing")


@dataclass(frozen=True)
class HandlerResult:
    """How a handler's operation ended under :func:`call_handler`.

    Attributes:
        response: the response message, or None when the operation ended with an error.
        error: the operation's error (a ``google.rpc.Status``), or None when it has a response.
        reports: the metadata messages the operation took, in order (copies, as they were when
            reported).
        name: the operation name the handler saw as ``op.name``.

    Example:
        >>> result = call_handler(Common().ProvisionDut, request)
        >>> result.code, result.response.installed_image
        (<StatusCode.OK: (0, 'ok')>, 'gs://img')
    """

    response: Message | None
    error: status_pb2.Status | None
    reports: tuple[Message, ...]
    name: str

    @property
    def code(self) -> grpc.StatusCode:
        """The error's code as a ``grpc.StatusCode``; ``OK`` when there is a response."""
        return grpc.StatusCode.OK if self.error is None else errors.from_status(self.error).code


def call_handler(
    bound_method: Callable[..., Any],
    request: Message,
    *,
    cancel_after: int | None = None,
    timeout: float | None = None,
) -> HandlerResult:
    """Run a ``@long_running`` method's body once, in this thread, and return how its operation
    ends, exactly as a server would end it (the same outcome rules, one implementation).

    A ``def`` body runs in the calling thread; an ``async def`` body runs to completion on a
    private event loop (so call this from a plain function, not from a coroutine). The body's
    ``op`` is a real operation context: ``op.report()`` checks the metadata's type and size as on
    a server, and its reports are recorded in ``reports``; ``op.cancelled``, ``op.sleep()`` and
    stop callbacks behave as on a server. Before the body runs, the request is checked against
    the method's request type and the method's ``validate`` hook is run: a request the server
    would refuse raises that refusal here (no operation would exist).

    Args:
        bound_method: the decorated method of a servicer instance, e.g. ``Common().ProvisionDut``.
        request: the request message.
        cancel_after: cancel the operation right after the handler's Nth report, as a client's
            CancelOperation would: the operation ends CANCELLED at once and the handler is
            signalled (an ``async def`` body's task is cancelled, as on a server); what it
            returns afterwards is dropped. ``0`` cancels it as it starts.
        timeout: seconds the body may run, as the decorator's ``timeout`` on a server (by
            default the method's own): past it the operation ends DEADLINE_EXCEEDED and the
            handler is signalled.

    Returns:
        A :class:`HandlerResult`. The call returns when the body does: a body that ignores its
        stop keeps the call waiting (a warning is logged after a second, when a server would
        abandon it).

    Raises:
        TypeError: ``bound_method`` is not a ``@long_running`` method of a servicer instance,
            the request is not of the method's request type, or an argument has a wrong type.
        ValueError: ``cancel_after`` is negative or ``timeout`` not positive.
        lrofw.OperationError: the method's ``validate`` hook refused the request (as the server
            refuses the create RPC with that status).
        RuntimeError: an ``async def`` body, called from a running event loop.

    Example:
        >>> from lrofw.testing import call_handler
        >>> result = call_handler(Common().ProvisionDut, request, cancel_after=1)
        >>> result.code, len(result.reports)
        (<StatusCode.CANCELLED: (1, 'cancelled')>, 1)
    """
    spec, instance, attr = _method_of(bound_method)
    if cancel_after is not None:
        cancel_after = _check.count("cancel_after", cancel_after, 0)
    seconds = spec.timeout if timeout is None else _check.positive_seconds("timeout", timeout)
    method, request_type = registration.method_info(instance, attr)
    _check_request(request, request_type, method)
    _rpc.validate(spec.validate, request)  # the server's refusal, before any operation exists
    if spec.is_async and _core.running_loop() is not None:
        raise RuntimeError(
            "call_handler runs an async def body on an event loop of its own and blocks until "
            "it ends; call it from a plain function, or with await asyncio.to_thread(...)"
        )
    runner = spec.runner(instance, method, request_type, registration.types_of(bound_method))
    name = f"operations/{_core.random_id()}"
    stop = StopSignal(name)
    op = _Operation(stop, cancel_after)
    ctx = context_for(runner, name, op.report, stop)
    timers = _Timers(name)
    stop.add(timers.after_stop)
    if cancel_after == 0:
        op.end_early(_core.cancelled_status())
    if seconds is not None:
        timers.start(seconds, lambda: op.end_early(_core.deadline_status(seconds)))
    try:
        value, error = _run(runner, request, ctx, stop)
    finally:
        timers.close()
    outcome = _core.run_outcome(
        value,
        error,
        runner.response_type,
        name,
        stopped=ctx.cancelled,
        max_response_bytes=_core.MAX_RESPONSE_BYTES,
        on_loop=runner.is_async,
    )
    if outcome is not None:
        log_outcome(outcome, error, ctx)
    return op.result(outcome, runner.response_type, name)


class _Operation:
    """The operation as a server would keep it: reports taken while it runs, and the first
    ending wins (a cancel or the timeout, else the handler's outcome)."""

    def __init__(self, stop: StopSignal, cancel_after: int | None) -> None:
        self._stop = stop
        self._cancel_after = cancel_after
        self._lock = threading.Lock()
        self._reports: list[Message] = []
        self._ended: status_pb2.Status | None = None

    def report(self, name: str, metadata: Message) -> bool:
        """``op.report``'s reporter: what the manager's does, with a list for the store."""
        _core.packed_metadata(metadata, _core.MAX_METADATA_BYTES)  # too large: the handler's error
        kept = type(metadata)()
        kept.CopyFrom(metadata)
        with self._lock:
            if self._ended is not None:
                return False  # the operation is done: the report is dropped
            self._reports.append(kept)
            due = len(self._reports) == self._cancel_after
        if due:
            self.end_early(_core.cancelled_status())
        return True

    def end_early(self, status: status_pb2.Status) -> None:
        """End it with ``status`` unless it ended already, then signal the handler (as the
        manager's cancel and timeout do)."""
        with self._lock:
            if self._ended is not None:
                return
            self._ended = status
        self._stop.set()

    def result(
        self, outcome: _core.Outcome | None, response_type: type[Message], name: str
    ) -> HandlerResult:
        """The result, once the handler's run ended with ``outcome`` (None: it was stopped)."""
        with self._lock:
            ended = self._ended
            if ended is None:
                assert outcome is not None  # not stopped: the run's outcome ends it
                ended = self._ended = outcome.error
            reports = tuple(self._reports)
        if ended is not None:
            return HandlerResult(None, ended, reports, name)
        assert outcome is not None and outcome.response is not None
        return HandlerResult(_core.unpack(outcome.response, response_type), None, reports, name)


class _Timers:
    """The run's timeout, and the warning for a handler that goes on after it was stopped."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []
        self._closed = False

    def start(self, delay: float, fn: Callable[[], None]) -> None:
        timer = threading.Timer(delay, fn)
        timer.daemon = True
        with self._lock:
            if self._closed:
                return
            self._timers.append(timer)
        timer.start()

    def after_stop(self) -> None:
        self.start(ABANDON_AFTER, self._warn)

    def _warn(self) -> None:
        logger.warning(
            "%s: the handler goes on %g s after it was told to stop (op.cancelled); a server "
            "would give up on it and take its thread back",
            self._name,
            ABANDON_AFTER,
            extra=_core.about(self._name),
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()


def _run(
    runner: MethodRunner, request: Message, ctx: OperationContext, stop: StopSignal
) -> tuple[object, BaseException | None]:
    """Run the body: what it returned, or what it raised (KeyboardInterrupt, the user's
    Ctrl-C in this thread, is raised again)."""
    try:
        if runner.is_async:
            return _run_on_loop(runner, request, ctx, stop), None
        return runner.call(request, ctx), None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        return None, exc


def _run_on_loop(
    runner: MethodRunner, request: Message, ctx: OperationContext, stop: StopSignal
) -> object:
    """An ``async def`` body to completion on a private loop; a stop cancels its task, as the
    server's does."""
    loop = asyncio.new_event_loop()

    async def body() -> object:
        task = asyncio.current_task()
        assert task is not None

        def cancel() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                _core.call_on_loop(loop, task.cancel)

        remove = stop.add(cancel)
        try:
            return await runner.call(request, ctx)  # type: ignore[misc]
        finally:
            remove()

    try:
        return loop.run_until_complete(body())
    finally:
        try:
            _cancel_leftovers(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks the body left running, as ``asyncio.run`` does."""
    left = asyncio.all_tasks(loop)
    for task in left:
        task.cancel()
    if left:
        loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))


def _method_of(bound_method: object) -> tuple[MethodSpec, object, str]:
    """The spec, servicer instance and attribute name of a decorated method of an instance."""
    spec = spec_of(bound_method)
    if spec is None:
        raise TypeError(
            "call_handler needs a @long_running method of a servicer instance, like "
            f"call_handler(Common().ProvisionDut, request); got {bound_method!r}"
        )
    instance = getattr(bound_method, "__self__", None)
    if instance is None or inspect.isclass(instance):
        raise TypeError(
            f"call_handler needs {spec.name} of a servicer instance, not of its class: pass "
            f"instance.{spec.name} (e.g. MyServicer().{spec.name})"
        )
    for attr in dir(type(instance)):
        if spec_of(inspect.getattr_static(type(instance), attr, None)) is spec:
            return spec, instance, attr
    return spec, instance, spec.name


def _check_request(request: object, request_type: type[Message] | None, method: str) -> None:
    expected: type[Message] = Message if request_type is None else request_type
    if not isinstance(request, expected):
        want = "a protobuf message" if request_type is None else request_type.DESCRIPTOR.full_name
        raise TypeError(f"{method} takes {want}, got {type(request).__qualname__}")


