"""Static types of the clients: ``mypy --strict`` on small snippets that use lrofw.OperationFuture
and lrofw.aio.OperationFuture as a user would; one must pass, and in the other exactly the lines
marked ``# error`` must fail (mypy checks both in one run)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("mypy", reason="mypy comes with lrofw[dev]")

ROOT = pathlib.Path(__file__).resolve().parent.parent

GOOD = """
    import grpc
    from google.longrunning import operations_pb2
    from google.protobuf import duration_pb2

    import lrofw
    import lrofw.aio


    def sync_use(channel: grpc.Channel, op: operations_pb2.Operation) -> None:
        fut = lrofw.OperationFuture(channel, op, duration_pb2.Duration)
        response: duration_pb2.Duration = fut.result(timeout=1)
        by_name: lrofw.OperationFuture[duration_pb2.Duration] = lrofw.OperationFuture(
            channel, "operations/x", duration_pb2.Duration, metadata=[("x-user", "alice")]
        )
        running: bool = by_name.running()
        by_name.add_done_callback(lambda f: print(f.result().seconds))
        done: operations_pb2.Operation = lrofw.wait(
            channel, op.name, timeout=0, policy=lrofw.WaitPolicy(hold=1.0), metadata=[]
        )
        reveal_type(fut.result())


    async def aio_use(channel: grpc.aio.Channel) -> None:
        fut = lrofw.aio.OperationFuture(channel, "operations/x", duration_pb2.Duration)
        awaited: duration_pb2.Duration = await fut
        result: duration_pb2.Duration = await fut.result(timeout=1)
        running: bool = await fut.running()
        done = await lrofw.aio.wait(channel, "operations/x", policy=lrofw.aio.WaitPolicy())
        reveal_type(await fut)
        reveal_type(await fut.result())
"""

BAD = """
    import grpc
    from google.protobuf import duration_pb2, empty_pb2

    import lrofw
    import lrofw.aio


    def sync_use(channel: grpc.Channel) -> None:
        fut = lrofw.OperationFuture(channel, "operations/x", duration_pb2.Duration)
        wrong: empty_pb2.Empty = fut.result()  # error
        lrofw.OperationFuture(channel, 42, duration_pb2.Duration)  # error
        lrofw.wait(channel, "operations/x", metadata=[("x-user", 7)])  # error


    async def aio_use(channel: grpc.aio.Channel) -> None:
        fut = lrofw.aio.OperationFuture(channel, "operations/x", duration_pb2.Duration)
        wrong: empty_pb2.Empty = await fut  # error
        also: empty_pb2.Empty = await fut.result()  # error
        running: bool = fut.running()  # error
"""

_REPORT = re.compile(r"^(?P<file>[^:]+\.py):(?P<line>\d+): (?P<kind>error|note): (?P<text>.*)$")


def test_futures_are_generic_in_the_response_type(tmp_path: pathlib.Path) -> None:
    """result(), await fut and await fut.result() are typed as the response type given."""
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text(textwrap.dedent(GOOD))
    bad.write_text(textwrap.dedent(BAD))
    options = ["--strict", "--no-incremental", "--config-file", "", "--no-error-summary"]
    run = subprocess.run(
        [sys.executable, "-m", "mypy", *options, "good.py", "bad.py"],
        cwd=tmp_path,
        env={"MYPYPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    reports = [m for m in map(_REPORT.match, run.stdout.splitlines()) if m]
    assert reports, run.stdout + run.stderr
    good_errors = [m[0] for m in reports if m["file"] == "good.py" and m["kind"] == "error"]
    assert good_errors == []
    revealed = [m["text"] for m in reports if m["file"] == "good.py" and m["kind"] == "note"]
    assert revealed == ['Revealed type is "google.protobuf.duration_pb2.Duration"'] * 3
    bad_lines = textwrap.dedent(BAD).splitlines()
    marked = {n for n, line in enumerate(bad_lines, start=1) if line.endswith("# error")}
    failed = {int(m["line"]) for m in reports if m["file"] == "bad.py" and m["kind"] == "error"}
    assert failed == marked, run.stdout
