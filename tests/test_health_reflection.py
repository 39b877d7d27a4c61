"""Health and reflection on sync and aio servers, through the standard stubs:
``add_servicer_to_server(..., health=True, reflection=True)`` (and ``serve(...)``'s flags)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from factories import LONG, blocked, common, on_both_servers
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

import lrofw
from lrofw.testing import serve

COMMON = "chromiumos.config.api.test.tls.Common"
OPERATIONS = "google.longrunning.Operations"
HEALTH = "grpc.health.v1.Health"


def services(channel: grpc.Channel) -> set[str]:
    """The services server reflection lists, read with grpcio-reflection's own client."""
    return set(ProtoReflectionDescriptorDatabase(channel).get_services())


def status(channel: grpc.Channel, service: str = "") -> int:
    """The health status of ``service`` by the standard stub's Check."""
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=LONG).status)


@on_both_servers
def test_reflection_lists_the_services_with_health(aio: bool) -> None:
    """health=True, reflection=True: reflection lists Common, Operations, Health and itself,
    health says SERVING, and a reflection client finds the create RPC's method."""
    servicer = common(blocked(threading.Event()))
    with serve(servicer, health=True, reflection=True, aio=aio) as srv:
        listed = services(srv.channel)
        serving = status(srv.channel, COMMON)
        database = ProtoReflectionDescriptorDatabase(srv.channel)
        method = database.FindFileContainingSymbol(COMMON)
    assert listed == {COMMON, OPERATIONS, HEALTH, reflection.SERVICE_NAME}
    assert serving == health_pb2.HealthCheckResponse.SERVING
    assert any(s.name == "Common" for s in method.service)


@on_both_servers
def test_reflection_without_health_does_not_list_health(aio: bool) -> None:
    """reflection=True alone: no health service is listed (none is served)."""
    with serve(common(blocked(threading.Event())), reflection=True, aio=aio) as srv:
        listed = services(srv.channel)
        with pytest.raises(grpc.RpcError) as info:
            status(srv.channel)
    assert listed == {COMMON, OPERATIONS, reflection.SERVICE_NAME}
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


@on_both_servers
def test_no_reflection_by_default(aio: bool) -> None:
    """Without reflection=True the reflection service is not served."""
    with (
        serve(common(blocked(threading.Event())), aio=aio) as srv,
        pytest.raises(grpc.RpcError) as info,
    ):
        services(srv.channel)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


@on_both_servers
def test_several_servicers_register_reflection_once(aio: bool) -> None:
    """Two servicers with reflection=True on one server: one reflection service, listing each
    service once (a second registration would be ignored by grpc, hiding names)."""
    first = common(blocked(threading.Event()))
    second = common(blocked(threading.Event()))  # another instance of the same service
    with serve(first, second, reflection=True, health=True, aio=aio) as srv:
        response = services(srv.channel)
        names = list(ProtoReflectionDescriptorDatabase(srv.channel).get_services())
    assert response == {COMMON, OPERATIONS, HEALTH, reflection.SERVICE_NAME}
    assert sorted(names) == sorted(set(names))


@pytest.mark.parametrize("value", [1, "yes", None])
def test_reflection_must_be_a_bool(value: Any) -> None:
    """reflection= of another type: TypeError naming it, before anything is registered."""
    server = grpc.server(ThreadPoolExecutor(1))
    with lrofw.Manager() as manager, pytest.raises(TypeError, match="reflection"):
        lrofw.add_servicer_to_server(
            common(blocked(threading.Event())), server, manager=manager, reflection=value
        )
