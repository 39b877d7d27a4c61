"""An operation always ends, and shutdown always ends: faults in handlers, in storing outcomes and
in stop callbacks, on both servers and on the memory, SQLite and PostgreSQL stores (issue 9, items 1
and 2)."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pgschemas
import pytest
import tls_pb2_grpc
from factories import (
    LONG,
    METHOD,
    RESPONSE,
    Metadata,
    Request,
    blocked,
    cancel,
    create,
    delete,
    eventually,
    finished,
    get,
    list_ops,
    on_both_servers,
    rpc_error,
    served,
)
from faulty import Faulty

import lrofw
from lrofw import _runs, errors
from lrofw.stores import MemoryStore, SQLiteStore, StoreUnavailable
from lrofw.stores.base import NewOperation

Operation = lrofw.manager.Operation


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """Each store kind the manager runs on (PostgreSQL: its asyncio server stores creates and
    outcomes from the event loop)."""
    if request.param == "postgres":
        made = pgschemas.store(tmp_path)
    else:
        made = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "ops.db")
    yield made
    made.close()


def code_name(op: Any) -> str:
    return (
        grpc.StatusCode.OK.name
        if not op.HasField("error")
        else errors.code_from_int(op.error.code).name
    )


# --- 1. an operation always ends ------------------------------------------------------------------


@on_both_servers
def test_a_lone_surrogate_in_an_error_message_still_ends_the_operation(aio: bool) -> None:
    """A NotFound whose text holds a lone surrogate (a file name from os.listdir) ends the
    operation NOT_FOUND with the character escaped, instead of leaving it unfinished."""
    path = os.fsdecode(b"/var/images/\xff.bin")  # '\udcff': not UTF-8 encodable

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        raise errors.NotFound(f"cannot read {path}")

    with served(handler, aio=aio) as srv:
        op = finished(srv, create(srv).name)
    assert code_name(op) == "NOT_FOUND"
    assert op.error.message == "cannot read /var/images/\\udcff.bin"


def test_operation_error_refuses_a_message_that_is_not_text() -> None:
    """OperationError(code, 404) is a TypeError at construction, naming what to do instead."""
    with pytest.raises(TypeError, match="message must be a str, got int 404"):
        lrofw.OperationError(grpc.StatusCode.NOT_FOUND, 404)  # type: ignore[arg-type]


@on_both_servers
def test_a_handler_raising_a_malformed_error_ends_internal(aio: bool) -> None:
    """A handler whose error cannot even be built ends INTERNAL (the safe message), not stuck."""

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        raise lrofw.OperationError(grpc.StatusCode.NOT_FOUND, 404)  # type: ignore[arg-type]

    with served(handler, aio=aio) as srv:
        name = create(srv).name
        op = finished(srv, name)
    assert code_name(op) == "INTERNAL"
    assert op.error.message == f"internal error in operation {name}"


class BadCode(lrofw.OperationError):
    """An error subclass whose status cannot be built (a code out of range)."""

    def to_status(self) -> Any:
        from google.rpc import status_pb2

        return status_pb2.Status(code=2**40, message="x")


@on_both_servers
def test_an_outcome_that_cannot_be_built_ends_internal(aio: bool) -> None:
    """Whatever a handler raises, its outcome is one that can be stored."""

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        raise BadCode(grpc.StatusCode.NOT_FOUND, "nope")

    with served(handler, aio=aio) as srv:
        op = finished(srv, create(srv).name)
    assert code_name(op) == "INTERNAL"


@on_both_servers
def test_an_outcome_the_store_refuses_is_stored_as_internal(aio: bool, store: Any) -> None:
    """When the store fails to take an outcome for a reason other than being unavailable, the
    operation ends INTERNAL with a safe message instead of staying unfinished."""
    faulty = Faulty(store)
    faulty.fail("finish", UnicodeEncodeError("utf-8", "x", 0, 1, "surrogates"), times=1)
    with served(lambda r, op: RESPONSE, manager=lrofw.Manager(store=faulty), aio=aio) as srv:
        name = create(srv).name
        op = finished(srv, name)
    assert code_name(op) == "INTERNAL"
    assert op.error.message == f"internal error in operation {name}"


@on_both_servers
def test_an_outcome_is_retried_while_the_store_is_unavailable(aio: bool, store: Any) -> None:
    """A result that meets an unavailable store is retried with backoff and stored once the
    store is back: the response is not lost."""
    faulty = Faulty(store)
    faulty.fail("finish", StoreUnavailable("locked"), times=5)
    with served(lambda r, op: RESPONSE, manager=lrofw.Manager(store=faulty), aio=aio) as srv:
        op = finished(srv, create(srv).name)
    assert op.response.Unpack(type(RESPONSE)()) and op.HasField("response")
    assert sum(1 for m, _ in faulty.calls if m == "finish") == 6


def test_a_foreign_write_lock_delays_the_result_but_never_loses_it(tmp_path: Path) -> None:
    """Another process holding the SQLite write lock past busy_timeout: the handler's result is
    retried until the lock goes, then stored (it used to be dropped: 'giving up')."""
    path = tmp_path / "ops.db"
    store = SQLiteStore(path, busy_timeout=0.05)
    foreign = sqlite3.connect(path, isolation_level=None)
    gate, blocked = threading.Event(), threading.Event()

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        gate.wait(LONG)
        return RESPONSE

    def spy(record: Any) -> bool:
        if "cannot be stored yet" in record.getMessage():
            blocked.set()
        return True

    logger = lrofw.manager.logger
    logger.addFilter(spy)
    try:
        with served(handler, manager=lrofw.Manager(store=store)) as srv:
            name = create(srv).name
            foreign.execute("BEGIN IMMEDIATE")  # the write lock, held
            gate.set()
            assert blocked.wait(LONG), "the first write did not meet the lock"
            assert not get(srv, name).done  # reads go on beside the lock
            foreign.execute("ROLLBACK")
            op = finished(srv, name)
        assert op.HasField("response")
    finally:
        logger.removeFilter(spy)
        foreign.close()
        store.close()


def test_an_outcome_never_stored_is_resolved_at_the_next_start(tmp_path: Path) -> None:
    """Store unavailable until the manager closes: the op is left to recovery, and the next
    manager on the file resolves it when it starts (its lease was released), not a lease later."""
    path = tmp_path / "ops.db"
    faulty = Faulty(SQLiteStore(path))
    faulty.fail("finish", StoreUnavailable("disk full"))
    done = threading.Event()

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        done.set()
        return RESPONSE

    with served(handler, manager=lrofw.Manager(store=faulty, lease=3600.0)) as srv:
        name = create(srv).name
        assert done.wait(LONG)
        eventually(lambda: sum(m == "finish" for m, _ in faulty.calls) >= 2, "a retry")
        assert not get(srv, name).done
    faulty.close()
    store = SQLiteStore(path)
    try:
        with lrofw.Manager(store=store, lease=3600.0) as manager:
            op = manager.get(name)
        assert op.done and code_name(op) == "ABORTED"
    finally:
        store.close()


@on_both_servers
def test_report_never_raises_store_errors_into_the_handler(aio: bool, store: Any) -> None:
    """op.report() returns False (and logs) while the store is unavailable; the handler goes on
    and its operation ends with its response."""
    faulty = Faulty(store)
    faulty.fail("set_metadata", StoreUnavailable("locked"))
    seen: list[bool] = []
    reported = threading.Event()

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        seen.append(op.report(Metadata(stage="flashing", percent=10)))
        reported.set()
        return RESPONSE

    with served(handler, manager=lrofw.Manager(store=faulty), aio=aio) as srv:
        op = finished(srv, create(srv).name)
    assert op.HasField("response")
    assert seen == [False]


def test_a_resumable_operation_that_lost_its_server_three_times_is_aborted(store: Any) -> None:
    """A resumable op whose owner was lost a third time is ended ABORTED ('gave up after 3
    attempts') instead of being run again (a poison pill that crashes every server); one that
    lost it once is run again."""
    ran = threading.Event()

    class Common(tls_pb2_grpc.CommonServicer):
        @lrofw.long_running(type(RESPONSE), resumable=True)
        def ProvisionDut(self, request: Any, op: lrofw.OperationContext) -> Any:
            ran.set()
            return RESPONSE

    data = Request(name="poison").SerializeToString()
    store.insert(Operation(name="operations/p"), 1.0, NewOperation(METHOD, "a", data))
    store.insert(Operation(name="operations/q"), 1.0, NewOperation(METHOD, "a", data))
    assert store.claim("operations/p", "a", "b")  # lost once
    assert store.claim("operations/p", "b", "c")  # lost twice; "c" is lost now too
    manager = lrofw.Manager(store=store)
    try:
        server = grpc.server(ThreadPoolExecutor(2))
        lrofw.add_servicer_to_server(Common(), server, manager=manager)  # recovers, if shared
        manager.recover()
        op = manager.get("operations/p")
        assert code_name(op) == "ABORTED"
        assert op.error.message.startswith("gave up after 3 attempts")
        assert manager.wait("operations/q", LONG).HasField("response")  # lost once: resumed
        assert ran.is_set()
    finally:
        manager.close()


# --- 2. shutdown always ends ----------------------------------------------------------------------


@on_both_servers
def test_a_stop_callback_that_raises_breaks_neither_cancel_nor_close(aio: bool) -> None:
    """A handler's stop callback that raises: CancelOperation still answers OK (the op is
    CANCELLED), close() does not raise, and a second close() returns at once."""
    started, release = threading.Event(), threading.Event()

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        def explode() -> None:
            raise RuntimeError("boom")

        op.add_stop_callback(explode)
        started.set()
        release.wait(LONG)
        return RESPONSE

    manager = lrofw.Manager()
    with served(handler, manager=manager, aio=aio, gates=(release,)) as srv:
        first, second = create(srv).name, create(srv).name
        assert started.wait(LONG)
        cancel(srv, first)  # raises if the RPC failed
        assert code_name(get(srv, first)) == "CANCELLED"
        manager.close(grace=0.0)
        manager.close(grace=0.0)  # idempotent, and does not wait for ever
        assert code_name(get(srv, second)) == "ABORTED"


def test_close_goes_on_when_a_step_fails() -> None:
    """A failure inside close (the store cannot release the lease) is logged; close returns, and
    a second close() returns too (it used to wait for ever)."""
    store = Faulty(MemoryStore())
    store.shared = True  # so that close releases the lease
    store.fail("release", RuntimeError("store gone"))
    manager = lrofw.Manager(store=store, lease=3600.0)
    manager.close(grace=0.0)
    done = threading.Event()
    threading.Thread(target=lambda: (manager.close(), done.set()), daemon=True).start()
    assert done.wait(LONG), "a second close() did not return"


def stubborn(stuck: threading.Event) -> Any:
    """A handler that, for a "stubborn" DUT, blocks until ``stuck`` is set: it ignores
    op.cancelled and every stop signal."""

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        if request.name == "stubborn":
            stuck.wait(LONG)
        return RESPONSE

    return handler


def test_a_handler_that_ignores_its_timeout_gives_its_slot_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A handler that ignores its timeout keeps its thread but not its slot: a replacement thread
    runs the next operation; past max_abandoned, creates get RESOURCE_EXHAUSTED."""
    monkeypatch.setattr(_runs, "ABANDON_AFTER", 0.05)
    stuck = threading.Event()
    try:
        manager = lrofw.Manager(max_workers=1, max_queued=0, max_abandoned=1)
        with served(stubborn(stuck), manager=manager, timeout=0.1) as srv:
            first = create(srv, name="stubborn").name
            assert code_name(finished(srv, first)) == "DEADLINE_EXCEEDED"
            eventually(lambda: manager.registry.count() == 0, "the slot to come back")
            err = rpc_error(lambda: create(srv, name="next"))
            assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "ignored their timeout" in (err.details() or "")
            stuck.set()  # the stubborn handler returns: its thread retires, creates go on
            eventually(lambda: manager._runs.refusal() is None, "the thread to retire")
            assert finished(srv, create(srv, name="next").name).HasField("response")
    finally:
        stuck.set()


