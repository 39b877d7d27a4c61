"""A Hypothesis state machine checks lrofw.Manager's programmatic API against a dict model.

The machine is built by :func:`manager_machine` from a factory, so the same rules can later run
against a Manager over any store: write a ``make_*_manager(clock)`` and one more test function.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
import tls_pb2
from google.longrunning import operations_proto_pb2 as operations_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

import lrofw
from lrofw import errors

Operation = operations_pb2.Operation
Metadata = tls_pb2.ProvisionDutMetadata
Response = tls_pb2.ProvisionDutResponse

TTL = 100.0
#: A realistic epoch time; steps are multiples of 0.5 s, exact in binary floating point.
START = 1_700_000_000.0
METHODS = ("/chromiumos.config.api.test.tls.Common/ProvisionDut", "/local/Create", "")
PAGE_SIZES = (1, 2, 3, 7)
NEVER_CREATED = f"operations/{uuid.UUID(int=0)}"
NON_OK = [code for code in grpc.StatusCode if code is not grpc.StatusCode.OK]

SETTINGS = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class FakeClock:
    """Wall-clock time that moves only when a test says so."""

    def __init__(self, start: float = START) -> None:
        self.value = start

    def now(self) -> float:
        """Returns the current fake time."""
        return self.value

    def advance(self, seconds: float) -> None:
        """Moves the time forward."""
        assert seconds >= 0
        self.value += seconds


def make_manager(clock: Callable[[], float]) -> lrofw.Manager:
    """The Manager under test: in-memory store, fake clock, no background expiry."""
    return lrofw.Manager(clock=clock, ttl=TTL, expiry_interval=3600.0, max_workers=1)


def packed(message: Metadata | Response) -> any_pb2.Any:
    """Packs a message as the manager does."""
    out = any_pb2.Any()
    out.Pack(message)
    return out


def frozen(op: Operation) -> bytes:
    """The bytes a done operation must keep forever."""
    return op.SerializeToString(deterministic=True)


@dataclass
class Expected:
    """What the model knows of one operation."""

    name: str
    method: str
    created: int
    metadata: any_pb2.Any | None = None
    response: any_pb2.Any | None = None
    error: status_pb2.Status | None = None
    finish_time: float | None = None
    bytes_at_finish: bytes | None = None

    @property
    def done(self) -> bool:
        """Whether the op has finished."""
        return self.finish_time is not None

    def operation(self) -> Operation:
        """The Operation message the manager must return for this op."""
        op = Operation(name=self.name, done=self.done)
        if self.metadata is not None:
            op.metadata.CopyFrom(self.metadata)
        if self.response is not None:
            op.response.CopyFrom(self.response)
        if self.error is not None:
            op.error.CopyFrom(self.error)
        return op


texts = st.text(alphabet="abcXYZ019 -_/é", max_size=12)
metadatas = st.builds(Metadata, stage=texts, percent=st.integers(0, 100))
responses = st.builds(Response, installed_image=texts)
details = st.lists(metadatas.map(packed), max_size=2)
advances = st.sampled_from([0.0, 0.5, 1.0, 10.0, TTL / 2, TTL - 0.5, TTL, TTL + 0.5, 3 * TTL])


def manager_machine(
    make: Callable[[Callable[[], float]], lrofw.Manager],
) -> type[RuleBasedStateMachine]:
    """Builds the state machine class for Managers made by ``make(clock)``."""

    class ManagerMachine(RuleBasedStateMachine):
        """Drives one Manager and a dict model side by side."""

        names = Bundle("names")

        def __init__(self) -> None:
            super().__init__()
            self.clock = FakeClock()
            self.manager = make(self.clock.now)
            self.ttl = self.manager.ttl
            self.ops: dict[str, Expected] = {}  # insertion order = creation order
            self.gone: set[str] = set()
            self.created = 0
            self.steps = 0

        def teardown(self) -> None:
            """Closes the manager after each example."""
            self.manager.close(grace=1.0)

        # --- helpers --------------------------------------------------------------------------

        def finish(
            self, name: str, response: any_pb2.Any | None, error: status_pb2.Status | None
        ) -> None:
            """Records that ``name`` finished now, and the bytes it must keep."""
            entry = self.ops[name]
            entry.response, entry.error = response, error
            entry.finish_time = self.clock.now()
            entry.bytes_at_finish = frozen(entry.operation())

        def expect_not_found(self, call: Callable[[], object]) -> None:
            """Asserts that ``call`` raises lrofw.errors.NotFound."""
            try:
                call()
            except errors.NotFound:
                return
            raise AssertionError("expected NOT_FOUND")

        def expire_model(self, now: float) -> int:
            """Applies the manager's expiry rule to the model; returns how many expired."""
            cutoff = now - self.ttl  # the manager's cutoff; stores remove finish_time <= cutoff
            expired = [
                n
                for n, e in self.ops.items()
                if e.finish_time is not None and e.finish_time <= cutoff
            ]
            for name in expired:
                del self.ops[name]
                self.gone.add(name)
            return len(expired)

        def listed(self, filter: str, page_size: int) -> list[Operation]:
            """Lists every page with ``filter``, checking each page on the way."""
            ops: list[Operation] = []
            token = ""
            for _ in range(len(self.ops) + 2):
                page, token = self.manager.list(
                    filter=filter, page_size=page_size, page_token=token
                )
                assert len(page) <= page_size
                assert page or not token, "an empty page that is not the last"
                ops.extend(page)
                if not token:
                    return ops
            raise AssertionError("listing did not end")

        # --- rules ----------------------------------------------------------------------------

        @initialize(target=names, count=st.integers(1, 6))
        def start(self, count: int) -> MultipleResults[str]:
            """Start with a few unfinished ops, so every example has some to work on."""
            assert self.manager.list() == ([], "")
            return multiple(*(self.create(METHODS[i % len(METHODS)], None) for i in range(count)))

        @rule(target=names, method=st.sampled_from(METHODS), metadata=st.none() | metadatas)
        def create(self, method: str, metadata: Metadata | None) -> str:
            op = self.manager.new_operation(method=method, metadata=metadata)
            assert op.name.startswith("operations/")
            assert op.name not in self.ops and op.name not in self.gone
            self.created += 1
            entry = Expected(op.name, method, self.created)
            if metadata is not None:
                entry.metadata = packed(metadata)
            self.ops[op.name] = entry
            assert op == entry.operation()
            return op.name

        @rule(name=names, metadata=metadatas)
        def report(self, name: str, metadata: Metadata) -> None:
            entry = self.ops.get(name)
            if entry is None:
                self.expect_not_found(lambda: self.manager.set_metadata(name, metadata))
                return
            assert self.manager.set_metadata(name, metadata) is not entry.done
            if not entry.done:
                entry.metadata = packed(metadata)

        @rule(name=names, response=responses)
        def complete(self, name: str, response: Response) -> None:
            entry = self.ops.get(name)
            if entry is None:
                self.expect_not_found(lambda: self.manager.set_result(name, response))
                return
            was_done = entry.done
            assert self.manager.set_result(name, response) is not was_done
            if not was_done:
                self.finish(name, packed(response), None)

        @rule(
            name=names,
            code=st.sampled_from(NON_OK),
            message=texts,
            details=details,
            as_status=st.booleans(),
        )
        def fail(
            self,
            name: str,
            code: grpc.StatusCode,
            message: str,
            details: list[any_pb2.Any],
            as_status: bool,
        ) -> None:
            status = status_pb2.Status(code=code.value[0], message=message, details=details)
            error = status if as_status else lrofw.OperationError(code, message, details)
            entry = self.ops.get(name)
            if entry is None:
                self.expect_not_found(lambda: self.manager.set_error(name, error))
                return
            was_done = entry.done
            assert self.manager.set_error(name, error) is not was_done
            if not was_done:
                self.finish(name, None, status)

        @rule(name=names)
        def cancel(self, name: str) -> None:
            entry = self.ops.get(name)
            if entry is None:
                self.expect_not_found(lambda: self.manager.cancel(name))
                return
            was_done = entry.done
            op = self.manager.cancel(name)
            if not was_done:
                assert op.error.code == grpc.StatusCode.CANCELLED.value[0]
                assert op.error.message
                assert not op.error.details
                self.finish(name, None, op.error)
            assert op == entry.operation()

        @rule(name=names)
        def delete(self, name: str) -> None:
            if name not in self.ops:
                self.expect_not_found(lambda: self.manager.delete(name))
                return
            self.manager.delete(name)
            del self.ops[name]
            self.gone.add(name)

        @rule(name=names)
        def wait_zero(self, name: str) -> None:
            entry = self.ops.get(name)
            if entry is None:
                self.expect_not_found(lambda: self.manager.wait(name, timeout=0))
                return
            assert self.manager.wait(name, timeout=0) == entry.operation()

        @rule(seconds=advances)
        def advance(self, seconds: float) -> None:
            self.clock.advance(seconds)

        @rule(use_clock=st.booleans())
        def expire(self, use_clock: bool) -> None:
            now = self.clock.now()
            removed = self.manager.expire() if use_clock else self.manager.expire(now=now)
            assert removed == self.expire_model(now)

        @rule(ahead=advances)
        def expire_at(self, ahead: float) -> None:
            """expire(now=...) with a time ahead of the clock, which stays where it is."""
            now = self.clock.now() + ahead
            assert self.manager.expire(now=now) == self.expire_model(now)

        @rule(name=names, offset=st.sampled_from([-0.5, 0.0, 0.5]))
        def expire_at_the_boundary(self, name: str, offset: float) -> None:
            """Move the clock to just before, exactly at or just after an op's expiry."""
            entry = self.ops.get(name)
            if entry is None or entry.finish_time is None:
                return
            target = entry.finish_time + self.ttl + offset
            if target < self.clock.now():
                return
            self.clock.advance(target - self.clock.now())
            assert self.manager.expire() == self.expire_model(self.clock.now())
            assert (name in self.ops) is (offset < 0)

        @rule(
            done=st.booleans(),
            method=st.sampled_from(METHODS),
            page_size=st.sampled_from(PAGE_SIZES),
        )
        def list_filtered(self, done: bool, method: str, page_size: int) -> None:
            text = f'done = {str(done).lower()} AND method = "{method}"'
            wanted = [
                e.operation()
                for e in reversed(self.ops.values())
                if e.done is done and e.method == method
            ]
            assert self.listed(text, page_size) == wanted

        # --- invariants -----------------------------------------------------------------------

        @invariant()
        def every_op_is_as_the_model_says(self) -> None:
            for name, entry in self.ops.items():
                op = self.manager.get(name)
                assert op == entry.operation(), name
                if op.done:
                    assert op.HasField("response") != op.HasField("error")
                    assert frozen(op) == entry.bytes_at_finish
                else:
                    assert not op.HasField("response") and not op.HasField("error")

        @invariant()
        def ops_not_in_the_model_are_not_found(self) -> None:
            for name in [*self.gone, NEVER_CREATED]:
                self.expect_not_found(lambda name=name: self.manager.get(name))
                self.expect_not_found(lambda name=name: self.manager.wait(name, timeout=0))
                self.expect_not_found(lambda name=name: self.manager.set_result(name, Response()))
                self.expect_not_found(lambda name=name: self.manager.set_metadata(name, Metadata()))

        @invariant()
        def list_pages_through_the_model_newest_first(self) -> None:
            self.steps += 1
            page_size = PAGE_SIZES[self.steps % len(PAGE_SIZES)]
            wanted = [e.operation() for e in reversed(self.ops.values())]
            assert self.listed("", page_size) == wanted

    return ManagerMachine


MemoryManagerMachine = manager_machine(make_manager)


def test_memory_manager_matches_the_model(caplog: pytest.LogCaptureFixture) -> None:
    """A Manager over the default in-memory store behaves as the dict model says."""
    caplog.set_level(logging.ERROR, logger="lrofw")  # refused completions are expected here
    run_state_machine_as_test(MemoryManagerMachine, settings=SETTINGS)


def test_expiry_boundary_is_inclusive() -> None:
    """A finished op expires when now - finish_time == ttl exactly, not a half second before."""
    clock = FakeClock()
    with make_manager(clock.now) as manager:
        kept = manager.new_operation().name
        name = manager.new_operation().name
        assert manager.set_result(name, Response())
        clock.advance(TTL - 0.5)
        assert manager.expire() == 0
        clock.advance(0.5)
        assert manager.expire() == 1
        assert [op.name for op in manager.list()[0]] == [kept]
        clock.advance(100 * TTL)
        assert manager.expire() == 0
        assert not manager.get(kept).done
