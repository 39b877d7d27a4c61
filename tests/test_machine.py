"""lrofw.testing.OperationMachine: it passes the example's handlers and catches broken ones."""

from __future__ import annotations

import collections
import sys
import threading
import unittest
from typing import Any, ClassVar

import grpc
import pytest
import tls_pb2
import tls_pb2_grpc
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test
from servicer import AsyncCommon, Common, provision_dut

import lrofw
from lrofw.testing import OperationMachine

Request = tls_pb2.ProvisionDutRequest
Response = tls_pb2.ProvisionDutResponse

#: Small and deterministic: the same programs on every run, nothing kept between runs.
SETTINGS = settings(
    max_examples=15,
    stateful_step_count=12,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
#: For machines that fail: shorter programs shrink in fewer runs; no "explain" phase (it runs
#: more examples to say which lines only failing ones ran).
FAILING = settings(
    SETTINGS,
    max_examples=10,
    stateful_step_count=6,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
BAD_IMAGE = "gs://images/bad"
#: Known and unknown DUTs, an empty name (refused before any operation exists), repeated
#: request ids (AIP-155: the same operation again) and one image a broken handler trips on.
REQUESTS = st.builds(
    Request,
    name=st.sampled_from(["some host", "other host", ""]),
    image_path=st.sampled_from(["gs://images/a", "gs://images/b", BAD_IMAGE]),
    request_id=st.sampled_from(["", "", "retry-1"]),
)


def outcome(operation: Any) -> str:
    """``response`` or the error's code name, for counting."""
    if operation.HasField("response"):
        return "response"
    return {code.value[0]: code.name for code in grpc.StatusCode}[operation.error.code]


class ExampleMachine(OperationMachine):
    """The TLS example's Common servicer, with a check that an installed image is the one asked."""

    servicer = Common(step_seconds=0.005)
    method = "ProvisionDut"
    requests = REQUESTS
    seen: ClassVar[collections.Counter[str]] = collections.Counter()

    def check(self, request: Any, operation: Any) -> None:
        type(self).seen[outcome(operation)] += 1
        if operation.HasField("response"):
            response = Response()
            assert operation.response.Unpack(response)
            assert response.installed_image == request.image_path


class AsyncExampleMachine(ExampleMachine):
    """The same on a grpc.aio server, with the example's async def handler."""

    servicer = AsyncCommon(step_seconds=0.005)
    aio = True
    seen: ClassVar[collections.Counter[str]] = collections.Counter()


ExampleMachine.TestCase.settings = SETTINGS
#: pytest collects the unittest class Hypothesis makes.
TestExampleMachine = ExampleMachine.TestCase


@pytest.mark.parametrize("machine", [ExampleMachine, AsyncExampleMachine], ids=["grpc", "aio"])
def test_the_examples_handlers_pass(machine: type[ExampleMachine]) -> None:
    """Common and AsyncCommon pass; their operations end with responses and NOT_FOUND errors."""
    machine.seen.clear()
    run_state_machine_as_test(machine, settings=SETTINGS)
    assert machine.seen["response"] > 0
    assert machine.seen["NOT_FOUND"] > 0
    assert set(machine.seen) <= {"response", "NOT_FOUND", "CANCELLED"}


@pytest.mark.parametrize("aio", [False, True], ids=["grpc", "aio"])
def test_handlers_that_stop_when_cancelled_pass(aio: bool) -> None:
    """Handlers still running at every cancel (60 s stages) stop at once: the machine passes."""
    seen: collections.Counter[str] = collections.Counter()

    class SlowMachine(OperationMachine):
        servicer = AsyncCommon(step_seconds=60) if aio else Common(step_seconds=60)
        method = "ProvisionDut"
        requests = st.builds(Request, name=st.just("some host"))
        wait_timeout = 0.01

        def check(self, request: Any, operation: Any) -> None:
            seen[outcome(operation)] += 1

    SlowMachine.aio = aio
    run_state_machine_as_test(SlowMachine, settings=SETTINGS)
    assert seen["CANCELLED"] > 0
    assert set(seen) == {"CANCELLED"}


class Stubborn(tls_pb2_grpc.CommonServicer):
    """Ignores cancellation: it works on for a second (or until the test lets it go), whatever
    op.cancelled says."""

    release = threading.Event()

    @provision_dut
    def ProvisionDut(self, request: Any, op: lrofw.OperationContext) -> Any:
        self.release.wait(1.0)
        return Response(installed_image=request.image_path)


class Fragile(tls_pb2_grpc.CommonServicer):
    """Provisions, except that one image makes it raise an unexpected exception."""

    @provision_dut
    def ProvisionDut(self, request: Any, op: lrofw.OperationContext) -> Any:
        if request.image_path == BAD_IMAGE:
            raise KeyError(request.image_path)
        op.sleep(0.005)
        return Response(installed_image=request.image_path)


def failure(machine: type[OperationMachine]) -> tuple[str, list[str]]:
    """Run ``machine``, which must fail: its message, and the shrunk steps Hypothesis printed."""
    with pytest.raises(AssertionError) as info:
        run_state_machine_as_test(machine, settings=FAILING)
    notes = list(getattr(info.value, "__notes__", []))
    start = next(i for i, note in enumerate(notes) if note.startswith("state = "))
    end = notes.index("state.teardown()", start)
    return str(info.value), notes[start : end + 1]


def test_a_handler_that_ignores_cancellation_fails() -> None:
    """A handler still running cancel_within after a cancel fails, and the message says why."""

    class StubbornMachine(OperationMachine):
        servicer = Stubborn()
        method = "ProvisionDut"
        requests = st.builds(Request, name=st.just("some host"))
        cancel_within = 0.02
        wait_timeout = 0.01

    Stubborn.release.clear()
    try:
        message, steps = failure(StubbornMachine)
    finally:
        Stubborn.release.set()
    assert "the ProvisionDut handler ignored cancellation" in message
    assert "op.cancelled" in message
    assert steps[1] == "operations_0 = state.create(request=ProvisionDutRequest(name='some host'))"


def test_a_handler_that_raises_for_one_input_fails_and_shrinks_to_it() -> None:
    """An unexpected exception for one image is INTERNAL; Hypothesis shrinks to that request."""

    class FragileMachine(OperationMachine):
        servicer = Fragile()
        method = "ProvisionDut"
        requests = REQUESTS

    message, steps = failure(FragileMachine)
    shrunk = f"ProvisionDutRequest(name='some host', image_path='{BAD_IMAGE}')"
    assert "ended INTERNAL (" in message
    assert f"for {shrunk}: the handler raised KeyError: '{BAD_IMAGE}'" in message
    creates = [step for step in steps if "state.create(" in step]
    assert creates[-1].endswith(f"state.create(request={shrunk})")
    assert all(BAD_IMAGE not in step for step in creates[:-1])
    # The steps are code: run as printed, they fail the same way.
    with pytest.raises(AssertionError, match="ended INTERNAL"):
        exec(
            "\n".join(steps),
            {"FragileMachine": FragileMachine, "ProvisionDutRequest": Request},
        )


def test_allow_internal_accepts_it() -> None:
    """allow_internal = True lets the same handler pass."""

    class TolerantMachine(OperationMachine):
        servicer = Fragile()
        method = "ProvisionDut"
        requests = REQUESTS
        allow_internal = True

    run_state_machine_as_test(TolerantMachine, settings=SETTINGS)


def test_a_failing_check_hook_is_reported() -> None:
    """The user's check() failing fails the test with its own message, shrunk to its request."""

    class StrictMachine(OperationMachine):
        servicer = Common(step_seconds=0.005)
        method = "ProvisionDut"
        requests = REQUESTS

        def check(self, request: Any, operation: Any) -> None:
            assert outcome(operation) != "NOT_FOUND", f"{request.name} was not found"

    with pytest.raises(AssertionError, match="other host was not found") as info:
        run_state_machine_as_test(StrictMachine, settings=FAILING)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "state.create(request=ProvisionDutRequest(name='other host'" in notes
    if sys.version_info >= (3, 11):
        assert "created by ProvisionDutRequest(name='other host'" in notes


def test_testcase_is_a_unittest_class() -> None:
    """MyMachine.TestCase is what pytest collects: a unittest.TestCase with runTest."""
    assert issubclass(ExampleMachine.TestCase, unittest.TestCase)
    assert ExampleMachine.TestCase.settings is SETTINGS


class NotLongRunning(tls_pb2_grpc.CommonServicer):
    """A servicer whose ProvisionDut is a plain gRPC method."""


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"method": "ProvisionDut", "requests": REQUESTS}, "must set servicer"),
        ({"servicer": Common(), "method": "Nope", "requests": REQUESTS}, "must name a @long_run"),
        (
            {"servicer": NotLongRunning(), "method": "ProvisionDut", "requests": REQUESTS},
            "must name a @long_running method of NotLongRunning",
        ),
        ({"servicer": Common(), "method": "ProvisionDut", "requests": [Request()]}, "strategy"),
        (
            {"servicer": AsyncCommon(), "method": "ProvisionDut", "requests": REQUESTS},
            "is an async def handler: set aio = True on Bad",
        ),
        (
            {
                "servicer": Common(),
                "method": "ProvisionDut",
                "requests": REQUESTS,
                "cancel_within": -1,
            },
            "cancel_within must be seconds >= 0",
        ),
    ],
)
def test_a_bad_machine_is_a_type_error(attributes: dict[str, Any], message: str) -> None:
    """Missing or wrong class attributes are a TypeError that says which."""
    machine = type("Bad", (OperationMachine,), attributes)
    with pytest.raises(TypeError, match=message):
        machine()


def test_requests_of_another_type_are_a_type_error() -> None:
    """A strategy drawing the wrong message type is a TypeError naming both types."""

    class WrongMachine(OperationMachine):
        servicer = Common()
        method = "ProvisionDut"
        requests = st.just(Response())

    with pytest.raises(TypeError, match="drew a ProvisionDutResponse, but ProvisionDut takes"):
        run_state_machine_as_test(WrongMachine, settings=FAILING)


def test_without_hypothesis_the_import_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """lrofw.testing imports without hypothesis; OperationMachine then names the extra."""
    import lrofw.testing

    for module in [m for m in sys.modules if m == "hypothesis" or m.startswith("hypothesis.")]:
        monkeypatch.setitem(sys.modules, module, None)  # type: ignore[arg-type]
    monkeypatch.delitem(sys.modules, "lrofw._machine")
    assert callable(lrofw.testing.serve)
    with pytest.raises(ImportError, match=r"pip install 'lrofw\[testing\]'"):
        from lrofw.testing import OperationMachine as _  # noqa: F401
