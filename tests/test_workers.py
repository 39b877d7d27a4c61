"""The manager's worker pool (lrofw/_workers.py) and the client's one stub per channel."""

from __future__ import annotations

import logging
import threading

import grpc
import pytest

from lrofw import client
from lrofw._workers import Workers

LONG = 30.0  # seconds; reached only when a test fails


def test_jobs_run_on_at_most_count_threads_and_wait_their_turn() -> None:
    """With every thread busy, further jobs wait in the queue; all of them run, on no more
    threads than allowed."""
    workers = Workers(2, "test-worker")
    release = threading.Event()
    started: list[int] = []
    names: set[str] = set()
    lock = threading.Lock()
    finished = threading.Semaphore(0)

    def job(i: int) -> None:
        with lock:
            started.append(i)
            names.add(threading.current_thread().name)
        release.wait(LONG)
        finished.release()

    for i in range(6):
        workers.submit(job, i)
    release.set()
    for _ in range(6):
        assert finished.acquire(timeout=LONG)
    workers.shutdown()
    assert sorted(started) == list(range(6))
    assert set(started[:2]) == {0, 1}  # two threads: the first two jobs, the rest waited
    assert len(names) <= 2 and all(n.startswith("test-worker-") for n in names)


def test_a_failing_job_is_logged_and_the_worker_lives_on(caplog: pytest.LogCaptureFixture) -> None:
    workers = Workers(1, "test-worker")
    done = threading.Event()

    def boom() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="lrofw.manager"):
        workers.submit(boom)
        workers.submit(done.set)
        assert done.wait(LONG)
    workers.shutdown()
    assert "a worker's job failed" in caplog.text and "boom" in caplog.text


def test_shutdown_ends_every_thread_after_the_jobs_queued_before_it() -> None:
    workers = Workers(3, "test-shutdown")
    ran = threading.Semaphore(0)
    for _ in range(5):
        workers.submit(ran.release)
    workers.shutdown()
    for _ in range(5):
        assert ran.acquire(timeout=LONG)
    for thread in [t for t in threading.enumerate() if t.name.startswith("test-shutdown-")]:
        thread.join(LONG)
        assert not thread.is_alive()
    workers.submit(ran.release)  # after shutdown: no thread takes it (none is started)
    assert not ran.acquire(timeout=0.05)


def test_one_operations_stub_per_channel() -> None:
    """lrofw.wait builds the Operations stub once per channel (building one costs more than a
    wait's own work); a stub passed in is used as it is."""
    with grpc.insecure_channel("localhost:1") as channel:
        first = client._stub(channel)
        assert client._stub(channel) is first
        assert client._stub(first) is first
    with grpc.insecure_channel("localhost:1") as other:
        assert client._stub(other) is not first


def test_a_channel_that_takes_no_attributes_still_gets_a_stub() -> None:
    class Sealed:
        __slots__ = ("inner",)

        def __init__(self, inner: grpc.Channel) -> None:
            self.inner = inner

        def unary_unary(self, *args: object, **kwargs: object) -> object:
            return self.inner.unary_unary(*args, **kwargs)  # type: ignore[arg-type]

    with grpc.insecure_channel("localhost:1") as channel:
        sealed = Sealed(channel)
        stub = client._stub(sealed)
        assert hasattr(stub, "WaitOperation") and client._stub(sealed) is not stub
