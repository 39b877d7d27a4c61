"""Fuzzing over the wire (issue 9): Hypothesis-made requests and raw bytes for the create RPC and
the five Operations RPCs, on a ``grpc.server`` and a ``grpc.aio`` server. No answer is INTERNAL
or UNKNOWN, every call answers before its deadline (a hang fails as DEADLINE_EXCEEDED), and each
server still creates and finishes an operation afterwards.

Bounded for CI: one server per kind for the module, 100 examples per test (about 15 s in all),
no example database (``database=None``). Hunt longer with ``LROFW_FUZZ_EXAMPLES=5000``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import tls_pb2
from factories import METHOD, create, finished, list_ops, served
from google.longrunning import operations_pb2
from google.protobuf import descriptor, duration_pb2
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lrofw
from lrofw.testing import Served

#: Seconds any one call may take; far above what any answer needs, so only a hang reaches it.
CALL_DEADLINE = 10.0

#: Codes a hostile or careless request may get. INTERNAL, UNKNOWN (a leaked exception) and
#: DEADLINE_EXCEEDED (a hang) are failures, as is anything else not listed.
ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
    }
)

#: Texts that only an exception's own message would put in a status' details.
LEAKS = ("Traceback", "Exception", "Error parsing", "DecodeError", "Unexpected <class")

FUZZ = settings(
    max_examples=int(os.environ.get("LROFW_FUZZ_EXAMPLES", "100")),
    deadline=None,  # one example is a network round trip, sometimes a short wait
    database=None,  # nothing written under .hypothesis/
    suppress_health_check=[HealthCheck.too_slow],  # examples are round trips, not slow data
)

OPERATIONS = "/google.longrunning.Operations/"
lro = operations_pb2


# --- one server per kind for the module -----------------------------------------------------------


def _validate(request: tls_pb2.ProvisionDutRequest) -> None:
    if not request.name:
        raise ValueError("name must not be empty")


def _finishes_at_once(request: Any, op: lrofw.OperationContext) -> object:
    return tls_pb2.ProvisionDutResponse(installed_image=request.image_path)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "aio"])
def srv(request: pytest.FixtureRequest) -> Iterator[Served]:
    """A server whose ProvisionDut validates, takes request ids and finishes at once; waits are
    capped at 50 ms so that fuzzed waits on unfinished operations stay short."""
    manager = lrofw.Manager(max_wait=0.05, max_queued=10_000)
    with served(
        _finishes_at_once,
        manager=manager,
        aio=request.param,
        validate=_validate,
        request_id=lambda r: r.request_id,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def names(srv: Served) -> list[str]:
    """Names of real operations on ``srv``: finished ones, and one that never finishes."""
    done = [finished(srv, create(srv, f"dut-{i}").name).name for i in range(3)]
    return [*done, srv.manager.new_operation().name]


@pytest.fixture(scope="module")
def token(srv: Served, names: list[str]) -> str:
    """A real page token of ``srv``."""
    return list_ops(srv, page_size=1).next_page_token


# --- what is sent ---------------------------------------------------------------------------------

# Protobuf strings are UTF-8: lone surrogates cannot be sent, everything else can.
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=64)
long_texts = st.integers(1000, 5000).flatmap(
    lambda n: st.sampled_from("xé/日\x00").map(lambda c: c * n)
)
int32s = st.one_of(
    st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1)
)
int64s = st.one_of(
    st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63)]), st.integers(-(2**63), 2**63 - 1)
)


def op_names(real: list[str]) -> st.SearchStrategy[str]:
    """Operation names: real ones, their prefixes and extensions, the collection, and noise."""
    return st.one_of(
        st.sampled_from(real),
        st.sampled_from(real).flatmap(lambda n: st.integers(0, len(n)).map(lambda i: n[:i])),
        st.tuples(st.sampled_from(real), texts).map("".join),
        texts.map(lambda t: "operations/" + t),
        st.sampled_from(["", "operations", "operations/", "/", "operations//x", " operations/x"]),
        texts,
        long_texts,
        long_texts.map(lambda t: "operations/" + t),
    )


TOKENS = ["done", "error.code", "method", "name", "state", "response", "metadata", "AND", "OR"]
TOKENS += ["NOT", "and", "or", "not", "(", ")", "=", "!=", "<", "<=", ">", ">=", ":", "-", "*"]
TOKENS += ["true", "false", "TRUE", "0", "1", "-1", "2147483648", "1e3", "0x10", "CANCELLED"]
TOKENS += ["OK", "'x'", '"x"', '"\\"', "'\\q'", "\\", '"', "'", "operations/x", METHOD, "٣"]


def filters() -> st.SearchStrategy[str]:
    """Filters: grammar-ish token soups (often valid), deep nesting, and plain noise."""
    soup = st.lists(st.one_of(st.sampled_from(TOKENS), texts), max_size=12)
    return st.one_of(
        st.tuples(soup, st.sampled_from([" ", "", "  "])).map(lambda s: s[1].join(s[0])),
        st.integers(0, 60).map(lambda n: "(" * n + "done = true" + ")" * n),
        st.integers(0, 60).map(lambda n: "NOT " * n + "done = true"),
        texts,
        long_texts,
    )


def page_tokens(real: str) -> st.SearchStrategy[str]:
    """Page tokens: a real one, it altered at one character, cut short, and made-up ones."""
    urlsafe = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_="

    def altered(at: int, char: str) -> str:
        return real[:at] + char + real[at + 1 :]

    return st.one_of(
        st.just(real),
        st.tuples(st.integers(0, max(0, len(real) - 1)), st.sampled_from(urlsafe)).map(
            lambda a: altered(*a)
        ),
        st.integers(0, len(real)).map(lambda i: real[:i]),
        st.text(urlsafe, min_size=40, max_size=48),
        texts,
        long_texts,
    )


durations = st.builds(duration_pb2.Duration, seconds=int64s, nanos=int32s) | st.builds(
    duration_pb2.Duration,
    seconds=st.integers(-2, 2),
    nanos=st.integers(-(10**9), 10**9),
)


def _field_values(field: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    """Values of any type a field may hold, from its descriptor."""
    kind = field.type
    if kind == field.TYPE_STRING:
        return texts
    if kind == field.TYPE_BOOL:
        return st.booleans()
    if kind in (field.TYPE_INT32, field.TYPE_SINT32, field.TYPE_SFIXED32):
        return int32s
    if kind in (field.TYPE_INT64, field.TYPE_SINT64, field.TYPE_SFIXED64):
        return int64s
    if kind == field.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == field.TYPE_MESSAGE and field.message_type.full_name == "google.protobuf.Duration":
        return durations
    raise NotImplementedError(f"no strategy for {field.full_name}")  # a new field: add one


def messages(cls: type[Message], **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Message]:
    """Messages of ``cls`` with any subset of its fields set: from ``fields`` where given, else
    from the field's type (so a field added to the proto is fuzzed too)."""
    optional = {
        f.name: fields[f.name] if f.name in fields else _field_values(f)
        for f in cls.DESCRIPTOR.fields
    }
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: cls(**values))


