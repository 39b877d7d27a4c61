"""google-api-core's standard clients against an lrofw server, unchanged."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from factories import Metadata, Provisioner, Response, create
from google.api_core import exceptions, operation, operations_v1
from google.api_core.future import polling
from google.longrunning import operations_pb2

from lrofw.testing import Served, serve

# api-core's default polling sleeps about a second first; poll quickly to keep tests short.
FAST_POLLING = polling.DEFAULT_POLLING.with_delay(initial=0.01, maximum=0.05, multiplier=1.5)


@dataclass
class Lab:
    """An lrofw server with the Provisioner, and api-core's OperationsClient on its channel."""

    srv: Served
    servicer: Provisioner
    client: operations_v1.OperationsClient

    def start(self, dut: str, image: str = "R120") -> Any:
        """Calls ProvisionDut and wraps the Operation with api-core's ``from_gapic``."""
        op = create(self.srv, dut, image_path=image)
        return operation.from_gapic(
            op, self.client, Response, metadata_type=Metadata, polling=FAST_POLLING
        )


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    """Serves a Provisioner on localhost:0 with an api-core OperationsClient for it."""
    servicer = Provisioner()
    with serve(servicer, grace=0.2) as srv:
        yield Lab(srv, servicer, operations_v1.OperationsClient(srv.channel))


def test_result_returns_the_response() -> None:
    """api-core's future.result() returns the handler's response."""
    with lab() as lb:
        future = lb.start("some host", "R120-15662.0.0")
        result = future.result(timeout=30)
        assert future.done()
    assert result == Response(installed_image="R120-15662.0.0")
    assert future.exception() is None
    assert not future.cancelled()


def test_handler_not_found_raises_api_core_not_found() -> None:
    """A handler's NOT_FOUND becomes google.api_core.exceptions.NotFound with its message."""
    with lab() as lb:
        future = lb.start("unknown host")
        with pytest.raises(exceptions.NotFound) as info:
            future.result(timeout=30)
    assert info.value.message == "Unknown DUT unknown host"
    assert info.value.grpc_status_code is grpc.StatusCode.NOT_FOUND
    assert not future.cancelled()


def test_metadata_shows_reported_progress() -> None:
    """api-core's future.metadata unpacks the handler's reported ProvisionDutMetadata."""
    with lab() as lb:
        future = lb.start("slow host")
        assert lb.servicer.reported.wait(20)
        assert not future.done()
        assert future.metadata == Metadata(stage="flashing", percent=40)


def test_cancel_operation_makes_future_cancelled() -> None:
    """client.cancel_operation on a running op leaves it done with CANCELLED."""
    with lab() as lb:
        future = lb.start("slow host")
        assert lb.servicer.reported.wait(20)
        lb.client.cancel_operation(future.operation.name)
        assert future.cancelled()
        assert future.done()
        with pytest.raises(exceptions.Cancelled):
            future.result(timeout=30)
        assert lb.servicer.stopped.wait(20)  # the handler was signalled


def test_future_cancel_is_honoured() -> None:
    """api-core's future.cancel() on a running op makes the RPC and the op ends cancelled."""
    with lab() as lb:
        future = lb.start("slow host")
        assert lb.servicer.reported.wait(20)
        assert future.cancel() is True
        assert future.cancelled()
        op = lb.client.get_operation(future.operation.name)
    assert op.done
    assert op.error.code == grpc.StatusCode.CANCELLED.value[0]


def test_list_operations_iterates_every_page() -> None:
    """list_operations walks all pages (more than one) and yields every operation once."""
    with serve() as srv:
        client = operations_v1.OperationsClient(srv.channel)
        created = [srv.manager.new_operation().name for _ in range(120)]
        listed = [op.name for op in client.list_operations("operations", filter_="")]
        pages = list(client.list_operations("operations", filter_="").pages)
        everything = [op.name for op in client.list_operations("", filter_="")]
    assert sorted(listed) == sorted(created)
    assert len(listed) == len(set(listed))
    assert len(pages) > 1
    assert sum(page.num_items for page in pages) == len(created)
    assert sorted(everything) == sorted(created)


def test_list_operations_passes_the_filter() -> None:
    """list_operations' filter_ reaches the server: "done = true" lists only finished ops."""
    with serve() as srv:
        client = operations_v1.OperationsClient(srv.channel)
        names = [srv.manager.new_operation().name for _ in range(4)]
        for name in names[:2]:
            srv.manager.set_result(name, Response(installed_image="R1"))
        done = [op.name for op in client.list_operations("operations", filter_="done = true")]
        running = [op.name for op in client.list_operations("operations", filter_="done = false")]
    assert sorted(done) == sorted(names[:2])
    assert sorted(running) == sorted(names[2:])


def test_delete_operation_then_get_is_not_found() -> None:
    """After client.delete_operation, client.get_operation raises NotFound."""
    with serve() as srv:
        client = operations_v1.OperationsClient(srv.channel)
        name = srv.manager.new_operation().name
        assert client.get_operation(name).name == name
        client.delete_operation(name)
        with pytest.raises(exceptions.NotFound):
            client.get_operation(name)
        with pytest.raises(exceptions.NotFound):
            client.delete_operation(name)


def test_get_operation_bad_name_is_invalid_argument() -> None:
    """A malformed name reaches api-core as InvalidArgument, an unknown one as NotFound."""
    with serve() as srv:
        client = operations_v1.OperationsClient(srv.channel)
        with pytest.raises(exceptions.InvalidArgument):
            client.get_operation("not-an-operation")
        with pytest.raises(exceptions.NotFound):
            client.get_operation("operations/unknown")


def test_async_client_get_operation() -> None:
    """OperationsAsyncClient over a grpc.aio channel reads ops and maps NOT_FOUND."""
    with serve() as srv:
        name = srv.manager.new_operation().name
        srv.manager.set_result(name, Response(installed_image="R7"))

        async def main() -> tuple[operations_pb2.Operation, BaseException | None]:
            async with grpc.aio.insecure_channel(srv.target) as channel:
                client = operations_v1.OperationsAsyncClient(channel)
                op = await client.get_operation(name)
                try:
                    await client.get_operation("operations/unknown")
                except BaseException as exc:
                    return op, exc
                return op, None

        op, error = asyncio.run(main())
    assert op.name == name
    assert op.done
    response = Response()
    assert op.response.Unpack(response)
    assert response.installed_image == "R7"
    assert isinstance(error, exceptions.NotFound)
