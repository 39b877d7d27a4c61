"""The Store contract (lrofw/stores/base.py), checked once against every store.

Every test takes ``store`` (and, where a second connection matters, ``connect``), parametrized
over :data:`STORES`: a new store is added by one line there and must pass this file unchanged.
At the end, the Manager state machine of ``test_manager_model`` runs over each store.
"""

from __future__ import annotations

import collections
import logging
import pathlib
import shutil
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pgschemas
import pytest
import tls_pb2
from google.longrunning import operations_proto_pb2 as operations_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test
from test_manager_model import SETTINGS, TTL, manager_machine

import lrofw
from lrofw.listing import And, Comparison, MatchAll, Node, Not, Or, parse_filter
from lrofw.stores import (
    DuplicateRequest,
    MemoryStore,
    NewOperation,
    Orphan,
    Record,
    SQLiteStore,
    Store,
)

Operation = operations_pb2.Operation
Response = tls_pb2.ProvisionDutResponse
Metadata = tls_pb2.ProvisionDutMetadata

#: Every store under test: a factory that opens the store kept in a folder. Opening a shared
#: store twice on one folder gives two connections to one store.
STORES: dict[str, Callable[[pathlib.Path], Store]] = {
    "memory": lambda folder: MemoryStore(),
    "sqlite": lambda folder: SQLiteStore(folder / "ops.db"),
    "postgres": lambda folder: pgschemas.store(folder),  # a schema of this run's own, per folder
}

NOW = 1_700_000_000.0
METHOD = "/chromiumos.config.api.test.tls.Common/ProvisionDut"
METHODS = (METHOD, "/local.Other/Create", "")
ALL = MatchAll()
LONG = 30.0  # seconds; reached only when a test fails


# --- fixtures and helpers -------------------------------------------------------------------------


#: The stores other processes can change (a second connection is a second view of one store).
SHARED = ["sqlite", "postgres"]


def _opener(kind: str, folder: pathlib.Path) -> Iterator[Callable[[], Store]]:
    opened: list[Store] = []

    def open_() -> Store:
        store = STORES[kind](folder)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture(params=list(STORES))
