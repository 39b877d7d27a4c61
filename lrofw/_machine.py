"""``OperationMachine``: a Hypothesis state machine that property-tests a ``@long_running`` method.

Each Hypothesis example serves a copy of the user's servicer with :func:`lrofw.testing.serve` (one
server and manager per example: a few ms, and no example sees another's operations or handlers)
and drives it over real RPCs: creates through the method's full path (a generic unary call, so no
generated stub is needed), then Get, Wait, Cancel, Delete and List on the operations made. Every
answer is checked against what was seen before (AIP-151); List steps, deletes and the end of each
example check that List shows exactly the live operations.

Hypothesis needs the steps it draws to be the same on every run of one example, so a failure
whose moment depends on timing (how an operation ended, the user's ``check``) is kept and raised
at teardown, after every step ran; contract failures are raised from one place (:func:`_fail`).
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import functools
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn, TypeVar

import grpc
from google.longrunning import operations_pb2_grpc
from google.longrunning import operations_proto_pb2 as operations_pb2
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, multiple, precondition, rule

from . import decorator
from ._machine_text import LogTap, Shown, code, outcome, result
from ._runs import MethodRunner
from ._serving import Served, serve

Operation = operations_pb2.Operation

F = TypeVar("F", bound=Callable[..., Any])

#: Seconds any one RPC may take before the machine gives up on it (never a hang).
RPC_TIMEOUT = 30.0
_INTERNAL = grpc.StatusCode.INTERNAL.value[0]
_REFUSED_AS_BUGS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
_STOP_ADVICE = (
    "a handler must stop when cancelled: check op.cancelled between steps, sleep with "
    "op.sleep(...) (await op.sleep(...) in async def), or raise lrofw.OperationCancelled"
)


def _fail(message: str) -> NoReturn:
    raise AssertionError(message)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


@dataclass
class _Op:
    """What the machine knows of one operation it created."""

    request: Message
    done: Operation | None = None  # the first done state seen
    deleted: bool = False


def _step(method: F) -> F:
    """Marks the machine broken when a step raises, so that teardown only cleans up (a check
    failing there would hide the step's failure)."""

    @functools.wraps(method)
    def step(self: OperationMachine, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            self._broken = True
            raise

    return step  # type: ignore[return-value]


class OperationMachine(RuleBasedStateMachine):
    """A Hypothesis state machine that property-tests one ``@long_running`` method of a servicer.

    Subclass it and set ``servicer`` (an instance), ``method`` (the decorated method's name) and
    ``requests`` (a strategy of request messages); ``MyMachine.TestCase`` is then a
    ``unittest.TestCase`` that pytest collects. Each example serves a shallow copy of
    ``servicer`` (``copy.copy``: an instance is registered with one manager, and each example
    has its own server and manager) with :func:`lrofw.testing.serve`, and interleaves create,
    get, wait, cancel, delete and list on several operations, checking every answer:

    - done never goes back, and a done operation's result never changes;
    - a done operation has exactly one of response / error, an unfinished one neither; the
      response and metadata are of the method's declared types; an error's code is not OK;
    - a cancelled operation is done within ``cancel_within`` seconds (CANCELLED unless it had
      already finished), and its handler stops within that time too;
    - after DeleteOperation, Get, Wait, Cancel and Delete answer NOT_FOUND and List leaves it out;
    - List shows exactly the operations created and not deleted, and agrees with Get;
    - no INTERNAL (a handler that raised an unexpected exception), unless ``allow_internal``;
    - ``check(request, operation)``, your own postconditions, holds for every finished operation.

    At the end of each example it waits up to ``wait_timeout`` for unfinished operations, then
    cancels the rest (so every handler is checked to stop when cancelled); failures about how an
    operation ended (INTERNAL, ``check``) are raised there, whenever they were first seen, so
    that the steps of an example do not depend on timing. Failures print the shrunk steps as
    code. Set Hypothesis settings with ``MyMachine.TestCase.settings = settings(...)``.

    Attributes:
        servicer: an instance of your servicer class.
        method: the name of its ``@long_running`` method, e.g. ``"ProvisionDut"``.
        requests: a Hypothesis strategy of that method's request messages.
        aio: serve from a ``grpc.aio`` server (needed for ``async def`` handlers).
        cancel_within: seconds a cancelled operation and its handler may take to end.
        allow_internal: accept operations (and create RPCs) that end INTERNAL.
        wait_timeout: seconds one WaitOperation step waits (it returns early once done).

    Example:
        >>> class ProvisionMachine(OperationMachine):
        ...     servicer = Common(step_seconds=0.01)
        ...     method = "ProvisionDut"
        ...     requests = st.builds(tls_pb2.ProvisionDutRequest,
        ...                          name=st.sampled_from(["some host", "other host"]))
        >>> TestProvision = ProvisionMachine.TestCase
    """

    servicer: ClassVar[object]
    method: ClassVar[str]
    requests: ClassVar[st.SearchStrategy[Message]]
    aio: ClassVar[bool] = False
    cancel_within: ClassVar[float] = 2.0
    allow_internal: ClassVar[bool] = False
    wait_timeout: ClassVar[float] = 0.25

    operations = Bundle("operations")

    def __init__(self) -> None:
        super().__init__()
        spec = _method_spec(type(self))
        try:
            served = copy.copy(self.servicer)
        except Exception as exc:
            raise TypeError(
                f"{type(self).__name__} serves a copy of servicer in each example, but "
                f"copy.copy({type(self.servicer).__name__}) failed; give the class a __copy__"
            ) from exc
        self._ops: dict[str, _Op] = {}
        self._broken = False
        self._ended_badly: Exception | None = None
        self._tap = LogTap()
        with contextlib.ExitStack() as cleanup:
            logger = logging.getLogger("lrofw")
            logger.addHandler(self._tap)
            cleanup.callback(logger.removeHandler, self._tap)
            self._served: Served = cleanup.enter_context(serve(served, aio=self.aio))
            # Closed before serve closes it with its grace: a handler that ignores being
            # stopped must not hold up the next example.
            cleanup.callback(self._served.manager.close, 0)
            binding = decorator.binding_of(served)
            assert binding is not None  # serve registered it
            self._runner: MethodRunner = binding.runner(spec)
            channel = self._served.channel
            self._create_rpc = channel.unary_unary(
                self._runner.method,
                request_serializer=_serialize,
                response_deserializer=Operation.FromString,
            )
            self._stub = operations_pb2_grpc.OperationsStub(channel)
            self._cleanup = cleanup.pop_all()

    # --- your hook --------------------------------------------------------------------------

    def check(self, request: Any, operation: Operation) -> None:
        """Your postconditions on a finished operation (response or error), called once for each,
        with the request that created it; raise (e.g. ``assert``) to fail. Does nothing here.

        Example:
            >>> def check(self, request, operation):
            ...     if operation.HasField("response"):
            ...         response = tls_pb2.ProvisionDutResponse()
            ...         operation.response.Unpack(response)
            ...         assert response.installed_image == request.image_path
        """

    # --- the steps --------------------------------------------------------------------------

    @rule(target=operations, request=st.runner().flatmap(lambda m: m._drawn_requests()))
    @_step
    def create(self, request: Shown | Message) -> Any:
        """Call the method's RPC; a refused request (an RPC error) must create nothing."""
        message = request.message if isinstance(request, Shown) else request
        wanted = self._runner.request_type
        if wanted is not None and not isinstance(message, wanted):
            raise TypeError(
                f"requests drew a {type(message).__name__}, but {self.method} takes "
                f"{wanted.__name__}"
            )
        try:
            op = self._create_rpc(message, timeout=RPC_TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() in _REFUSED_AS_BUGS and not self.allow_internal:
                _fail(
                    f"the create RPC {self._runner.method} failed {exc.code().name} "
                    f"({exc.details()!r}) for {code(message)}; refuse bad requests with "
                    "validate= or lrofw.OperationError, or set allow_internal = True"
                )
            return multiple()
        known = self._ops.get(op.name)
        if not op.name or (known is not None and known.deleted):
            _fail(f"the create RPC returned {op.name!r}: not a new or live operation")
        if known is None:  # else an idempotent repeat (AIP-155): the same operation
            self._ops[op.name] = _Op(message)
        self._observe(op.name, op, "the create RPC")
        return op.name

    @rule(name=operations)
    @_step
    def get(self, name: str) -> None:
        """GetOperation."""
        self._get(name)

    @rule(name=operations)
    @_step
    def wait(self, name: str) -> None:
        """WaitOperation for ``wait_timeout`` seconds at most."""
        self._wait(name, self.wait_timeout)

    @rule(name=operations)
    @_step
    def cancel(self, name: str) -> None:
        """CancelOperation: then the operation and its handler must end within cancel_within."""
        if self._cancel(name):
            self._ends_after_cancel(name, "")

    @rule(name=operations)
    @_step
    def delete(self, name: str) -> None:
        """DeleteOperation: then NOT_FOUND everywhere."""
        request = operations_pb2.DeleteOperationRequest(name=name)
        if self._call("DeleteOperation", self._stub.DeleteOperation, request, name) is not None:
            self._ops[name].deleted = True
            self._get(name)
            self._wait(name, 0.0)
            self._cancel(name)
            self._list_all(0)

    # Listing before anything was created tests little, and makes leading steps that Hypothesis
    # does not shrink away when the failure is raised at teardown.
    @precondition(lambda self: bool(self._ops))
    @rule(page_size=st.sampled_from([0, 1, 2, 5]))
    @_step
    def list(self, page_size: int) -> None:
        """ListOperations page by page; each listed operation agrees with GetOperation."""
        for op in self._list_all(page_size):
            self._get(op.name)

    def teardown(self) -> None:
        """Wait up to ``wait_timeout`` for unfinished operations, raise the first failure about
        how one ended, cancel the rest and check that they end; then stop the server. (Only the
        last when a step failed.)"""
        with self._cleanup:
            if self._broken:
                return
            deadline = time.monotonic() + self.wait_timeout
            for name in self._unfinished():
                self._wait(name, max(0.0, deadline - time.monotonic()))
            if self._ended_badly is not None:
                raise self._ended_badly
            for name in self._unfinished():
                if self._cancel(name):
                    why = " (the machine cancels what is unfinished at the end of each example)"
                    self._ends_after_cancel(name, why)
            if self._ended_badly is not None:
                raise self._ended_badly
            self._list_all(0)

    # --- checks -------------------------------------------------------------------------------

    def _drawn_requests(self) -> st.SearchStrategy[Shown]:
        return self.requests.map(Shown)

    def _unfinished(self) -> builtins.list[str]:
        return [n for n, op in self._ops.items() if op.done is None and not op.deleted]

    def _call(self, what: str, call: Callable[..., Any], request: Message, name: str) -> Any:
        """Make an Operations RPC about ``name``: its answer, or None when it answered
        NOT_FOUND for a deleted operation (anything else unexpected fails)."""
        deleted = self._ops[name].deleted
        try:
            answer = call(request, timeout=RPC_TIMEOUT)
        except grpc.RpcError as exc:
            if deleted and exc.code() is grpc.StatusCode.NOT_FOUND:
                return None
            expected = " (expected NOT_FOUND: it was deleted)" if deleted else ""
            _fail(f"{what}({name}) failed {exc.code().name}: {exc.details()!r}{expected}")
        if deleted:
            _fail(f"{what}({name}) answered OK after DeleteOperation; expected NOT_FOUND")
        return answer

    def _get(self, name: str) -> None:
        request = operations_pb2.GetOperationRequest(name=name)
        op = self._call("GetOperation", self._stub.GetOperation, request, name)
        if op is not None:
            self._observe(name, op, "GetOperation")

    def _wait(self, name: str, seconds: float) -> Operation | None:
        request = operations_pb2.WaitOperationRequest(name=name, timeout=_duration(seconds))
        op: Operation | None = self._call("WaitOperation", self._stub.WaitOperation, request, name)
        if op is not None:
            self._observe(name, op, "WaitOperation")
        return op

    def _cancel(self, name: str) -> bool:
        request = operations_pb2.CancelOperationRequest(name=name)
        return self._call("CancelOperation", self._stub.CancelOperation, request, name) is not None

    def _ends_after_cancel(self, name: str, why: str) -> None:
        deadline = time.monotonic() + self.cancel_within
        op = self._wait(name, self.cancel_within)
        if op is not None and not op.done:
            _fail(f"{name} was not done {self.cancel_within}s after CancelOperation{why}")
        if not self._served.manager.registry.wait_gone(name, deadline - time.monotonic()):
            _fail(
                f"the {self.method} handler ignored cancellation: {name} was cancelled{why}, "
                f"but its handler was still running {self.cancel_within}s later "
                f"(cancel_within); {_STOP_ADVICE}"
            )

    def _list_all(self, page_size: int) -> builtins.list[Operation]:
        """Every operation ListOperations shows; exactly the live ones, each once."""
        listed: builtins.list[Operation] = []
        token = ""
        for _ in range(len(self._ops) + 2):
            request = operations_pb2.ListOperationsRequest(page_size=page_size, page_token=token)
            try:
                page = self._stub.ListOperations(request, timeout=RPC_TIMEOUT)
            except grpc.RpcError as exc:
                _fail(f"ListOperations failed {exc.code().name}: {exc.details()!r}")
            listed.extend(page.operations)
            token = page.next_page_token
            if not token:
                break
        else:
            _fail(f"ListOperations kept answering a next_page_token past {len(listed)} operations")
        names = [op.name for op in listed]
        live = {name for name, op in self._ops.items() if not op.deleted}
        extra = sorted(set(names) - live)
        if extra or len(set(names)) != len(names) or live - set(names):
            gone = [n for n in extra if n in self._ops]
            _fail(
                f"ListOperations (page_size={page_size}) shows {sorted(names)}; expected exactly "
                f"the live operations {sorted(live)}"
                + (f" ({gone} were deleted)" if gone else "")
                + (" (a refused create must create no operation)" if len(extra) > len(gone) else "")
            )
        for op in listed:
            self._observe(op.name, op, "ListOperations")
        return listed

    def _observe(self, name: str, op: Operation, how: str) -> None:
        """Check one state of ``name`` as ``how`` answered it, against what was seen before."""
        model = self._ops[name]
        where = f"{how} answered {name} {outcome(op)}"
        which = op.WhichOneof("result")
        if op.name != name:
            _fail(f"{how} for {name} answered an operation named {op.name!r}")
        if op.done and which is None:
            _fail(f"{where} with done=true: a done operation has a response or an error")
        if not op.done and which is not None:
            _fail(f"{where} with done=false: only a done operation has a result")
        self._check_types(op, where)
        if model.done is not None:
            if not op.done:
                _fail(f"{where} after it was done: done never goes back (AIP-151)")
            if result(op) != result(model.done):
                _fail(f"{where}; it was done with {outcome(model.done)}: a result never changes")
            return
        if not op.done:
            return
        model.done = copy.deepcopy(op)
        # A failure about how an operation ended is raised at teardown, not here: when it is
        # first seen depends on timing, and the steps Hypothesis draws must not.
        if op.error.code == _INTERNAL and not self.allow_internal:
            raised = self._tap.raised(name)
            self._later(
                f"{name} ended INTERNAL ({op.error.message!r}) for {code(model.request)}: "
                + (f"the handler raised {raised}" if raised else "an unexpected outcome")
                + "; raise lrofw.OperationError for expected failures, or set "
                "allow_internal = True"
            )
        try:
            self.check(model.request, copy.deepcopy(op))
        except Exception as exc:
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(f"(in check() of {name}, created by {code(model.request)})")
            self._ended_badly = self._ended_badly or exc

    def _later(self, message: str) -> None:
        """Keep a failure for teardown (the first one kept is raised)."""
        try:
            _fail(message)
        except AssertionError as exc:
            self._ended_badly = self._ended_badly or exc

    def _check_types(self, op: Operation, where: str) -> None:
        response_type = self._runner.response_type
        metadata_type = self._runner.metadata_type
        if op.HasField("response") and op.response.TypeName() != response_type.DESCRIPTOR.full_name:
            _fail(f"{where}, but {self.method} declares {response_type.DESCRIPTOR.full_name}")
        if op.HasField("error") and op.error.code == 0:
            _fail(f"{where}: an error's code must not be OK (0)")
        if (
            metadata_type is not None
            and op.HasField("metadata")
            and op.metadata.TypeName() != metadata_type.DESCRIPTOR.full_name
        ):
            _fail(
                f"{where} with metadata {op.metadata.TypeName()}, but {self.method} declares "
                f"{metadata_type.DESCRIPTOR.full_name}"
            )


def _method_spec(cls: type[OperationMachine]) -> decorator.MethodSpec:
    """Check a machine's class attributes; the spec of its method."""
    missing = [a for a in ("servicer", "method", "requests") if not hasattr(cls, a)]
    if missing:
        raise TypeError(
            f"{cls.__name__} must set {', '.join(missing)} (e.g. servicer = MyServicer(), "
            "method = 'MyMethod', requests = st.builds(MyRequest))"
        )
    if not isinstance(cls.requests, st.SearchStrategy):
        raise TypeError(f"{cls.__name__}.requests must be a Hypothesis strategy of requests")
    for what in ("cancel_within", "wait_timeout"):
        value = getattr(cls, what)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise TypeError(f"{cls.__name__}.{what} must be seconds >= 0, got {value!r}")
    servicer_type = type(cls.servicer)
    method = cls.method
    found = inspect.getattr_static(servicer_type, method, None) if isinstance(method, str) else None
    spec = decorator.spec_of(found)
    if spec is None:
        raise TypeError(
            f"{cls.__name__}.method must name a @long_running method of "
            f"{servicer_type.__name__}, got {method!r}"
        )
    if spec.is_async and not cls.aio:
        raise TypeError(
            f"{servicer_type.__name__}.{method} is an async def handler: "
            f"set aio = True on {cls.__name__}"
        )
    return spec
