"""Concurrency tests for lrofw.Manager: many threads, real servers, racing completions."""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import grpc
import pytest
import tls_pb2
import tls_pb2_grpc
from factories import Request, Response, in_thread

import lrofw
from lrofw.manager import MethodRunner
from lrofw.testing import serve

THREADS = 8
PER_THREAD = 500
GRPC_PER_THREAD = 50  # of each thread's PER_THREAD, created over a real server
HANDSHAKE_EVERY = 10  # every n-th local op is completed only once its waiter is about to wait
WAIT_LIMIT = 30.0  # seconds; a waiter still not woken by then has been lost
RACES = 300


class Provisioner(tls_pb2_grpc.CommonServicer):
    """Finishes each op at once with the request's image path as the installed image."""

    @lrofw.long_running(Response)
    def ProvisionDut(self, request: Any, op: lrofw.OperationContext) -> Any:
        """Installs request.image_path."""
        return Response(installed_image=request.image_path)


def start_threads(
    count: int, target: Callable[[int], None]
) -> tuple[list[threading.Thread], list[BaseException]]:
    """Starts target(0..count-1) on threads; returns them and the list their failures go to."""
    failures: list[BaseException] = []
    threads = [in_thread(functools.partial(target, i), failures)[0] for i in range(count)]
    return threads, failures


def join_threads(threads: list[threading.Thread], failures: list[BaseException]) -> None:
    """Joins threads from start_threads, re-raising the first failure in the caller."""
    for thread in threads:
        thread.join(90)
        assert not thread.is_alive(), "a thread hung"
    if failures:
        raise failures[0]


def run_threads(count: int, target: Callable[[int], None]) -> None:
    """Runs target(0..count-1) on threads and waits for them, re-raising the first failure."""
    join_threads(*start_threads(count, target))


def all_ops(manager: lrofw.Manager) -> list[Any]:
    """Every op the manager lists, through all pages."""
    ops: list[Any] = []
    token = ""
    while True:
        page, token = manager.list(page_size=1000, page_token=token)
        ops.extend(page)
        if not token:
            return ops


