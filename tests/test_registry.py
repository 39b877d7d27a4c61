"""The registry's closing rule: a run queued with a worker free for it is as good as running."""

from __future__ import annotations

from google.protobuf import empty_pb2

import lrofw
from lrofw._registry import Registry, Run
from lrofw._runs import MethodRunner
from lrofw.context import OperationContext, StopSignal


def run(name: str) -> Run:
    stop = StopSignal(name)
    ctx = OperationContext(lambda _name, _metadata: True, stop, name, "/t.S/M", None)
    return Run(ctx, stop, empty_pb2.Empty())


def test_closing_keeps_the_queued_runs_a_free_worker_would_start_and_drops_the_rest() -> None:
    registry = Registry(capacity=4, workers=2)
    first, second, third = run("operations/1"), run("operations/2"), run("operations/3")
    for each in (first, second, third):
        assert registry.add(each)
    assert registry.begin(first) is not None  # one runs; one worker is free for the next queued

    closing, dropped = registry.begin_close()

    assert closing and dropped == [third]
    assert registry.begin(second) is not None  # handed to the free worker: it still starts
    assert registry.begin(third) is None
    assert registry.begin_close() == (False, [])


def test_closing_with_every_worker_busy_drops_every_queued_run() -> None:
    registry = Registry(capacity=3, workers=1)
    first, second = run("operations/1"), run("operations/2")
    assert registry.add(first) and registry.add(second)
    assert registry.begin(first) is not None

    assert registry.begin_close() == (True, [second])
    assert registry.begin(second) is None


def test_an_operation_created_just_before_close_runs_within_the_grace() -> None:
    """close() at once after a create, with workers free: the op may still be queued (its worker
    not started yet); it runs and ends with its response instead of ABORTED, every time."""

    def handler(request: empty_pb2.Empty, op: lrofw.OperationContext) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    runner = MethodRunner("/t.S/M", handler, empty_pb2.Empty)
    for _ in range(30):
        with lrofw.Manager(max_workers=2) as manager:
            op = manager.launch(runner, empty_pb2.Empty())
            manager.close(grace=30.0)
            done = manager.get(op.name)
        assert done.done and done.HasField("response"), done
