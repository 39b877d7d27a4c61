"""Tests for lrofw.errors: one class per status code, and the Status <-> exception paths."""

from __future__ import annotations

import asyncio
import copy
import pickle

import grpc
import pytest
import tls_pb2
from google.longrunning import operations_pb2_grpc
from google.longrunning import operations_proto_pb2 as operations_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2

import lrofw
from lrofw import errors
from lrofw.testing import serve

#: The class every non-OK code maps to, written out so a wrong registry entry shows.
CLASSES: dict[grpc.StatusCode, type[errors.OperationError]] = {
    grpc.StatusCode.CANCELLED: errors.OperationCancelled,
    grpc.StatusCode.UNKNOWN: errors.Unknown,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.ABORTED: errors.Aborted,
    grpc.StatusCode.OUT_OF_RANGE: errors.OutOfRange,
    grpc.StatusCode.UNIMPLEMENTED: errors.Unimplemented,
    grpc.StatusCode.INTERNAL: errors.Internal,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DATA_LOSS: errors.DataLoss,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
}

NON_OK = [code for code in grpc.StatusCode if code is not grpc.StatusCode.OK]


def packed(message: tls_pb2.ProvisionDutMetadata) -> any_pb2.Any:
    """Packs a message into a new Any."""
    out = any_pb2.Any()
    out.Pack(message)
    return out


def detail() -> tls_pb2.ProvisionDutMetadata:
    """A message to use as a status detail."""
    return tls_pb2.ProvisionDutMetadata(stage="flashing", percent=40)


def test_table_covers_every_code_but_ok() -> None:
    """The expected-class table names every non-OK code once, so the parametrized tests see all."""
    assert set(CLASSES) == set(NON_OK)
    assert len(set(CLASSES.values())) == len(CLASSES)


@pytest.mark.parametrize("code", NON_OK, ids=lambda c: c.name)
def test_from_code_returns_the_class_for_the_code(code: grpc.StatusCode) -> None:
    """from_code gives the code's own subclass, carrying the code, message and details."""
    err = errors.from_code(code, "it broke", [packed(detail())])
    assert type(err) is CLASSES[code]
    assert isinstance(err, lrofw.OperationError)
    assert err.code is code
    assert type(err).default_code is code
    assert err.message == "it broke"
    assert err.details == (packed(detail()),)
    assert str(err) == f"{code.name}: it broke"


@pytest.mark.parametrize("code", NON_OK, ids=lambda c: c.name)
def test_subclass_fixes_its_code(code: grpc.StatusCode) -> None:
    """Each subclass is built from a message alone and is found by errors.__all__."""
    cls = CLASSES[code]
    err = cls("msg")
    assert err.code is code
    assert cls.__name__ in errors.__all__


@pytest.mark.parametrize("code", NON_OK, ids=lambda c: c.name)
def test_to_status_round_trips(code: grpc.StatusCode) -> None:
    """OperationError -> Status -> from_status keeps class, code, message and details."""
    err = lrofw.OperationError(code, "Unknown DUT x", [detail()])
    status = err.to_status()
    assert status.code == code.value[0]
    assert status.message == "Unknown DUT x"
    assert list(status.details) == [packed(detail())]
    back = errors.from_status(status)
    assert type(back) is CLASSES[code]
    assert (back.code, back.message, back.details) == (code, err.message, err.details)
    assert back.to_status() == status


def test_from_status_keeps_message_and_details() -> None:
    """from_status keeps the message and every detail, in order."""
    details = [packed(detail()), packed(tls_pb2.ProvisionDutMetadata(stage="verifying"))]
    status = status_pb2.Status(code=5, message="Unknown DUT foo", details=details)
    err = errors.from_status(status)
    assert isinstance(err, errors.NotFound)
    assert err.message == "Unknown DUT foo"
    assert list(err.details) == details
    unpacked = tls_pb2.ProvisionDutMetadata()
    assert err.details[1].Unpack(unpacked)
    assert unpacked.stage == "verifying"


def test_from_status_of_an_unknown_number_is_unknown() -> None:
    """A code number outside google.rpc.Code becomes Unknown, message kept."""
    err = errors.from_status(status_pb2.Status(code=99, message="odd"))
    assert type(err) is errors.Unknown
    assert err.message == "odd"


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_code_from_int_inverts_the_code_number(code: grpc.StatusCode) -> None:
    """code_from_int maps every code's number back to the code."""
    assert errors.code_from_int(code.value[0]) is code


