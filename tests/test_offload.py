"""Tests for :class:`lrofw._offload.Offload`'s ``latest`` writes (progress reports of async
handlers): one key's values are written one at a time, in order, and ``flush`` returns once
every value given before it is written."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from factories import LONG, eventually, in_thread

from lrofw._offload import Offload


@pytest.fixture
def offload() -> Iterator[Offload]:
    """An Offload whose calls block (they run on its threads)."""
    made = Offload(blocking=True)
    yield made
    made.shutdown()


class Writes:
    """A write function that records its values; the first write waits for ``release``, and
    it notes whether two writes ever ran at once."""

    def __init__(self) -> None:
        self.values: list[str] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.overlapped = False
        self._running = 0
        self._lock = threading.Lock()

    def __call__(self, value: str) -> None:
        with self._lock:
            self._running += 1
            self.overlapped |= self._running > 1
        try:
            self.started.set()
            assert self.release.wait(LONG)
            self.values.append(value)
        finally:
            with self._lock:
                self._running -= 1


def test_values_given_while_one_is_written_wait_and_only_the_newest_follows(
    offload: Offload,
) -> None:
    """While "a" is written, "b" and then "c" come: "c" replaces "b" and is written after "a",
    never beside it."""
    writes = Writes()
    offload.latest("op", writes, "a")
    assert writes.started.wait(LONG)
    offload.latest("op", writes, "b")
    offload.latest("op", writes, "c")
    assert offload.busy("op")
    writes.release.set()
    eventually(lambda: not offload.busy("op"), "the writes of op")
    assert writes.values == ["a", "c"]
    assert not writes.overlapped


def test_flush_returns_once_every_value_given_before_it_is_written(offload: Offload) -> None:
    """flush waits for the write in progress, then writes the value still waiting; other keys
    do not hold it up."""
    writes, other = Writes(), Writes()
    offload.latest("other", other, "x")  # never released until the end
    offload.latest("op", writes, "a")
    assert writes.started.wait(LONG) and other.started.wait(LONG)
    offload.latest("op", writes, "b")
    flushing, failures = in_thread(lambda: offload.flush("op"))
    writes.release.set()
    flushing.join(LONG)
    assert not flushing.is_alive() and not failures
    assert writes.values == ["a", "b"]  # both, by the time flush returned
    assert not offload.busy("op")
    offload.flush("unknown")  # nothing given: returns at once
    other.release.set()


def test_a_write_that_raises_leaves_no_later_value_behind(
    offload: Offload, caplog: pytest.LogCaptureFixture
) -> None:
    """A write function that raises (a bug, logged by the pool) does not strand the value
    given meanwhile."""
    started, release = threading.Event(), threading.Event()
    written: list[str] = []

    def write(value: str) -> None:
        if value == "bad":
            started.set()
            assert release.wait(LONG)
            raise RuntimeError("a bug")
        written.append(value)

    offload.latest("op", write, "bad")
    assert started.wait(LONG)
    offload.latest("op", write, "good")
    release.set()
    eventually(lambda: written == ["good"], "the value after the failed write")
    assert "a bug" in caplog.text