def requests(rpc: str, real: list[str], token: str) -> st.SearchStrategy[Message]:
    """Requests for ``rpc`` (a method name, ``ProvisionDut`` for the create RPC)."""
    name = op_names(real)
    if rpc == "ProvisionDut":
        ids = st.one_of(texts, st.sampled_from(["", "id-1", "id-2"]), long_texts)
        duts = st.one_of(texts, st.sampled_from(["", "dut", "some host"]), long_texts)
        return messages(tls_pb2.ProvisionDutRequest, name=duts, request_id=ids)
    if rpc == "ListOperations":
        return messages(
            lro.ListOperationsRequest,
            name=st.one_of(name, st.sampled_from(["", "operations"])),
            filter=filters(),
            page_token=page_tokens(token),
        )
    request_type = {
        "GetOperation": lro.GetOperationRequest,
        "WaitOperation": lro.WaitOperationRequest,
        "CancelOperation": lro.CancelOperationRequest,
        "DeleteOperation": lro.DeleteOperationRequest,
    }[rpc]
    return messages(request_type, name=name)


def raw_bytes(valid: st.SearchStrategy[Message]) -> st.SearchStrategy[bytes]:
    """Bytes: random ones, deeply nested groups, and valid encodings cut short, with a byte
    changed, or with junk after them (the parser's edge cases: bad tags, lengths past the end,
    broken UTF-8, too deep)."""

    def cut(data: bytes, at: int) -> bytes:
        return data[: at % (len(data) + 1)]

    def flip(data: bytes, at: int, byte: int) -> bytes:
        if not data:
            return bytes([byte])
        at %= len(data)
        return data[:at] + bytes([byte]) + data[at + 1 :]

    def nested(depth: int, field: int) -> bytes:  # groups in groups: the parser's depth limit
        return bytes([field << 3 | 3]) * depth + bytes([field << 3 | 4]) * depth

    encoded = valid.map(lambda m: m.SerializeToString())
    index, byte = st.integers(0, 2**16), st.integers(0, 255)
    return st.one_of(
        st.builds(nested, st.integers(90, 5000), st.integers(1, 15)),
        st.binary(max_size=256),
        st.builds(cut, encoded, index),
        st.builds(flip, encoded, index, byte),
        st.builds(bytes.__add__, encoded, st.binary(min_size=1, max_size=16)),
        st.sampled_from(
            [b"\xff", b"\x0b", b"\x0a\x80", b"\x0a\x01\xff", b"\x12\xff\xff\xff\xff\x0f"]
        ),
    )