def test_operation_error_refuses_ok() -> None:
    """OK is not an error: OperationError refuses it."""
    with pytest.raises(ValueError, match="non-OK"):
        lrofw.OperationError(grpc.StatusCode.OK, "fine")


@pytest.mark.parametrize("code", [5, "NOT_FOUND", None, (5, "not found")], ids=repr)
def test_operation_error_refuses_codes_that_are_not_status_codes(code: object) -> None:
    """Only a grpc.StatusCode is a code: numbers, names and tuples are refused."""
    with pytest.raises(TypeError, match=r"grpc\.StatusCode"):
        lrofw.OperationError(code, "msg")  # type: ignore[arg-type]


def test_operation_error_refuses_details_that_are_not_messages() -> None:
    """Details must be protobuf messages."""
    with pytest.raises(TypeError, match="protobuf messages"):
        lrofw.OperationError(grpc.StatusCode.INTERNAL, "msg", ["not a message"])  # type: ignore[list-item]


def test_details_are_packed_once() -> None:
    """A detail message is packed into Any; an Any is kept as it is."""
    err = lrofw.OperationError(grpc.StatusCode.ABORTED, "m", [detail(), packed(detail())])
    assert err.details == (packed(detail()), packed(detail()))


def test_subclasses_survive_pickling() -> None:
    """Every per-code class pickles with its class, code, message and details."""
    for code, cls in CLASSES.items():
        back = pickle.loads(pickle.dumps(cls("m", [detail()])))
        assert type(back) is cls
        assert (back.code, back.message, back.details) == (code, "m", (packed(detail()),))


def test_base_class_survives_pickling_and_copying() -> None:
    """OperationError(code, ...) itself pickles and copies with its code, message and details."""
    err = lrofw.OperationError(grpc.StatusCode.NOT_FOUND, "Unknown DUT x", [detail()])
    for back in (pickle.loads(pickle.dumps(err)), copy.copy(err)):
        assert type(back) is lrofw.OperationError
        assert (back.code, back.message, back.details) == (err.code, err.message, err.details)


def test_operation_timeout_is_a_timeout_error() -> None:
    """OperationTimeout is a TimeoutError (not an OperationError) and keeps the latest state."""
    latest = operations_pb2.Operation(name="operations/x")
    with pytest.raises(TimeoutError) as caught:
        raise lrofw.OperationTimeout("operations/x not done after 1 s", latest)
    assert type(caught.value) is lrofw.OperationTimeout
    assert caught.value.operation is latest
    assert str(caught.value) == "operations/x not done after 1 s"
    assert not isinstance(caught.value, lrofw.OperationError)
    assert lrofw.OperationTimeout is errors.OperationTimeout


def test_public_names_are_the_errors_module_classes() -> None:
    """lrofw re-exports the errors module's classes, not copies."""
    assert lrofw.OperationError is errors.OperationError
    assert lrofw.OperationCancelled is errors.OperationCancelled


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("operations/no-such-op", grpc.StatusCode.NOT_FOUND),
        ("elsewhere/1", grpc.StatusCode.INVALID_ARGUMENT),
        ("", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_from_rpc_error_of_a_real_failed_call(name: str, code: grpc.StatusCode) -> None:
    """from_rpc_error on a failed sync call keeps the call's code and details."""
    with serve() as srv:
        stub = operations_pb2_grpc.OperationsStub(srv.channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=10)
    exc = caught.value
    assert exc.code() is code
    err = errors.from_rpc_error(exc)
    assert type(err) is CLASSES[code]
    assert err.code is code
    assert err.message == exc.details()
    assert err.message


def test_from_rpc_error_of_a_real_failed_aio_call() -> None:
    """from_rpc_error on a failed grpc.aio call keeps the call's code and details."""

    async def call(target: str) -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = operations_pb2_grpc.OperationsStub(channel)
            try:
                await stub.GetOperation(
                    operations_pb2.GetOperationRequest(name="operations/gone"), timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                return exc
        raise AssertionError("the call succeeded")

    with serve() as srv:
        exc = asyncio.run(call(srv.target))
    err = errors.from_rpc_error(exc)
    assert type(err) is errors.NotFound
    assert err.message == exc.details()
    assert "operations/gone" in err.message


def test_from_rpc_error_without_a_code_is_unknown() -> None:
    """An RpcError that is not a Call (no code/details) becomes Unknown with no message."""
    err = errors.from_rpc_error(grpc.RpcError())
    assert type(err) is errors.Unknown
    assert err.message == ""
