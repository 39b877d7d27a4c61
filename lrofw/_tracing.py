"""OpenTelemetry: one span per operation's run, when ``opentelemetry-api`` is installed.

A run's span (named ``lrofw.operation <pkg.Service/Method>``) starts when its handler starts and
ends when the handler's outcome is known. It is started in the context the create RPC was served
in (lrofw carries the caller's contextvars into the worker thread or task), so under
``opentelemetry-instrumentation-grpc`` it is a *child* of the create RPC's server span: the same
trace, though it usually ends after its parent. While the handler runs the span is the current
one, so the handler's own spans (a downstream gRPC call, say) nest under it. A run resumed after
its server stopped has no caller: its span starts a trace of its own.

Attributes: ``lrofw.method`` (``/pkg.Service/Method``), ``lrofw.operation`` (the operation's
name) and ``lrofw.code`` (the status code name the operation ended with: ``OK``,
``INTERNAL``...); the span's status is ERROR for every code but OK. A run stopped by a cancel,
its timeout or a closing server records that code; one stopped because another server finished
its operation records none.

Cost: without ``opentelemetry-api`` a run pays one call that returns a constant; with the API
but no SDK configured, one non-recording span is made and dropped at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from . import _core
    from .context import OperationContext

try:
    from opentelemetry import context as _otel_context
    from opentelemetry import trace as _otel_trace
except ImportError:  # the optional extra lrofw[otel] is not installed
    _otel_trace = None  # type: ignore[assignment]
    _otel_context = None  # type: ignore[assignment]

#: The span name's prefix; the method (``pkg.Service/Method``) follows after a space.
SPAN_NAME = "lrofw.operation"

_tracer: Any = _otel_trace.get_tracer("lrofw") if _otel_trace is not None else None


class _NoSpan:
    """What a run gets when nothing records spans: ending it does nothing."""

    def end(self, outcome: _core.Outcome | None, stopped_with: grpc.StatusCode | None) -> None:
        pass


NO_SPAN = _NoSpan()


class _RunSpan:
    """A recording span of one run, current in the run's context until it ends."""

    def __init__(self, span: Any) -> None:
        self._span = span
        self._token = _otel_context.attach(_otel_trace.set_span_in_context(span))

    def end(self, outcome: _core.Outcome | None, stopped_with: grpc.StatusCode | None) -> None:
        """End with ``outcome``'s code, or (``outcome`` None: the run was stopped) with the code
        the operation was stopped with, if known."""
        code: grpc.StatusCode | None
        if outcome is not None:
            code = grpc.StatusCode.OK if outcome.error is None else _code(outcome.error.code)
        else:
            code = stopped_with
        span = self._span
        if code is not None:
            span.set_attribute("lrofw.code", code.name)
            if code is grpc.StatusCode.OK:
                span.set_status(_otel_trace.StatusCode.OK)
            else:
                message = outcome.error.message if outcome is not None and outcome.error else ""
                span.set_status(_otel_trace.StatusCode.ERROR, message or code.name)
        try:
            _otel_context.detach(self._token)
        finally:
            span.end()


def _code(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


def start(ctx: OperationContext) -> _RunSpan | _NoSpan:
    """Start the span of a run of ``ctx``'s operation (call in the run's context, as it starts).

    Example:
        >>> span = start(run.ctx)
        >>> span.end(outcome, None)
    """
    if _tracer is None:
        return NO_SPAN
    method = ctx.method
    span = _tracer.start_span(
        f"{SPAN_NAME} {method.lstrip('/')}",
        attributes={"lrofw.method": method, "lrofw.operation": ctx.name},
    )
    if not span.is_recording():  # no SDK configured (or sampled out): nothing to keep
        return NO_SPAN
    return _RunSpan(span)