def test_abandoned_threads_are_replaced_so_work_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for abandoned threads, the next operation runs on a replacement thread while
    the stubborn one is still stuck."""
    monkeypatch.setattr(_runs, "ABANDON_AFTER", 0.05)
    stuck = threading.Event()
    try:
        manager = lrofw.Manager(max_workers=1, max_queued=4, max_abandoned=2)
        with served(stubborn(stuck), manager=manager, timeout=0.1) as srv:
            first = create(srv, name="stubborn").name
            queued = create(srv, name="next").name  # waits for the only thread
            assert code_name(finished(srv, first)) == "DEADLINE_EXCEEDED"
            assert finished(srv, queued).HasField("response")  # ran while "stubborn" is stuck
            assert not stuck.is_set()
    finally:
        stuck.set()


# --- 4. bounded work per call ---------------------------------------------------------------------


@on_both_servers
def test_a_request_id_over_128_characters_is_invalid(aio: bool) -> None:
    """AIP-155 ids are UUIDs: a longer one is INVALID_ARGUMENT, and creates nothing."""
    with served(lambda r, op: RESPONSE, aio=aio, request_id=lambda r: r.image_path) as srv:
        err = rpc_error(lambda: create(srv, image_path="x" * 129))
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 128" in (err.details() or "")
        assert srv.manager.list()[0] == []


@on_both_servers
def test_oversized_metadata_and_responses_end_invalid_argument(aio: bool) -> None:
    """Metadata over max_metadata_bytes is refused by op.report() with INVALID_ARGUMENT (the op
    ends so unless the handler catches it); a response over max_response_bytes ends the op so."""

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        if request.name == "big-metadata":
            op.report(Metadata(stage="x" * 2000))
        return type(RESPONSE)(installed_image="y" * 5000)

    manager = lrofw.Manager(max_metadata_bytes=1000, max_response_bytes=4000)
    with served(handler, manager=manager, aio=aio) as srv:
        meta = finished(srv, create(srv, name="big-metadata").name)
        resp = finished(srv, create(srv, name="other").name)
    assert code_name(meta) == "INVALID_ARGUMENT" and "max_metadata_bytes" in meta.error.message
    assert code_name(resp) == "INVALID_ARGUMENT" and "max_response_bytes" in resp.error.message


@on_both_servers
def test_a_cancelled_or_deleted_queued_operation_lets_go_of_its_request(aio: bool) -> None:
    """A queued op that is cancelled or deleted drops its request at once (it used to stay in the
    worker queue), and it never starts."""
    gate, started = threading.Event(), threading.Event()
    ran: list[str] = []
    manager = lrofw.Manager(max_workers=1)
    handler = blocked(gate, ran=ran, started=started)
    with served(handler, manager=manager, aio=aio, gates=(gate,)) as srv:
        create(srv, name="running")
        assert started.wait(LONG)
        names = [create(srv, name=f"queued-{i}").name for i in range(2)]
        runs = [manager.registry.get(n) for n in names]
        assert all(r is not None and r.request is not None for r in runs)
        cancel(srv, names[0])
        srv.manager.delete(names[1])
        assert all(r is not None and r.request is None for r in runs)
        assert manager.registry.count() == 1
        gate.set()
        eventually(lambda: manager.registry.count() == 0, "the running one to end")
    assert ran == ["running"]


# --- 3. no store I/O on an event loop -------------------------------------------------------------


def test_an_aio_server_never_calls_a_blocking_store_on_its_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every store call an aio server makes (creates, all five Operations RPCs, an async
    handler's reports and outcome) does its I/O on a thread, never on the event loop: a store
    waiting for a foreign lock cannot stall the other RPCs. The store's blocking methods are
    called from threads; its coroutines (``insert_async``, ``finish_async``) hand their writes
    to its writer thread. Checked per SQLite statement, on every connection the store opens."""
    statements: list[tuple[str, int]] = []
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(lambda sql: statements.append((sql, threading.get_ident())))
        return conn

    monkeypatch.setattr(sqlite3, "connect", traced)
    faulty = Faulty(SQLiteStore(tmp_path / "ops.db"))

    async def handler(request: Any, op: lrofw.AsyncOperationContext) -> object:
        op.report(Metadata(stage="flashing", percent=50))
        await op.sleep(0.01)
        return RESPONSE

    with served(handler, manager=lrofw.Manager(store=faulty), aio=True, asynchronous=True) as srv:
        assert srv.loop is not None
        loop_thread = srv.run(_loop_thread())
        first, second = create(srv).name, create(srv).name
        assert finished(srv, first).HasField("response")  # WaitOperation
        get(srv, first)
        cancel(srv, second)
        rpc_error(lambda: cancel(srv, "operations/missing"))
        list_ops(srv)
        delete(srv, first)
        used = {m.removesuffix("_async") for m, _ in faulty.calls}
        assert {"insert", "set_metadata", "finish", "get", "list", "delete"} <= used
        assert loop_thread not in faulty.threads_of(
            "insert", "get", "list", "set_metadata", "finish", "delete"
        )
        kinds = {sql.split()[0] for sql, _ in statements}
        assert {"INSERT", "UPDATE", "SELECT", "DELETE"} <= kinds, kinds
        on_loop = [sql for sql, thread in statements if thread == loop_thread]
        assert not on_loop, on_loop
    faulty.close()