def connect(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> Iterator[Callable[[], Store]]:
    """Opens the parametrized store kept under ``tmp_path`` (again on each call); closes them."""
    yield from _opener(request.param, tmp_path)


@pytest.fixture(params=SHARED)
def shared_connect(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> Iterator[Callable[[], Store]]:
    """Like ``connect``, for the shared stores only."""
    yield from _opener(request.param, tmp_path)


@pytest.fixture
def store(connect: Callable[[], Store]) -> Store:
    """The store under test."""
    return connect()


def packed(message: Response | Metadata) -> any_pb2.Any:
    """Packs a message into an Any."""
    out = any_pb2.Any()
    out.Pack(message)
    return out


def response(text: str = "image") -> any_pb2.Any:
    """A packed response."""
    return packed(Response(installed_image=text))


def error(code: int = 5, message: str = "no such DUT") -> status_pb2.Status:
    """A google.rpc.Status."""
    return status_pb2.Status(code=code, message=message, details=[packed(Metadata(stage="x"))])


def add(
    store: Store,
    name: str | None = None,
    *,
    now: float = NOW,
    metadata: Metadata | None = None,
    **new: object,
) -> Record:
    """Inserts a new unfinished operation (a fresh name unless given) and returns its record."""
    op = Operation(name=name or f"operations/{uuid.uuid4()}")
    if metadata is not None:
        op.metadata.CopyFrom(packed(metadata))
    new.setdefault("method", METHOD)
    return store.insert(op, now, NewOperation(**new))  # type: ignore[arg-type]


def frozen(op: Operation) -> bytes:
    """An operation's bytes, to compare exactly."""
    return op.SerializeToString(deterministic=True)


def state(record: Record | None) -> tuple[object, ...] | None:
    """Everything a record says, with the operation as bytes."""
    if record is None:
        return None
    return (
        frozen(record.operation),
        record.method,
        record.create_time,
        record.done_time,
        record.position,
        record.principal,
    )


def everything(store: Store) -> list[tuple[object, ...] | None]:
    """The whole store, newest first, as comparable tuples."""
    records, cursor = store.list(ALL, None, 10**6)
    assert cursor is None
    return [state(r) for r in records]


def names_of(records: list[Record]) -> list[str]:
    """The operation names of records, in order."""
    return [r.operation.name for r in records]


def listed(store: Store, where: Node, limit: int, **options: Any) -> list[Record]:
    """Every page of a listing (``options``: principal, max_scan, max_bytes), checking the page
    rules on the way: only a bounded listing may end a page early."""
    bounded = options.get("max_scan") is not None or options.get("max_bytes") is not None
    out: list[Record] = []
    before = None
    for _ in range(10**4):
        page, cursor = store.list(where, before, limit, **options)
        assert len(page) <= limit
        positions = [r.position for r in page]
        assert positions == sorted(positions, reverse=True)
        assert before is None or not page or page[0].position < before
        if cursor is not None and not bounded:
            assert len(page) == limit, "a short page that is not the last"
            assert cursor == page[-1].position
        if cursor is not None:
            assert not page or cursor <= page[-1].position
            assert before is None or cursor < before, "a cursor that does not move on"
        before = cursor
        out.extend(page)
        if before is None:
            return out
    raise AssertionError("listing did not end")


# --- copies ---------------------------------------------------------------------------------------


def test_inserted_and_returned_operations_are_copies(store: Store) -> None:
    """Changing the inserted op or any op a store returns changes nothing stored."""
    op = Operation(name="operations/copy")
    op.metadata.CopyFrom(packed(Metadata(stage="start")))
    inserted = store.insert(op, NOW, NewOperation(METHOD))
    before = state(store.get("operations/copy"))
    got = store.get("operations/copy")
    listed_record = store.list(ALL, None, 10)[0][0]
    assert got is not None
    for mutable in (op, inserted.operation, got.operation, listed_record.operation):
        mutable.done = True
        mutable.metadata.CopyFrom(packed(Metadata(stage="changed by the caller")))
        mutable.response.CopyFrom(response("forged"))
    assert state(store.get("operations/copy")) == before
    finished = store.finish("operations/copy", NOW + 1, response=response())
    assert finished is not None
    after_finish = state(store.get("operations/copy"))
    finished.operation.response.CopyFrom(response("forged"))
    finished.operation.ClearField("done")
    assert state(store.get("operations/copy")) == after_finish


def test_duplicate_request_record_is_a_copy(store: Store) -> None:
    """The record a DuplicateRequest carries is the caller's own copy."""
    first = add(store, request_key="k", request_hash=b"h")
    before = everything(store)
    with pytest.raises(DuplicateRequest) as info:
        add(store, request_key="k", request_hash=b"h")
    info.value.record.operation.done = True
    info.value.record.operation.name = "operations/forged"
    assert everything(store) == before
    assert store.get(first.operation.name) is not None


def test_later_changes_leave_returned_operations_alone(store: Store) -> None:
    """An op handed out earlier does not change when the store does."""
    inserted = add(store, metadata=Metadata(stage="one"))
    name = inserted.operation.name
    got = store.get(name)
    page = store.list(ALL, None, 10)[0]
    assert got is not None
    snapshots = [frozen(inserted.operation), frozen(got.operation), frozen(page[0].operation)]
    assert store.set_metadata(name, packed(Metadata(stage="two")))
    assert store.finish(name, NOW + 1, error=error()) is not None
    assert [frozen(inserted.operation), frozen(got.operation), frozen(page[0].operation)] == (
        snapshots
    )
    assert not got.operation.done and got.done_time is None


# --- insert ---------------------------------------------------------------------------------------


def test_insert_returns_the_new_unfinished_record(store: Store) -> None:
    """insert returns what get returns afterwards: the op, its method and create time."""
    record = add(store, "operations/new", now=NOW + 7, metadata=Metadata(stage="queued"))
    assert record.operation.name == "operations/new"
    assert not record.operation.done
    assert record.operation.metadata == packed(Metadata(stage="queued"))
    assert (record.method, record.create_time, record.done_time) == (METHOD, NOW + 7, None)
    assert state(store.get("operations/new")) == state(record)


def test_insert_of_an_existing_name_raises_key_error_and_changes_nothing(store: Store) -> None:
    """A second insert of a name raises KeyError; the first op stays as it was."""
    add(store, "operations/taken", metadata=Metadata(stage="first"), owner="a", request_key="k1")
    before = everything(store)
    with pytest.raises(KeyError):
        add(
            store,
            "operations/taken",
            metadata=Metadata(stage="second"),
            method="/other.S/M",
            request_key="k2",
        )
    assert everything(store) == before
    # The failed insert did not take its request key either.
    assert add(store, request_key="k2").method == METHOD


def test_repeated_request_key_raises_duplicate_request_and_changes_nothing(store: Store) -> None:
    """A repeated request_key raises DuplicateRequest with the first record and its hash."""
    first = add(store, "operations/first", request_key="m\nid-1", request_hash=b"hash-1")
    assert store.finish(first.operation.name, NOW + 1, response=response()) is not None
    before = everything(store)
    with pytest.raises(DuplicateRequest) as info:
        add(store, "operations/second", request_key="m\nid-1", request_hash=b"hash-2")
    assert state(info.value.record) == state(store.get("operations/first"))
    assert info.value.request_hash == b"hash-1"
    assert everything(store) == before
    assert store.get("operations/second") is None


def test_request_keys_are_independent_and_freed_with_their_operation(store: Store) -> None:
    """Different keys and no key never collide; a key is free again once its op is gone."""
    for _ in range(3):
        add(store)  # no request key, many times
    deleted = add(store, request_key="deleted")
    expired = add(store, request_key="expired")
    add(store, request_key="kept")
    assert store.delete(deleted.operation.name)
    assert store.finish(expired.operation.name, NOW, response=response()) is not None
    assert store.expire(NOW, 10) == [expired.operation.name]
    assert add(store, request_key="deleted").operation.name != deleted.operation.name
    assert add(store, request_key="expired").operation.name != expired.operation.name
    with pytest.raises(DuplicateRequest):
        add(store, request_key="kept")


# --- finish and metadata --------------------------------------------------------------------------


@pytest.mark.parametrize("outcome", ["response", "error"])
def test_finish_sets_done_and_exactly_one_outcome(store: Store, outcome: str) -> None:
    """finish marks the op done with the response or error given, at the time given."""
    created = add(store, metadata=Metadata(stage="running"))
    name = created.operation.name
    given_outcome = {"response": response("img")} if outcome == "response" else {"error": error()}
    record = store.finish(name, NOW + 3, **given_outcome)  # type: ignore[arg-type]
    assert record is not None
    op = record.operation
    assert op.done and op.name == name
    assert op.metadata == packed(Metadata(stage="running"))
    assert op.WhichOneof("result") == outcome
    assert getattr(op, outcome) == next(iter(given_outcome.values()))
    assert (record.done_time, record.position, record.method) == (
        NOW + 3,
        created.position,
        METHOD,
    )
    assert (record.create_time, state(store.get(name))) == (NOW, state(record))


@pytest.mark.parametrize("both", [True, False])
def test_finish_needs_exactly_one_of_response_and_error(store: Store, both: bool) -> None:
    """finish with both or neither of response/error is refused and changes nothing."""
    name = add(store).operation.name
    before = everything(store)
    outcome = {"response": response(), "error": error()} if both else {}
    with pytest.raises(ValueError):
        store.finish(name, NOW, **outcome)  # type: ignore[arg-type]
    assert everything(store) == before


def test_second_finish_returns_none_and_changes_nothing(store: Store) -> None:
    """finish is compare-and-set: the first writer wins, a done op never changes again."""
    name = add(store, owner="me", request=b"req").operation.name
    assert store.finish(name, NOW + 1, error=error(code=1, message="cancelled")) is not None
    before = everything(store)
    assert store.finish(name, NOW + 2, response=response()) is None
    assert store.finish(name, NOW + 3, error=error(code=13)) is None
    assert not store.set_metadata(name, packed(Metadata(stage="late")))
    assert not store.claim(name, "me", "other")
    assert not store.claim(name, None, "other")
    assert everything(store) == before
    record = store.get(name)
    assert record is not None and record.done_time == NOW + 1
    assert record.operation.error.code == 1


def test_finish_of_a_missing_operation_returns_none(store: Store) -> None:
    """finish of a name that was never there, or was deleted, returns None and adds nothing."""
    deleted = add(store).operation.name
    assert store.delete(deleted)
    assert store.finish("operations/never", NOW, response=response()) is None
    assert store.finish(deleted, NOW, error=error()) is None
    assert everything(store) == []


def test_set_metadata_changes_only_unfinished_operations(store: Store) -> None:
    """set_metadata replaces an unfinished op's metadata; done or missing ops: False, no change."""
    name = add(store, metadata=Metadata(stage="one")).operation.name
    assert store.set_metadata(name, packed(Metadata(stage="two", percent=50)))
    record = store.get(name)
    assert record is not None
    assert record.operation.metadata == packed(Metadata(stage="two", percent=50))
    assert not record.operation.done
    assert store.finish(name, NOW, response=response()) is not None
    before = everything(store)
    assert store.set_metadata(name, packed(Metadata(stage="three"))) is False
    assert store.set_metadata("operations/missing", packed(Metadata())) is False
    assert everything(store) == before


# --- delete and positions -------------------------------------------------------------------------


def test_delete_is_idempotent(store: Store) -> None:
    """delete returns True once, then False; other ops are untouched."""
    kept = add(store, metadata=Metadata(stage="kept"))
    name = add(store).operation.name
    assert store.delete(name) is True
    assert store.get(name) is None
    before = everything(store)
    assert store.delete(name) is False
    assert store.delete("operations/never") is False
    assert everything(store) == before == [state(kept)]


def test_positions_increase_and_are_never_reused(
    store: Store, connect: Callable[[], Store]
) -> None:
    """Every insert gets a larger position than every earlier one, deleted or not."""
    positions = [add(store).position for _ in range(5)]
    assert positions == sorted(set(positions))
    newest = store.list(ALL, None, 1)[0][0]
    assert newest.position == positions[-1]
    assert store.delete(newest.operation.name)
    oldest = store.list(ALL, None, 1)[0][0].operation.name
    assert store.finish(oldest, NOW, response=response()) is not None
    assert store.expire(NOW, 10) == [oldest]
    later = add(store).position
    assert later > positions[-1]
    if store.shared:  # another connection continues the same sequence
        assert add(connect()).position > later


# --- listing --------------------------------------------------------------------------------------


def test_list_is_newest_first_and_pages_end_without_an_empty_page(store: Store) -> None:
    """list returns newest first; exactly filled last pages have no cursor."""
    names = [add(store).operation.name for _ in range(10)]
    page, cursor = store.list(ALL, None, 10)
    assert (names_of(page), cursor) == (names[::-1], None)
    assert names_of(listed(store, ALL, 5)) == names[::-1]
    assert names_of(listed(store, ALL, 3)) == names[::-1]
    page, cursor = store.list(ALL, None, 4)
    assert cursor is not None
    rest, _ = store.list(ALL, cursor, 100)
    assert names_of(page + rest) == names[::-1]


def test_cursor_paging_visits_every_op_once_while_ops_come_and_go(store: Store) -> None:
    """Ops created between pages are not visited; deleted ones are skipped; no op twice."""
    names = [add(store).operation.name for _ in range(12)]
    expected = names[::-1]
    seen: list[str] = []
    created: list[str] = []
    page, cursor = store.list(ALL, None, 3)
    seen += names_of(page)
    while cursor is not None:
        created += [add(store).operation.name for _ in range(2)]
        unseen = [n for n in expected if n not in seen and store.get(n) is not None]
        assert store.delete(unseen[0])  # the next op the listing would show
        assert store.delete(seen[-1])  # and one it showed already
        expected.remove(unseen[0])
        page, cursor = store.list(ALL, cursor, 3)
        seen += names_of(page)
    assert seen == expected
    assert not set(created) & set(seen)


def _filter_dataset(store: Store) -> list[Record]:
    """Fills the store with ops of every kind (methods, done, error codes) for filter tests."""
    outcomes: list[dict[str, object]] = [
        {},
        {"response": response()},
        {"error": error(1)},
        {"error": error(5)},
        {"error": error(10)},
        {"error": error(99)},
    ]
    for i in range(18):
        name = f"operations/f{i:02d}"
        add(store, name, method=METHODS[i % len(METHODS)])
        outcome = outcomes[i % len(outcomes)]
        if outcome:
            assert store.finish(name, NOW + i, **outcome) is not None  # type: ignore[arg-type]
    return listed(store, ALL, 1000)


FILTERS = [
    "",
    "done = true",
    "done = false",
    "done != true",
    "NOT done = true",
    "-done = false",
    "error.code = 0",
    "error.code != 0",
    "error.code = NOT_FOUND",
    "error.code < 5",
    "error.code <= 5",
    "error.code > 5",
    "error.code >= 10",
    "error.code >= 10 AND error.code < 99",
    f"method = {METHOD}",
    "method = local.Other/Create",
    'method = ""',
    f'method != "{METHOD}"',
    'name = "operations/f03"',
    'name != "operations/f03"',
    'name = "operations/none"',
    "done = true AND error.code = 0",
    "done = true error.code != 0",
    'done = false OR name = "operations/f05"',
    f"done = true AND method = {METHOD} OR error.code = 1",
    f"(done = true AND method = {METHOD}) OR error.code = 1",
    'NOT (done = true OR method = "") AND error.code >= 0',
    'NOT (error.code = 1 OR error.code = 10) AND NOT name = "operations/f00"',
]


@pytest.mark.parametrize("text", FILTERS)
def test_filters_agree_with_evaluating_them_in_python(store: Store, text: str) -> None:
    """Listing with a filter gives exactly the ops for which node.matches(record.fields())."""
    records = _filter_dataset(store)
    node = parse_filter(text)
    expected = [r.operation.name for r in records if node.matches(r.fields())]
    assert names_of(store.list(node, None, 1000)[0]) == expected
    assert names_of(listed(store, node, 2)) == expected


@pytest.mark.parametrize("text", ["method = local.Other/Create", "method = /local.Other/Create"])
def test_method_filters_agree_for_a_method_stored_without_its_slash(
    store: Store, text: str
) -> None:
    """The filter compares methods with a leading '/' on both sides, in every store alike."""
    add(store, "operations/bare", method="local.Other/Create")
    add(store, "operations/slashed", method="/local.Other/Create")
    node = parse_filter(text)
    expected = [r.operation.name for r in listed(store, ALL, 10) if node.matches(r.fields())]
    assert expected == ["operations/slashed", "operations/bare"]  # what listing's docs promise
    assert names_of(listed(store, node, 10)) == expected


def _nodes() -> st.SearchStrategy[Node]:
    """Filter trees as parse_filter can build them (ordering only on error.code)."""
    equality = st.sampled_from(["=", "!="])
    comparisons = st.one_of(
        st.builds(Comparison, st.just("done"), equality, st.booleans()),
        st.builds(
            Comparison,
            st.just("error.code"),
            st.sampled_from(["=", "!=", "<", "<=", ">", ">="]),
            st.sampled_from([-1, 0, 1, 5, 6, 10, 99, 2**31 - 1]),
        ),
        st.builds(Comparison, st.just("method"), equality, st.sampled_from(METHODS)),
        st.builds(
            Comparison,
            st.just("name"),
            equality,
            st.sampled_from(["operations/f00", "operations/f07", "operations/f17", "x"]),
        ),
    )
    return st.recursive(
        comparisons | st.just(MatchAll()),
        lambda kids: st.one_of(
            st.builds(Not, kids),
            st.builds(And, st.lists(kids, max_size=3).map(tuple)),
            st.builds(Or, st.lists(kids, max_size=3).map(tuple)),
        ),
        max_leaves=8,
    )


def test_generated_filters_agree_with_evaluating_them_in_python(store: Store) -> None:
    """Random filter trees (empty AND/OR, deep NOT) list what node.matches selects."""
    records = _filter_dataset(store)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(node=_nodes(), limit=st.sampled_from([1, 4, 1000]))
    def check(node: Node, limit: int) -> None:
        expected = [r.operation.name for r in records if node.matches(r.fields())]
        assert names_of(listed(store, node, limit)) == expected, str(node)

    check()


# --- bounded listing ------------------------------------------------------------------------------


def size_of(record: Record) -> int:
    """The serialized size of a record's operation."""
    return len(record.operation.SerializeToString())


def test_max_scan_ends_a_page_early_with_a_cursor_to_go_on(store: Store) -> None:
    """A listing that examines max_scan records stops there: a short (even empty) page and the
    cursor of the last one examined; following cursors lists everything once."""
    records = [add(store, f"operations/s{i:02d}") for i in range(10)]
    for record in records[::3]:
        assert store.finish(record.operation.name, NOW, response=response()) is not None
    done = parse_filter("done = true")  # s09, s06, s03, s00
    page, cursor = store.list(done, None, 10, max_scan=2)  # examines s09, s08
    assert (names_of(page), cursor) == (["operations/s09"], records[8].position)
    page, cursor = store.list(done, cursor, 10, max_scan=2)  # s07, s06
    assert (names_of(page), cursor) == (["operations/s06"], records[6].position)
    page, cursor = store.list(parse_filter("done = false"), records[4].position, 10, max_scan=1)
    assert (names_of(page), cursor) == ([], records[3].position)  # examined s03 only
    page, cursor = store.list(done, records[1].position, 10, max_scan=2)  # only s00 is left
    assert (names_of(page), cursor) == (["operations/s00"], None)
    page, cursor = store.list(ALL, None, 2, max_scan=5)  # the limit comes first
    assert (names_of(page), cursor) == (["operations/s09", "operations/s08"], records[8].position)
    expected = [r.operation.name for r in records[::-1] if r in records[::3]]
    for max_scan in (1, 2, 3, 10, 11):
        assert names_of(listed(store, done, 3, max_scan=max_scan)) == expected
    assert names_of(listed(store, parse_filter('name = "x"'), 3, max_scan=4)) == []


def test_max_scan_counts_only_the_principals_records(store: Store) -> None:
    """With a principal, max_scan bounds the records of that principal examined."""
    owners = ["alice", "bob", "bob", "alice", "bob", "bob", "bob", "alice"]
    records = [add(store, principal=p) for p in owners]
    alices = [r for r in records[::-1] if r.principal == "alice"]
    page, cursor = store.list(ALL, None, 10, principal="alice", max_scan=2)
    assert (names_of(page), cursor) == (names_of(alices[:2]), alices[1].position)
    page, cursor = store.list(ALL, cursor, 10, principal="alice", max_scan=2)
    assert (names_of(page), cursor) == (names_of(alices[2:]), None)


def test_one_bounded_page_is_what_examining_max_scan_records_in_python_gives(
    store: Store,
) -> None:
    """Any cursor, limit, max_scan, principal and filter, over operations of two principals and
    none, with gaps where operations were deleted: one page is the first ``limit`` matches among
    the ``max_scan`` records below the cursor; its cursor is the last match's when the page is
    full with more to come, else the last examined record's if more records are left below it,
    else None."""
    _filter_dataset(store)
    owners = ["alice", "bob", None]
    for i in range(34):
        record = add(store, f"operations/g{i:02d}", principal=owners[i % 7 % 3])
        if i % 5 == 2:
            assert store.finish(record.operation.name, NOW, error=error(5)) is not None
        if i % 4 == 3 or 12 <= i < 20 or i >= 26:  # gaps, a long one, and at the top
            store.delete(record.operation.name)
    records = listed(store, ALL, 1000)
    positions = [r.position for r in records]
    befores = [None, *positions, *(p + 1 for p in positions), positions[0] + 100]

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        node=_nodes(),
        before=st.sampled_from(befores),
        limit=st.sampled_from([1, 2, 5, 1000]),
        max_scan=st.integers(1, 45),
        principal=st.sampled_from([None, "alice", "bob"]),
    )
    def check(
        node: Node, before: int | None, limit: int, max_scan: int, principal: str | None
    ) -> None:
        below = [
            r
            for r in records
            if (before is None or r.position < before)
            and (principal is None or r.principal == principal)
        ]
        examined = below[:max_scan]
        matches = [r for r in examined if node.matches(r.fields())]
        page, cursor = store.list(node, before, limit, principal=principal, max_scan=max_scan)
        if len(matches) > limit:
            cursors = {matches[limit - 1].position}
        elif len(below) > max_scan:
            cursors = {examined[-1].position}
        elif len(below) == max_scan:  # nothing left after the examined: a store may say so
            cursors = {examined[-1].position, None}
        else:
            cursors = {None}
        assert names_of(page) == names_of(matches[:limit]), str(node)
        assert cursor in cursors, str(node)

    check()


def test_max_bytes_ends_a_page_early_but_returns_at_least_one(store: Store) -> None:
    """A page stops before it would pass max_bytes, with a cursor; one record always fits."""
    records = [add(store, metadata=Metadata(stage="x" * (100 * i))) for i in range(6)]
    newest = records[::-1]
    sizes = [size_of(r) for r in newest]
    page, cursor = store.list(ALL, None, 10, max_bytes=sizes[0] + sizes[1])
    assert (names_of(page), cursor) == (names_of(newest[:2]), newest[1].position)
    page, cursor = store.list(ALL, cursor, 10, max_bytes=sizes[2] + sizes[3] - 1)
    assert (names_of(page), cursor) == (names_of(newest[2:3]), newest[2].position)
    page, cursor = store.list(ALL, None, 10, max_bytes=1)  # larger than the bound: still one
    assert (names_of(page), cursor) == (names_of(newest[:1]), newest[0].position)
    page, cursor = store.list(ALL, newest[4].position, 10, max_bytes=1)  # the last one
    assert (names_of(page), cursor) == (names_of(newest[5:]), None)
    for max_bytes in (1, sizes[2], sum(sizes) // 2, sum(sizes)):
        got = listed(store, ALL, 4, max_bytes=max_bytes, max_scan=3)
        assert names_of(got) == names_of(newest)


def test_bounded_paging_visits_every_op_once_while_ops_come_and_go(store: Store) -> None:
    """With max_scan and max_bytes, ops created between pages are not visited and deleted ones
    are skipped; no op twice, none missed."""
    names = [
        add(store, metadata=Metadata(stage="x" * (i % 4 * 50))).operation.name for i in range(30)
    ]
    expected = names[::-1]
    seen: list[str] = []
    before: int | None = None
    for turn in range(10**3):
        page, before = store.list(ALL, before, 4, max_scan=3, max_bytes=150)
        seen += names_of(page)
        if before is None:
            break
        add(store)  # newer than the cursor: never visited
        unseen = [n for n in expected if n not in seen]
        if unseen and turn % 2:
            assert store.delete(unseen[0])
            expected.remove(unseen[0])
        if seen:
            store.delete(seen[-1])
    assert seen == expected


class Churn(MatchAll):
    """Matches everything; the first time a store evaluates it, ``churn`` runs on another thread
    (a store that holds its lock while filtering would deadlock it: the test fails instead)."""

    _pending: list[Callable[[], None]]

    def __init__(self, churn: Callable[[], None]) -> None:
        object.__setattr__(self, "_pending", [churn])  # MatchAll is a frozen dataclass

    @property
    def ran(self) -> bool:
        """Whether the churn ran."""
        return not self._pending

    def matches(self, fields: Mapping[str, object]) -> bool:
        if self._pending:
            worker = threading.Thread(target=self._pending.pop())
            worker.start()
            worker.join(LONG)
            assert not worker.is_alive(), "the store held its lock while evaluating the filter"
        return True


@pytest.mark.parametrize("max_scan", [None, 300])
def test_a_listing_stays_exact_while_the_store_changes_during_it(
    store: Store, max_scan: int | None
) -> None:
    """Ops created and deleted while one list call runs (a store evaluating the filter itself
    lets others in): every op that stayed is listed once, newest first, none created since."""
    names = [add(store).operation.name for _ in range(700)]
    doomed = names[:100:2] + names[100:400] + names[400:500:2]  # 400, oldest first
    created: list[str] = []

    def churn() -> None:
        for name in doomed:
            store.delete(name)
        created.extend(add(store).operation.name for _ in range(20))

    where = Churn(churn)
    got = names_of(listed(store, where, 1000, max_scan=max_scan))
    stayed = [n for n in names[::-1] if n not in doomed]
    assert [n for n in got if n not in doomed] == stayed
    assert len(got) == len(set(got)) and not set(got) & set(created)
    if where.ran:  # the oldest half was deleted long before the listing reached it
        assert store.states(doomed) == {} and len(created) == 20
        assert not set(got) & set(doomed[:200])


def test_generated_bounded_listings_return_exactly_the_matching_ops(store: Store) -> None:
    """Random filters, principals, limits, max_scan and max_bytes, with ops created and deleted
    between pages: each page stays within its bounds and together they list every matching op
    that stayed, once, newest first."""
    principals = st.sampled_from([None, "alice", "bob"])

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        for record in listed(store, ALL, 1000):
            assert store.delete(record.operation.name)
        live: dict[int, Record] = {}
        for stage in data.draw(st.lists(st.integers(0, 300), max_size=20), "ops"):
            record = add(
                store,
                metadata=Metadata(stage="x" * stage),
                method=data.draw(st.sampled_from(METHODS)),
                principal=data.draw(principals),
            )
            if data.draw(st.booleans()):
                finished = store.finish(record.operation.name, NOW, error=error(stage % 3))
                assert finished is not None
                record = finished
            live[record.position] = record
        node = data.draw(_nodes(), "filter")
        principal = data.draw(principals, "principal")
        limit = data.draw(st.sampled_from([1, 3, 100]), "limit")
        max_scan = data.draw(st.sampled_from([None, 1, 2, 5]), "max_scan")
        max_bytes = data.draw(st.sampled_from([None, 1, 200, 2000]), "max_bytes")

        def wanted(r: Record) -> bool:
            return (principal is None or r.principal == principal) and node.matches(r.fields())

        expected = [r.operation.name for _, r in sorted(live.items(), reverse=True) if wanted(r)]
        seen: list[str] = []
        before: int | None = None
        for _ in range(1000):
            scope = sorted(
                (p for p, r in live.items() if principal in (None, r.principal)), reverse=True
            )
            scope = [p for p in scope if before is None or p < before]
            page, cursor = store.list(
                node, before, limit, principal=principal, max_scan=max_scan, max_bytes=max_bytes
            )
            positions = [r.position for r in page]
            assert positions == sorted(positions, reverse=True) and len(page) <= limit
            if max_scan is not None:  # nothing beyond the first max_scan records examined
                assert set(positions) <= set(scope[:max_scan])
                if cursor is not None and len(scope) >= max_scan:
                    assert cursor >= scope[max_scan - 1]
            if max_bytes is not None and len(page) > 1:
                assert sum(size_of(r) for r in page) <= max_bytes
            seen += names_of(page)
            if cursor is None:
                break
            assert (before is None or cursor < before) and (not page or cursor <= positions[-1])
            before = cursor
            for action in data.draw(
                st.lists(st.sampled_from(["add", "ahead", "behind"]), max_size=3)
            ):
                if action == "add":  # newer than the cursor: never listed
                    record = add(store, principal=data.draw(principals))
                    live[record.position] = record
                    continue
                side = [p for p in live if (p < cursor) == (action == "ahead")]
                if side:
                    gone = live.pop(data.draw(st.sampled_from(side)))
                    assert store.delete(gone.operation.name)
                    if gone.operation.name in expected and action == "ahead":
                        expected.remove(gone.operation.name)
        assert seen == expected

    check()


# --- expiry ---------------------------------------------------------------------------------------


def test_expire_removes_finished_ops_oldest_first_up_to_the_limit(store: Store) -> None:
    """expire takes finished ops with finish time <= cutoff, oldest finish first, at most limit."""
    names = [add(store, now=NOW).operation.name for _ in range(4)]
    for offset, name in zip(
        (10.0, 20.0, 25.0, 30.0), names[::-1], strict=True
    ):  # newest op finishes first
        assert store.finish(name, NOW + offset, response=response()) is not None
    unfinished = add(store, now=NOW).operation.name
    assert store.expire(NOW + 5, 10) == []
    assert store.expire(NOW + 25, 1) == [names[3]]
    assert store.expire(NOW + 25, 10) == [names[2], names[1]]  # == cutoff expires
    assert store.get(names[0]) is not None
    assert store.expire(NOW + 10**9, 10) == [names[0]]
    assert names_of(listed(store, ALL, 10)) == [unfinished]


def test_expire_does_not_depend_on_the_order_finishes_arrived_in(store: Store) -> None:
    """Finish times given out of order (a clock stepped back, racing threads) still expire."""
    late = add(store).operation.name
    early = add(store).operation.name
    assert store.finish(late, NOW + 30, response=response()) is not None
    assert store.finish(early, NOW + 10, response=response()) is not None
    assert store.expire(NOW + 20, 10) == [early]
    assert store.expire(NOW + 30, 10) == [late]


def test_unfinished_ops_never_expire(store: Store) -> None:
    """However late the cutoff, unfinished ops stay."""
    names = [add(store, now=NOW - 10**6).operation.name for _ in range(3)]
    assert store.expire(float(2**60), 1000) == []
    assert names_of(listed(store, ALL, 10)) == names[::-1]


def test_expire_skips_ops_deleted_or_recreated_since_they_finished(store: Store) -> None:
    """A deleted op is not reported; a new op with a reused name keeps its own finish time."""
    deleted = add(store, "operations/gone").operation.name
    reused = add(store, "operations/reused").operation.name
    for name in (deleted, reused):
        assert store.finish(name, NOW, response=response()) is not None
    assert store.delete(deleted) and store.delete(reused)
    add(store, "operations/reused")
    assert store.finish("operations/reused", NOW + 100, response=response()) is not None
    assert store.expire(NOW + 50, 10) == []
    assert store.get("operations/reused") is not None
    assert store.expire(NOW + 100, 10) == ["operations/reused"]


# --- ownership ------------------------------------------------------------------------------------


def test_ops_of_a_live_owner_are_not_orphans(store: Store) -> None:
    """An unfinished op whose owner's lease is valid is not an orphan; lapsed or released is."""
    alive = add(store, owner="alive", request=b"a").operation.name
    released = add(store, owner="released").operation.name
    store.renew("alive", NOW + 10)
    store.renew("released", NOW + 10)
    store.release("released")
    assert {o.name for o in store.orphans(NOW, 100)} == {released}
    assert {o.name for o in store.orphans(NOW + 9.5, 100)} == {released}
    assert {o.name for o in store.orphans(NOW + 10, 100)} == {released, alive}  # lapsed
    store.renew("alive", NOW + 20)  # renewed: alive again
    assert {o.name for o in store.orphans(NOW + 10, 100)} == {released}


def test_orphans_carry_method_owner_and_request(store: Store) -> None:
    """Orphans name the op, its method, owner and the stored request bytes."""
    add(store, "operations/o1", method="/a.S/M", owner="dead", request=b"\x00req\xff")
    add(store, "operations/o2", method="", owner=None, request=None)
    finished = add(store, "operations/o3", owner="dead", request=b"x").operation.name
    assert store.finish(finished, NOW, response=response()) is not None
    orphans = sorted(store.orphans(NOW, 100), key=lambda o: o.name)
    assert orphans == [
        Orphan("operations/o1", "/a.S/M", "dead", b"\x00req\xff"),
        Orphan("operations/o2", "", None, None),
    ]
    assert isinstance(orphans[0].request, bytes)


def test_orphans_respects_the_limit(store: Store) -> None:
    """orphans returns at most ``limit`` operations."""
    for _ in range(5):
        add(store, owner="dead")
    assert len(store.orphans(NOW, 2)) == 2
    assert len(store.orphans(NOW, 100)) == 5


def test_claim_is_compare_and_set_on_the_old_owner(store: Store) -> None:
    """claim succeeds only when the owner is still the one given, None included."""
    owned = add(store, owner="old", request=b"r").operation.name
    unowned = add(store, owner=None).operation.name
    assert not store.claim(owned, None, "new")
    assert not store.claim(owned, "someone-else", "new")
    assert store.claim(owned, "old", "new")
    assert not store.claim(owned, "old", "third")  # the old owner is gone now
    assert not store.claim(unowned, "old", "new")
    assert store.claim(unowned, None, "new")
    assert not store.claim("operations/missing", None, "new")
    store.renew("new", NOW + 10)
    assert store.orphans(NOW, 100) == []
    orphans = store.orphans(NOW + 10, 100)
    assert {(o.name, o.owner) for o in orphans} == {(owned, "new"), (unowned, "new")}
    assert [o.request for o in orphans if o.name == owned] == [b"r"]


def test_claim_leaves_the_operation_itself_unchanged(store: Store) -> None:
    """A claim changes the owner only: the op, method and position stay."""
    record = add(store, owner="old", metadata=Metadata(stage="s"))
    assert store.claim(record.operation.name, "old", "new")
    assert everything(store) == [state(record)]


def lost_counts(store: Store, now: float = NOW) -> dict[str, int]:
    """Each orphan's name and loss count."""
    return {o.name: o.lost for o in store.orphans(now, 100)}


def test_a_claim_from_a_lost_owner_counts_a_loss_and_one_from_none_does_not(
    store: Store,
) -> None:
    """claim with old_owner set adds one to lost; from None (never owned) adds nothing."""
    name = add(store, owner="first").operation.name
    unowned = add(store, owner=None).operation.name
    assert lost_counts(store) == {name: 0, unowned: 0}
    assert store.claim(name, "first", "second")
    assert store.claim(unowned, None, "second")
    assert lost_counts(store) == {name: 1, unowned: 0}
    assert not store.claim(name, "first", "third")  # a refused claim counts nothing
    assert store.claim(name, "second", "third")
    assert lost_counts(store) == {name: 2, unowned: 0}
    store.renew("third", NOW + 10)
    assert lost_counts(store) == {unowned: 0}


def test_hand_over_makes_an_orphan_at_once_and_counts_no_loss(store: Store) -> None:
    """hand_over clears its owner's claim: an orphan despite a live lease, lost unchanged."""
    name = add(store, owner="dead", request=b"req").operation.name
    assert store.claim(name, "dead", "stopping")  # one loss, to see that it is kept
    store.renew("stopping", NOW + 10)
    assert store.orphans(NOW, 100) == []
    assert store.hand_over(name, "stopping")
    assert store.orphans(NOW, 100) == [Orphan(name, METHOD, None, b"req", 1)]
    assert store.claim(name, None, "peer")  # taken over from nobody: no loss
    assert lost_counts(store) == {name: 1}


def test_hand_over_is_refused_unless_the_owner_holds_an_unfinished_operation(
    store: Store,
) -> None:
    """hand_over of a missing, done or someone else's op is False and changes nothing."""
    mine = add(store, owner="me").operation.name
    theirs = add(store, owner="them").operation.name
    unowned = add(store, owner=None).operation.name
    done = add(store, owner="me").operation.name
    assert store.finish(done, NOW, response=response()) is not None
    store.renew("me", NOW + 10)
    store.renew("them", NOW + 10)
    before = (everything(store), lost_counts(store))
    assert not store.hand_over(theirs, "me")
    assert not store.hand_over(unowned, "me")
    assert not store.hand_over(done, "me")
    assert not store.hand_over("operations/missing", "me")
    assert (everything(store), lost_counts(store)) == before == (before[0], {unowned: 0})
    assert store.hand_over(mine, "me")
    assert not store.hand_over(mine, "me")  # once only: it has no owner now
    assert lost_counts(store) == {mine: 0, unowned: 0}


def test_an_owners_writes_are_refused_once_another_owner_took_the_operation(
    store: Store,
) -> None:
    """Fencing: finish and set_metadata with ``owner`` write only while that owner holds the op;
    a manager that lost its claim cannot overwrite what the new owner does."""
    name = add(store, owner="first").operation.name
    assert store.set_metadata(name, packed(Metadata(stage="mine")), owner="first")
    assert store.claim(name, "first", "second")
    before = everything(store)
    assert not store.set_metadata(name, packed(Metadata(stage="late")), owner="first")
    assert store.finish(name, NOW, response=response("late"), owner="first") is None
    assert everything(store) == before
    finished = store.finish(name, NOW, response=response("new owner"), owner="second")
    assert finished is not None and finished.operation.response == response("new owner")


def test_unfenced_writes_go_through_whoever_owns_the_operation(store: Store) -> None:
    """Without ``owner`` (a cancel, say) writes ignore ownership; with it, a handed-over (unowned)
    operation refuses them."""
    name = add(store, owner="me").operation.name
    assert store.hand_over(name, "me")
    assert not store.set_metadata(name, packed(Metadata(stage="late")), owner="me")
    assert store.finish(name, NOW, response=response(), owner="me") is None
    assert store.set_metadata(name, packed(Metadata(stage="anyone")))
    assert store.finish(name, NOW, error=error(code=1)) is not None


# --- principals and requests ----------------------------------------------------------------------


def test_principal_is_kept_on_every_record(store: Store) -> None:
    """insert, get, list, finish and DuplicateRequest all carry the op's principal, or None."""
    alice = add(store, principal="alice", request_key="k", request_hash=b"h")
    anonymous = add(store)
    assert (alice.principal, anonymous.principal) == ("alice", None)
    got = store.get(alice.operation.name)
    assert got is not None and got.principal == "alice"
    assert [r.principal for r in listed(store, ALL, 10)] == [None, "alice"]
    finished = store.finish(alice.operation.name, NOW, response=response())
    assert finished is not None and finished.principal == "alice"
    with pytest.raises(DuplicateRequest) as info:
        add(store, principal="alice", request_key="k", request_hash=b"h")
    assert info.value.record.principal == "alice"
    assert state(store.get(alice.operation.name)) == state(finished)


def test_list_by_principal_lists_only_that_principals_operations(store: Store) -> None:
    """list(principal=p) pages through p's ops, newest first, with filters; others never show."""
    owners = ["alice", "bob", None, "alice", "alice", "bob", "al", "alice", None, "ALICE"]
    records = [add(store, principal=p) for p in owners]
    assert store.finish(records[3].operation.name, NOW, error=error()) is not None
    alices = [r.operation.name for r in records[::-1] if r.principal == "alice"]
    for limit in (1, 2, 10):
        assert names_of(listed(store, ALL, limit, principal="alice")) == alices
    done = parse_filter("done = true")
    assert names_of(listed(store, done, 1, principal="alice")) == [records[3].operation.name]
    assert names_of(listed(store, done, 1, principal="bob")) == []
    assert names_of(listed(store, ALL, 3, principal="nobody")) == []
    assert len(listed(store, ALL, 3)) == len(owners)  # no principal: everything


def test_requests_are_dropped_when_their_operation_finishes(store: Store) -> None:
    """A finished op's stored request no longer takes memory; its idempotency hash stays."""
    names: list[str] = []
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for i in range(8):
            request = bytes([i]) * 2**20  # the store holds the only reference after insert
            record = add(store, request=request, request_key=f"k{i}", request_hash=b"h")
            names.append(record.operation.name)
            del request
        assert len(store.orphans(NOW, 100)) == 8  # the requests are there while unfinished
        for name in names:
            assert store.finish(name, NOW, response=response()) is not None
        retained = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert retained < 2**20, f"{retained} bytes still held after finishing 8 MB of requests"
    assert store.orphans(NOW, 100) == []
    with pytest.raises(DuplicateRequest) as info:
        add(store, request_key="k0", request_hash=b"other")
    assert (info.value.record.operation.name, info.value.request_hash) == (names[0], b"h")


# --- change detection and keys --------------------------------------------------------------------


def test_states_reports_existing_names_and_done_flags(store: Store) -> None:
    """states maps each existing name to done; missing names are left out."""
    done = add(store).operation.name
    running = add(store).operation.name
    deleted = add(store).operation.name
    assert store.finish(done, NOW, response=response()) is not None
    assert store.delete(deleted)
    assert store.states([done, running, deleted, "operations/never", done]) == {
        done: True,
        running: False,
    }
    assert store.states([]) == {}
    assert store.states(iter([running])) == {running: False}


def test_states_answers_for_many_names_at_once(store: Store) -> None:
    """states works for more names than one query can take."""
    names = [add(store).operation.name for _ in range(700)]
    for name in names[::3]:
        assert store.finish(name, NOW, response=response()) is not None
    asked = [
        n
        for pair in zip(names, (f"operations/missing-{i}" for i in range(700)), strict=True)
        for n in pair
    ]
    assert store.states(asked) == {n: i % 3 == 0 for i, n in enumerate(names)}


def changed(store: Store, since: int) -> int:
    """``store.version()`` once it differs from ``since``, or after LONG seconds. A store in one
    file sees another connection's change at once; one shared across machines learns of it by
    notification (or its slow tick), a moment later (base.py: change detection)."""
    deadline = time.monotonic() + LONG
    while (version := store.version()) == since and time.monotonic() < deadline:
        time.sleep(0.002)
    return version


def test_shared_store_sees_changes_by_another_connection(
    shared_connect: Callable[[], Store],
) -> None:
    """On a shared store, version() changes after another connection writes, and it sees them."""
    store, other = shared_connect(), shared_connect()
    assert store.shared
    assert isinstance(store.version(), int)
    before = store.version()
    name = add(other).operation.name
    after_insert = changed(store, before)
    assert after_insert != before
    assert store.states([name]) == {name: False}
    assert other.finish(name, NOW, response=response()) is not None
    after_finish = changed(store, after_insert)
    assert after_finish != after_insert
    assert store.states([name]) == {name: True}
    assert other.delete(name)
    assert changed(store, after_finish) != after_finish
    assert store.get(name) is None
    assert store.token_key() == other.token_key()


def test_token_key_is_stable_and_long_enough(store: Store) -> None:
    """token_key is the same bytes on every call, at least 16 of them, and survives writes."""
    key = store.token_key()
    assert isinstance(key, bytes) and len(key) >= 16
    add(store)
    assert store.token_key() == key


def test_close_is_idempotent(connect: Callable[[], Store]) -> None:
    """close may be called more than once; a shared store's data outlives its connections."""
    store = connect()
    name = add(store).operation.name
    store.close()
    store.close()
    reopened = connect()
    assert (reopened.get(name) is not None) is reopened.shared


# --- threads --------------------------------------------------------------------------------------


def test_concurrent_finishes_have_exactly_one_winner(
    store: Store, connect: Callable[[], Store]
) -> None:
    """8 threads finish the same 200 ops at once: each op has one winner, whose result stays."""
    names = [add(store).operation.name for _ in range(200)]
    # On a shared store every thread has its own connection, as separate processes would.
    handles = [connect() if store.shared else store for _ in range(8)]
    barrier = threading.Barrier(len(handles))
    wins: list[list[str]] = [[] for _ in handles]
    failures: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait(LONG)
            for name in names:
                if handles[index].finish(name, NOW, response=response(str(index))) is not None:
                    wins[index].append(name)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(handles))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LONG)
    assert not failures
    assert collections.Counter(n for won in wins for n in won) == collections.Counter(names)
    for index, won in enumerate(wins):
        for name in won:
            record = store.get(name)
            assert record is not None and record.operation.response == response(str(index))