def test_many_threads_lose_nothing_and_finish_nothing_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """8 threads x 500 ops (some over gRPC) with waiters: all present, done once, waiters woken."""
    caplog.set_level(logging.WARNING, logger="lrofw")
    manager = lrofw.Manager(max_workers=4, max_queued=THREADS * GRPC_PER_THREAD)
    wanted: dict[str, str] = {}  # op name -> installed image it must end with
    wanted_lock = threading.Lock()
    first_wins: list[bool] = []
    second_wins: list[bool] = []
    to_wait: queue.Queue[tuple[str, threading.Event | None] | None] = queue.Queue()
    woken: list[tuple[str, Any]] = []

    def waiter(_: int) -> None:
        while (item := to_wait.get()) is not None:
            name, about_to_wait = item
            if about_to_wait is not None:
                about_to_wait.set()
            woken.append((name, manager.wait(name, timeout=WAIT_LIMIT)))

    def creator(index: int) -> None:
        stub = tls_pb2_grpc.CommonStub(srv.channel)
        for i in range(PER_THREAD):
            image = f"image-{index}-{i}"
            if i < GRPC_PER_THREAD:
                name = stub.ProvisionDut(Request(name="dut", image_path=image), timeout=30).name
                with wanted_lock:
                    wanted[name] = image
                to_wait.put((name, None))
                done = manager.wait(name, timeout=WAIT_LIMIT)
                assert done.done, f"{name} not done by its handler"
                second_wins.append(manager.set_result(name, Response(installed_image="late")))
                continue
            name = manager.new_operation(method="/local/Create").name
            with wanted_lock:
                wanted[name] = image
            if i % 2 == 0:
                about_to_wait = threading.Event() if i % HANDSHAKE_EVERY == 0 else None
                to_wait.put((name, about_to_wait))
                if about_to_wait is not None:
                    assert about_to_wait.wait(WAIT_LIMIT), "the waiter never started"
            first_wins.append(manager.set_result(name, Response(installed_image=image)))
            second_wins.append(manager.set_result(name, Response(installed_image="again")))

    with serve(Provisioner(), manager=manager, rpc_threads=THREADS * 2) as srv:
        waiters = start_threads(THREADS, waiter)
        try:
            run_threads(THREADS, creator)
        finally:
            for _ in range(THREADS):
                to_wait.put(None)
            join_threads(*waiters)
        ops = all_ops(manager)

    total = THREADS * PER_THREAD
    assert len(wanted) == total  # no name handed out twice
    assert len(ops) == total
    assert {op.name for op in ops} == set(wanted)  # none lost, none extra
    for op in ops:
        assert op.done, f"{op.name} is not done"
        assert not op.HasField("error"), f"{op.name} failed: {op.error}"
        response = Response()
        assert op.response.Unpack(response)
        assert response.installed_image == wanted[op.name], f"{op.name} finished by another"
    assert first_wins.count(True) == len(first_wins) == THREADS * (PER_THREAD - GRPC_PER_THREAD)
    assert second_wins.count(True) == 0
    assert len(second_wins) == total
    refused = [r for r in caplog.records if "completion refused" in r.getMessage()]
    assert len(refused) == total  # every refused completion is logged, as a warning
    assert {r.levelno for r in refused} == {logging.WARNING}
    expected_waits = THREADS * (GRPC_PER_THREAD + (PER_THREAD - GRPC_PER_THREAD) // 2)
    assert len(woken) == expected_waits
    for name, op in woken:
        assert op.name == name
        assert op.done, f"a waiter on {name} returned before the op was done"


def race(first: Callable[[], object], second: Callable[[], object]) -> list[object]:
    """Runs two calls on two threads released together; returns their results in order."""
    start = threading.Barrier(2)
    results: list[object] = [None, None]

    def run(index: int) -> None:
        start.wait()
        results[index] = (first, second)[index]()

    run_threads(2, run)
    return results


def assert_frozen(manager: lrofw.Manager, final: Any) -> None:
    """Every later completion is refused and the done op's bytes never change."""
    frozen = final.SerializeToString(deterministic=True)
    name = final.name
    assert not manager.set_result(name, Response(installed_image="late"))
    assert not manager.set_error(name, lrofw.OperationError(grpc.StatusCode.ABORTED, "late"))
    assert not manager.set_metadata(name, tls_pb2.ProvisionDutMetadata(percent=1))
    assert manager.cancel(name) == final
    assert manager.wait(name, timeout=0).SerializeToString(deterministic=True) == frozen
    assert manager.get(name).SerializeToString(deterministic=True) == frozen


def test_cancel_racing_set_result_has_one_winner() -> None:
    """cancel and set_result racing on one op: exactly one wins and the op never changes again."""
    cancel_wins = 0
    with lrofw.Manager() as manager:
        for round_ in range(RACES):
            name = manager.new_operation().name
            response = Response(installed_image=f"r{round_}")

            def complete(name: str = name, response: Any = response) -> bool:
                return manager.set_result(name, response)

            def cancel(name: str = name) -> Any:
                return manager.cancel(name)

            # The thread started first tends to win: alternate, so both sides win races.
            if round_ % 2:
                completed, cancelled = race(complete, cancel)
            else:
                cancelled, completed = race(cancel, complete)
            final = manager.get(name)
            assert final.done
            assert final.HasField("error") != final.HasField("response")
            assert cancelled == final  # the cancelled op, or the completed one unchanged
            if completed:
                unpacked = Response()
                assert final.response.Unpack(unpacked)
                assert unpacked == response
            else:
                cancel_wins += 1
                assert final.error.code == grpc.StatusCode.CANCELLED.value[0]
            assert_frozen(manager, final)
    assert 0 < cancel_wins < RACES, f"cancel won {cancel_wins} of {RACES}: no real race"


def test_cancel_racing_a_handler_has_one_winner() -> None:
    """cancel racing a handler's return: the op ends once, with the winner's result only."""
    with serve(rpc_threads=4) as srv:
        manager = srv.manager
        for round_ in range(100):
            release = threading.Event()

            def handler(
                request: Any, op: lrofw.OperationContext, release: threading.Event = release
            ) -> Any:
                release.wait(10)
                return Response(installed_image="handler")

            op = manager.launch(MethodRunner("/t.S/M", handler, Response), Request())

            def cancel(name: str = op.name) -> Any:
                return manager.cancel(name)

            if round_ % 2:
                _, cancelled = race(release.set, cancel)
            else:
                cancelled, _ = race(cancel, release.set)
            final = manager.wait(op.name, timeout=10)
            assert final.done, f"round {round_}: not done"
            assert final.HasField("error") != final.HasField("response")
            assert cancelled == final  # the cancelled op, or the handler's unchanged
            if final.HasField("error"):
                assert final.error.code == grpc.StatusCode.CANCELLED.value[0]
            else:
                unpacked = Response()
                assert final.response.Unpack(unpacked)
                assert unpacked.installed_image == "handler"
            assert_frozen(manager, final)


def test_close_returns_promptly_every_time() -> None:
    """close() never waits out the housekeeper's long sleep (its stop check is race-free)."""
    for _ in range(200):
        manager = lrofw.Manager(expiry_interval=3600)
        closing, raised = in_thread(manager.close)
        closing.join(timeout=2.0)
        assert not closing.is_alive(), "close() hung waiting for the housekeeper"
        assert not raised
