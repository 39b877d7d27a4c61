"""A WaitOperation on an operation running in this process blocks without reading the store, and
still never misses what settles it: a finish here, a cancel or delete here or in another process
sharing the store, the run's end, closing."""

from __future__ import annotations

import asyncio
import pathlib
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from factories import (
    LONG,
    RESPONSE,
    blocked,
    create,
    eventually,
    ops_stub,
    served,
    wait_request,
    waiting,
)
from faulty import Faulty
from google.longrunning import operations_pb2
from google.longrunning.operations_pb2 import Operation
from google.protobuf import empty_pb2

import lrofw
from lrofw import _registry
from lrofw._registry import Registry, Run
from lrofw.context import OperationContext, StopSignal
from lrofw.stores.memory import MemoryStore
from lrofw.stores.sqlite import SQLiteStore


def wait_in_thread(
    stub: Any, name: str, timeout: float = LONG
) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(stub.WaitOperation(wait_request(name, timeout), timeout=LONG + 5))
        except grpc.RpcError as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_a_wait_on_an_operation_running_here_never_reads_the_store(aio: bool) -> None:
    """Create, then WaitOperation until it finishes: the store is written twice (insert,
    finish) and read not once; the waiter gets the finished operation from this process."""
    store = Faulty(MemoryStore())
    gate = threading.Event()
    manager = lrofw.Manager(store=store)
    with served(blocked(gate), manager=manager, gates=(gate,), aio=aio) as srv:
        name = create(srv).name
        thread, out = wait_in_thread(ops_stub(srv), name)
        waiting(srv, name)
        gate.set()
        thread.join(LONG)
    response = type(RESPONSE)()
    assert out and out[0].done and out[0].response.Unpack(response) and response == RESPONSE
    calls = [method for method, _ in store.calls]
    assert "get" not in calls, calls
    assert calls.count("insert") == 1 and calls.count("finish") == 1


def test_a_zero_timeout_wait_and_a_wait_by_someone_else_still_read_the_store() -> None:
    """Only a blocking wait may skip the read: WaitOperation with timeout 0 answers with the
    stored state, and a caller who may not see the operation gets NOT_FOUND, not a wait."""
    store = Faulty(MemoryStore())
    gate = threading.Event()
    manager = lrofw.Manager(store=store)
    with served(blocked(gate), manager=manager, gates=(gate,)) as srv:
        name = create(srv).name
        op = ops_stub(srv).WaitOperation(wait_request(name, 0), timeout=LONG)
        assert not op.done and op.name == name
        assert [m for m, _ in store.calls].count("get") == 1
        with pytest.raises(lrofw.errors.NotFound):
            manager.wait(name, LONG, caller=lrofw.Caller("mallory"))


def ignoring_handler(started: threading.Event, stopped: threading.Event, gate: threading.Event):  # type: ignore[no-untyped-def]
    """A handler that notes it was told to stop, and then goes on until ``gate`` opens."""

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        op.add_stop_callback(stopped.set)
        started.set()
        gate.wait(LONG)
        return RESPONSE

    return handler


@pytest.mark.parametrize("early", [True, False], ids=["waiting-before", "waiting-after"])
def test_a_cancel_through_another_process_ends_a_wait_here_though_the_handler_goes_on(
    tmp_path: pathlib.Path, early: bool
) -> None:
    """Replica A runs the operation (its handler ignores the stop); B cancels it. A wait on A
    that was blocked before the cancel, or one that starts after A noticed it, answers
    CANCELLED at once: it does not wait for A's handler, which is still running."""
    path = tmp_path / "ops.db"
    started, stopped, gate = threading.Event(), threading.Event(), threading.Event()
    a = lrofw.Manager(store=SQLiteStore(path), poll_interval=0.01)
    with served(ignoring_handler(started, stopped, gate), manager=a, gates=(gate,)) as srv:
        name = create(srv).name
        assert started.wait(LONG)
        if early:
            thread, out = wait_in_thread(ops_stub(srv), name)
            waiting(srv, name)
        with lrofw.Manager(store=SQLiteStore(path)) as b:
            b.cancel(name)
        assert stopped.wait(LONG)  # A noticed: its handler was told to stop (and ignores it)
        if early:
            thread.join(LONG)
            op = out[0]
        else:
            began = time.monotonic()
            op = ops_stub(srv).WaitOperation(wait_request(name), timeout=LONG)
            # Answered at once, not when the wait's time ran out (reached only on failure).
            assert time.monotonic() - began < LONG / 2
        still_running = not gate.is_set()
    assert op.done and op.error.code == grpc.StatusCode.CANCELLED.value[0]
    assert still_running