async def _loop_thread() -> int:
    return threading.get_ident()


def _rss() -> int:
    """This process's resident memory, in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@on_both_servers
def test_churn_of_large_queued_requests_keeps_memory_bounded(aio: bool) -> None:
    """200 rounds of create (1 MB request) + cancel + delete behind one long-running op: resident
    memory grows by under 50 MB (it grew by the sum of the requests: cancelled queued jobs kept
    theirs in the worker queue)."""
    gate, started = threading.Event(), threading.Event()
    manager = lrofw.Manager(max_workers=1)  # the others queue behind the long one, never run
    with served(blocked(gate, started=started), manager=manager, aio=aio, gates=(gate,)) as srv:
        create(srv, name="long")
        assert started.wait(LONG)
        payload = "x" * (1 << 20)
        before = _rss()
        for _ in range(200):
            name = create(srv, name="big", image_path=payload).name
            cancel(srv, name)
            delete(srv, name)
        grown = _rss() - before
    assert grown < 50 * (1 << 20), f"resident memory grew by {grown / (1 << 20):.0f} MB"


def test_a_peer_resumes_a_handed_over_operation_at_once(tmp_path: Path) -> None:
    """Two managers share a SQLite file: when one closes with a resumable run still going, it
    hands the run over and the other resumes it through its watcher, long before any lease."""
    runs: list[str] = []
    started = threading.Event()

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        runs.append(op.name)
        if len(runs) == 1:
            started.set()
            op.sleep(LONG)  # the first run is stopped by its manager's close
        return RESPONSE

    stores = [SQLiteStore(tmp_path / "ops.db") for _ in range(2)]
    first = lrofw.Manager(store=stores[0], lease=3600.0)
    peer = lrofw.Manager(store=stores[1], lease=3600.0)
    try:
        with (
            served(handler, manager=first, resumable=True) as a,
            served(handler, manager=peer, resumable=True) as b,
        ):
            name = create(a).name
            assert started.wait(LONG)
            first.close(grace=0.0)
            op = finished(b, name)
        assert op.HasField("response")
        assert runs == [name, name]
    finally:
        for store in stores:
            store.close()


class _RescuedMeanwhile:
    """A store whose orphans are taken over by another rescuer just after they were listed (a
    peer working from a fresher list resumed them)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        inner.renew("another-rescuer", time.time() + 60)  # a live peer

    def orphans(self, now: float, limit: int) -> list[Any]:
        found = self._inner.orphans(now, limit)
        for orphan in found:
            self._inner.claim(orphan.name, orphan.owner, "another-rescuer")
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_a_rescuer_never_ends_an_operation_another_rescuer_took_over(tmp_path: Any) -> None:
    """Recovery ends an orphan ABORTED only after claiming it: one that a peer claimed (and
    resumed) since the list was read is left to that peer."""
    store = SQLiteStore(str(tmp_path / "ops.db"))
    try:
        name = "operations/orphaned"
        store.insert(Operation(name=name), 0.0, NewOperation(method="/t.S/M", owner="dead"))
        with lrofw.Manager(store=_RescuedMeanwhile(store)) as manager:  # type: ignore[arg-type]
            manager.recover()  # (it also recovered once as it started)
        record = store.get(name)
        assert record is not None and not record.operation.done
    finally:
        store.close()


def test_a_manager_whose_lease_lapsed_does_not_abort_its_own_running_operations(
    tmp_path: Any,
) -> None:
    """For a moment (a stalled renewal, say) the manager's own lease has lapsed and its running
    operations look orphaned: recovery leaves the ones running here alone."""
    release = threading.Event()

    def handler(request: Any, op: lrofw.OperationContext) -> Any:
        release.wait(LONG)
        return request

    runner = _runs.MethodRunner("/t.S/M", handler, Request)
    store = SQLiteStore(str(tmp_path / "ops.db"))
    try:
        with lrofw.Manager(store=store) as manager:
            op = manager.launch(runner, Request())
            eventually(lambda: manager.registry.count() == 1, "the handler running")
            store.release(manager.owner)  # its lease is gone: its running op looks orphaned
            manager.recover()
            assert not manager.get(op.name).done
            release.set()
            assert manager.wait(op.name, timeout=LONG).HasField("response")
    finally:
        release.set()
        store.close()
