"""OpenTelemetry: a span per operation, a child of the create RPC's server span (lrofw._tracing)."""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from factories import LONG, METHOD, RESPONSE, cancel, create, eventually, finished, served
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorServer, GrpcInstrumentorServer
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import lrofw
from lrofw import _tracing
from lrofw.stores import SQLiteStore

EXPORTER = InMemorySpanExporter()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))

#: (aio server, async def handler): a sync server, an aio server running a def handler on a
#: thread, and one running an async def handler as a task.
KINDS = pytest.mark.parametrize(
    ("aio", "asynchronous"),
    [(False, False), (True, False), (True, True)],
    ids=["sync", "aio-def", "aio-async-def"],
)


def recording_provider() -> TracerProvider:
    """The global provider, which lrofw's spans go to, exporting to EXPORTER. It can be set only
    once per process: when something else set an SDK provider before, EXPORTER is added to it."""
    trace.set_tracer_provider(PROVIDER)  # ignored (with a log line) when one was set before
    provider = trace.get_tracer_provider()
    if provider is not PROVIDER:
        assert isinstance(provider, TracerProvider), f"not an SDK provider: {provider!r}"
        if not getattr(provider, "_lrofw_test_exporter", False):
            provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
            provider._lrofw_test_exporter = True  # type: ignore[attr-defined]
    return provider


@pytest.fixture(autouse=True)
def spans() -> Iterator[InMemorySpanExporter]:
    """The SDK records every span (the global provider); both kinds of server instrumented."""
    provider = recording_provider()
    sync_server, aio_server = GrpcInstrumentorServer(), GrpcAioInstrumentorServer()
    sync_server.instrument(tracer_provider=provider)
    aio_server.instrument(tracer_provider=provider)
    EXPORTER.clear()
    try:
        yield EXPORTER
    finally:
        sync_server.uninstrument()
        aio_server.uninstrument()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def one_span(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    """The one finished span called ``name`` (waits for it: spans end on other threads)."""
    eventually(lambda: len(named(exporter, name)) == 1, f"one span {name!r}")
    return named(exporter, name)[0]


OP_SPAN = f"lrofw.operation {METHOD.lstrip('/')}"


@KINDS
def test_operation_span_is_a_child_of_the_create_rpc_span(
    spans: InMemorySpanExporter, aio: bool, asynchronous: bool
) -> None:
    """The operation's span carries method, name and OK, under the create RPC's server span."""
    with served(lambda request, op: RESPONSE, aio=aio, asynchronous=asynchronous) as srv:
        name = create(srv).name
        assert finished(srv, name).HasField("response")
        op_span = one_span(spans, OP_SPAN)
        rpc_span = one_span(spans, METHOD)
    assert op_span.attributes == {
        "lrofw.method": METHOD,
        "lrofw.operation": name,
        "lrofw.code": "OK",
    }
    assert op_span.status.status_code is trace.StatusCode.OK
    assert rpc_span.kind is trace.SpanKind.SERVER
    assert op_span.parent is not None and rpc_span.context is not None
    assert op_span.context is not None
    assert op_span.context.trace_id == rpc_span.context.trace_id
    assert op_span.parent.span_id == rpc_span.context.span_id


@KINDS
def test_an_error_outcome_sets_status_error(
    spans: InMemorySpanExporter, aio: bool, asynchronous: bool
) -> None:
    """A handler that raises: the span's code is INTERNAL and its status ERROR."""

    def fail(request: Any, op: lrofw.OperationContext) -> object:
        raise ValueError("broken")

    with served(fail, aio=aio, asynchronous=asynchronous) as srv:
        name = create(srv).name
        assert finished(srv, name).error.code == grpc.StatusCode.INTERNAL.value[0]
        op_span = one_span(spans, OP_SPAN)
    assert op_span.attributes is not None
    assert op_span.attributes["lrofw.code"] == "INTERNAL"
    assert op_span.status.status_code is trace.StatusCode.ERROR
    assert op_span.status.description == f"internal error in operation {name}"


@KINDS
def test_a_cancelled_run_records_cancelled(
    spans: InMemorySpanExporter, aio: bool, asynchronous: bool
) -> None:
    """A run stopped by a cancel ends its span with CANCELLED (what its operation ended with)."""

    started = threading.Event()

    def sleep(request: Any, op: lrofw.OperationContext) -> object:
        started.set()
        op.sleep(LONG)
        return RESPONSE

    async def sleep_async(request: Any, op: lrofw.AsyncOperationContext) -> object:
        started.set()
        await op.sleep(LONG)
        return RESPONSE

    handler: Any = sleep_async if asynchronous else sleep
    with served(handler, aio=aio, asynchronous=asynchronous) as srv:
        name = create(srv).name
        assert started.wait(LONG)
        cancel(srv, name)
        op_span = one_span(spans, OP_SPAN)
    assert op_span.attributes is not None
    assert op_span.attributes["lrofw.code"] == "CANCELLED"
    assert op_span.status.status_code is trace.StatusCode.ERROR


def test_the_handlers_own_spans_nest_under_the_operation_span(
    spans: InMemorySpanExporter,
) -> None:
    """While the handler runs, the operation's span is the current one."""
    tracer = trace.get_tracer("test")

    def traced(request: Any, op: lrofw.OperationContext) -> object:
        with tracer.start_as_current_span("inside"):
            return RESPONSE

    with served(traced) as srv:
        finished(srv, create(srv).name)
        op_span = one_span(spans, OP_SPAN)
        inside = one_span(spans, "inside")
    assert inside.parent is not None and op_span.context is not None
    assert inside.parent.span_id == op_span.context.span_id


def test_no_span_without_a_recording_tracer(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the API but no SDK (a no-op tracer) a run gets the shared do-nothing span."""
    monkeypatch.setattr(_tracing, "_tracer", trace.NoOpTracer())
    ctx = lrofw.OperationContext(
        lambda name, metadata: True,
        lrofw.context.StopSignal("operations/1"),
        "operations/1",
        METHOD,
        None,
    )
    assert _tracing.start(ctx) is _tracing.NO_SPAN


@pytest.mark.parametrize("asynchronous", [False, True], ids=["def", "async-def"])
def test_an_aio_server_on_a_file_store_keeps_the_trace(
    spans: InMemorySpanExporter, tmp_path: pathlib.Path, asynchronous: bool
) -> None:
    """With a store written from a thread (SQLite), the create's context still reaches the run."""
    manager = lrofw.Manager(store=SQLiteStore(tmp_path / "ops.db"))
    with served(
        lambda request, op: RESPONSE, manager=manager, aio=True, asynchronous=asynchronous
    ) as srv:
        finished(srv, create(srv).name)
        op_span = one_span(spans, OP_SPAN)
        rpc_span = one_span(spans, METHOD)
    assert op_span.parent is not None and rpc_span.context is not None
    assert op_span.parent.span_id == rpc_span.context.span_id