# --- the Manager state machine over every store ---------------------------------------------------


def store_manager_machine(kind: str) -> type[RuleBasedStateMachine]:
    """The test_manager_model machine over a Manager on a fresh ``kind`` store per example."""
    folders: list[pathlib.Path] = []

    def make(clock: Callable[[], float]) -> lrofw.Manager:
        folder = pathlib.Path(tempfile.mkdtemp(prefix=f"lrofw-model-{kind}-"))
        folders.append(folder)
        # lease: the fake clock jumps far ahead; the manager's own lease must not lapse with it.
        return lrofw.Manager(
            store=STORES[kind](folder),
            clock=clock,
            ttl=TTL,
            expiry_interval=3600.0,
            max_workers=1,
            lease=10**9,
        )

    class StoreManagerMachine(manager_machine(make)):  # type: ignore[misc]
        def teardown(self) -> None:
            """Closes the manager, then its store, and removes the store's folder."""
            try:
                super().teardown()
            finally:
                self.manager.store.close()
                while folders:
                    shutil.rmtree(folders.pop())

    StoreManagerMachine.__name__ = StoreManagerMachine.__qualname__ = (
        f"{kind.title()}ManagerMachine"
    )
    return StoreManagerMachine


MACHINES = {kind: store_manager_machine(kind) for kind in STORES}


@pytest.mark.parametrize("kind", list(MACHINES))
def test_manager_over_every_store_matches_the_model(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A Manager over each store behaves as test_manager_model's dict model says."""
    caplog.set_level(logging.ERROR, logger="lrofw")  # refused completions are expected here
    # PostgreSQL: a round trip per store call, and the invariants read every op at each step.
    examples = 40 if kind == "postgres" else 100
    run_state_machine_as_test(MACHINES[kind], settings=settings(SETTINGS, max_examples=examples))


def test_lrofw_never_imports_psycopg_unless_postgres_is_used(tmp_path: pathlib.Path) -> None:
    """lrofw, its stores and a manager on SQLite leave psycopg unimported (it is an extra);
    lrofw.stores.PostgresStore imports it on first use."""
    import subprocess
    import sys

    code = (
        "import sys, lrofw, lrofw.stores\n"
        "lrofw.Manager(store='sqlite:ops.db').close()\n"
        "assert 'psycopg' not in sys.modules, 'imported early'\n"
        "lrofw.stores.PostgresStore\n"
        "assert 'psycopg' in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=LONG
    )
    assert done.returncode == 0, done.stderr
