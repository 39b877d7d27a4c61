"""``inline_timeout``: the create RPC returns the operation already done when the work is fast."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import tls_pb2_grpc
from factories import LONG, Request, Response, create, finished, get, on_both_servers, served

import lrofw


def quick(request: Any, op: Any) -> Response:
    """Finishes at once."""
    return Response(installed_image=request.image_path)


@on_both_servers
def test_a_fast_operation_comes_back_done_from_the_create(aio: bool) -> None:
    """With inline_timeout, a handler that finishes in time makes the create return it done."""
    with served(quick, aio=aio, inline_timeout=LONG) as srv:
        op = create(srv, image_path="img-1")
        assert op.done
        unpacked = Response()
        assert op.response.Unpack(unpacked)
        assert unpacked.installed_image == "img-1"
        assert get(srv, op.name) == op


def test_an_async_handler_comes_back_done_too() -> None:
    """An async def handler (aio server only) is waited for inline the same way."""

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> Response:
        await op.sleep(0.01)
        return Response(installed_image=request.image_path)

    with served(handler, aio=True, asynchronous=True, inline_timeout=LONG) as srv:
        assert create(srv, image_path="img-2").done


@on_both_servers
def test_a_slow_operation_comes_back_unfinished_after_the_inline_timeout(aio: bool) -> None:
    """Past inline_timeout the create returns the unfinished op; the work goes on."""
    gate = threading.Event()

    def slow(request: Any, op: Any) -> Response:
        gate.wait(LONG)
        return Response(installed_image="late")

    with served(slow, aio=aio, gates=(gate,), inline_timeout=0.2) as srv:
        started = time.monotonic()
        op = create(srv)
        took = time.monotonic() - started
        assert not op.done
        assert 0.15 <= took < LONG / 2
        gate.set()
        assert finished(srv, op.name).HasField("response")


@on_both_servers
def test_the_inline_wait_ends_before_the_callers_deadline(aio: bool) -> None:
    """A caller deadline shorter than inline_timeout still gets the op, not DEADLINE_EXCEEDED."""
    gate = threading.Event()

    def slow(request: Any, op: Any) -> Response:
        gate.wait(LONG)
        return Response()

    with served(slow, aio=aio, gates=(gate,), inline_timeout=LONG) as srv:
        stub = tls_pb2_grpc.CommonStub(srv.channel)
        op = stub.ProvisionDut(Request(name="dut"), timeout=0.5)
        assert not op.done


@pytest.mark.parametrize(
    ("bad", "error"), [(-1, ValueError), ("1", TypeError), (object(), TypeError)]
)
def test_a_bad_inline_timeout_is_refused(bad: object, error: type[Exception]) -> None:
    """inline_timeout must be seconds >= 0, checked when the decorator is applied."""
    with pytest.raises(error, match="inline_timeout"):
        lrofw.long_running(Response, inline_timeout=bad)  # type: ignore[arg-type]


def test_without_inline_timeout_the_create_does_not_wait() -> None:
    """The default: the create answers at once with the unfinished operation."""
    gate = threading.Event()

    def slow(request: Any, op: Any) -> Response:
        gate.wait(LONG)
        return Response()

    with served(slow, gates=(gate,)) as srv:
        assert not create(srv).done