def test_a_delete_through_another_process_ends_a_wait_here_with_not_found(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "ops.db"
    gate = threading.Event()
    a = lrofw.Manager(store=SQLiteStore(path), poll_interval=0.01)
    with served(blocked(gate), manager=a, gates=(gate,)) as srv:
        name = create(srv).name
        thread, out = wait_in_thread(ops_stub(srv), name)
        waiting(srv, name)
        with lrofw.Manager(store=SQLiteStore(path)) as b:
            b.delete(name)
        thread.join(LONG)
    assert isinstance(out[0], grpc.RpcError) and out[0].code() is grpc.StatusCode.NOT_FOUND


def run_of(name: str) -> Run:
    stop = StopSignal(name)
    ctx = OperationContext(lambda _name, _metadata: True, stop, name, "/t.S/M", None)
    return Run(ctx, stop, empty_pb2.Empty())


def counter() -> tuple[list[int], Callable[[], None]]:
    woken: list[int] = []
    return woken, lambda: woken.append(1)


def test_a_run_is_live_for_waits_until_something_settles_it() -> None:
    registry = Registry(capacity=4)
    first, second = run_of("operations/1"), run_of("operations/2")
    assert registry.add(first) and registry.add(second)
    _, live = registry.subscribe_running("operations/1", lambda: None)
    assert live is first
    assert registry.subscribe_running("operations/9", lambda: None)[1] is None  # not here
    registry.notify("operations/1")  # finished, cancelled or deleted: the store knows
    assert registry.subscribe_running("operations/1", lambda: None)[1] is None
    registry.begin_close()
    assert registry.subscribe_running("operations/2", lambda: None)[1] is None  # closing


def test_a_run_that_ends_unsettled_wakes_its_waiters_and_a_settled_one_does_not() -> None:
    """A run whose outcome was never stored here (another server took its operation over, say)
    wakes the waits that relied on it as it ends, so they read the store; a run whose finish
    already woke them does not wake them twice."""
    registry = Registry(capacity=4)
    lost, done = run_of("operations/1"), run_of("operations/2")
    assert registry.add(lost) and registry.add(done)
    lost_woken, wake_lost = counter()
    done_woken, wake_done = counter()
    registry.subscribe_running("operations/1", wake_lost)
    registry.subscribe_running("operations/2", wake_done)
    registry.notify("operations/2")
    registry.end(lost)
    registry.end(done)
    assert lost_woken == [1] and done_woken == [1]


def test_an_asyncio_wait_on_a_running_operation_reads_the_store_only_after_a_timeout() -> None:
    """manager.wait_async on an operation running here: a timeout ends it with one read (the
    latest state), not two."""
    store = Faulty(MemoryStore())
    gate = threading.Event()
    manager = lrofw.Manager(store=store)
    with served(blocked(gate), manager=manager, gates=(gate,)) as srv:
        name = create(srv).name

        async def main() -> operations_pb2.Operation:
            return await manager.wait_async(name, 0.05)

        op = asyncio.run(main())
    assert not op.done and [m for m, _ in store.calls].count("get") == 1


def test_a_wait_just_after_its_operation_finished_here_reads_nothing() -> None:
    """The handler finished before the client's WaitOperation arrived (the common case for
    quick operations): the wait answers with the finished state this process remembers."""
    store = Faulty(MemoryStore())
    manager = lrofw.Manager(store=store)
    with served(lambda request, op: RESPONSE, manager=manager) as srv:
        name = create(srv).name
        assert manager.registry.wait_gone(name, LONG)
        op = ops_stub(srv).WaitOperation(wait_request(name), timeout=LONG)
        with pytest.raises(lrofw.errors.NotFound):  # remembered, but only for those who may see
            manager.wait(name, LONG, caller=lrofw.Caller("mallory"))
    assert op.done and op.HasField("response")
    assert [m for m, _ in store.calls].count("get") == 1  # mallory's: nothing remembered for her


def test_a_finished_operation_deleted_here_is_not_found_by_a_later_wait() -> None:
    manager = lrofw.Manager()
    with served(lambda request, op: RESPONSE, manager=manager) as srv:
        name = create(srv).name
        assert manager.registry.wait_gone(name, LONG)
        manager.delete(name)
        with pytest.raises(lrofw.errors.NotFound):
            manager.wait(name, LONG)


def test_a_finished_operation_deleted_by_another_process_is_not_found_once_noticed(
    tmp_path: pathlib.Path,
) -> None:
    """Deleted through B: once A's watcher noticed the change, A forgets what finished lately,
    and a wait on A reads the store (NOT_FOUND), not A's memory of it."""
    path = tmp_path / "ops.db"
    a = lrofw.Manager(store=SQLiteStore(path), poll_interval=0.01)
    with served(lambda request, op: RESPONSE, manager=a) as srv:
        name = create(srv).name
        assert a.registry.wait_gone(name, LONG)
        assert a.registry.recent(name) is not None
        with lrofw.Manager(store=SQLiteStore(path)) as b:
            b.delete(name)
        eventually(lambda: a.registry.recent(name) is None, "A noticing B's change")
        with pytest.raises(lrofw.errors.NotFound):
            a.wait(name, LONG)


class _LateWatcher:
    """A SQLite store whose watcher's looks wait for ``first_look`` (the test's own calls do
    not): the watcher looks for the first time only after the test let it."""

    def __init__(self, path: pathlib.Path) -> None:
        self._store = SQLiteStore(path)
        self.first_look = threading.Event()
        self.looks = 0
        self.looked = threading.Condition()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def version(self) -> int:
        if threading.current_thread().name == "lrofw-watcher":
            self.first_look.wait(LONG)
            with self.looked:
                self.looks += 1
                self.looked.notify_all()
        return self._store.version()


def test_the_watchers_first_look_is_no_change_when_nothing_changed(tmp_path: pathlib.Path) -> None:
    """Found: a wait right after an operation finished here read the store instead of what this
    process remembered, when the watcher had not looked at the store yet (a slow machine): its
    first look counted as another process's change, and forgot what finished lately. Nothing
    changed the store but this process: the first look, whenever it comes, finds no change."""
    store = _LateWatcher(tmp_path / "ops.db")
    manager = lrofw.Manager(store=store, poll_interval=0.01)  # type: ignore[arg-type]
    with served(lambda request, op: RESPONSE, manager=manager) as srv:
        name = create(srv).name
        assert manager.registry.wait_gone(name, LONG)
        assert manager.registry.recent(name) is not None
        store.first_look.set()
        with store.looked:  # two looks: the first one's outcome is settled by the second
            assert store.looked.wait_for(lambda: store.looks >= 2, LONG)
        assert manager.registry.recent(name) is not None


def test_the_registry_remembers_a_bounded_number_of_finished_operations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_registry, "RECENT_MAX", 3)
    registry = Registry(capacity=4)
    for i in range(5):
        registry.notify(f"operations/{i}", Operation(name=f"operations/{i}", done=True), None)
    assert [registry.recent(f"operations/{i}") is not None for i in range(5)] == [
        False,
        False,
        True,
        True,
        True,
    ]
    registry.notify("operations/3")  # deleted, expired or changed: no longer known
    registry.forget_recent()
    assert registry.recent("operations/4") is None
    registry.notify("operations/5", Operation(name="operations/5", done=True), "alice")
    assert registry.recent("operations/5") == (Operation(name="operations/5", done=True), "alice")