# --- calling and checking -------------------------------------------------------------------------


def _path(rpc: str) -> str:
    return METHOD if rpc == "ProvisionDut" else OPERATIONS + rpc


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """The status code and details ``call`` ends with."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def check(srv: Served, rpc: str, payload: Message | bytes) -> None:
    """Sends ``payload`` (a message, or bytes as they are) to ``rpc``; fails on a broken answer."""
    data = payload if isinstance(payload, bytes) else payload.SerializeToString()
    raw = srv.channel.unary_unary(_path(rpc))  # no serializers: sends and returns bytes
    code, details = code_of(lambda: raw(data, timeout=CALL_DEADLINE))
    assert code in ALLOWED, f"{rpc} answered {code.name}: {details!r} to {payload!r:.300}"
    assert not any(leak in details for leak in LEAKS), f"{rpc} leaked {details!r}"


def still_serves(srv: Served) -> None:
    """A normal create and wait work on ``srv``."""
    op = finished(srv, create(srv, "after-fuzzing", image_path="image-after").name)
    assert op.HasField("response")


RPCS = [
    "ProvisionDut",
    "GetOperation",
    "ListOperations",
    "WaitOperation",
    "CancelOperation",
    "DeleteOperation",
]


# --- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rpc", RPCS)
def test_fuzzed_requests_get_a_precise_answer(
    rpc: str, srv: Served, names: list[str], token: str
) -> None:
    """Hypothesis-made requests never answer INTERNAL or UNKNOWN, nor hang; the server serves on."""

    @FUZZ
    @given(request=requests(rpc, names, token))
    def fuzz(request: Message) -> None:
        check(srv, rpc, request)

    fuzz()
    still_serves(srv)


@pytest.mark.parametrize("rpc", RPCS)
def test_fuzzed_bytes_get_a_precise_answer(
    rpc: str, srv: Served, names: list[str], token: str
) -> None:
    """Raw bytes (random, or valid encodings damaged) never answer INTERNAL or UNKNOWN, nor hang;
    the server serves on."""

    @FUZZ
    @given(data=raw_bytes(requests(rpc, names, token)))
    def fuzz(data: bytes) -> None:
        check(srv, rpc, data)

    fuzz()
    still_serves(srv)
