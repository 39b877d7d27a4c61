"""Tests for examples/tls_provision: its scripts as subprocesses and its servicer in-process."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import grpc
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tls_provision"
# The scripts import lrofw; make the work tree's copy importable even when it is not installed.
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    "PYTHONUNBUFFERED": "1",
}
START_TIMEOUT = 30.0  # seconds for a server to print "listening on"
RUN_TIMEOUT = 60.0  # seconds for any script run to finish
OPERATION_NAME = re.compile(r"^operation: (\S+)$", re.MULTILINE)

#: Runs a test against both servers: grpc.server with Common, and --aio's grpc.aio.server with
#: AsyncCommon.
BOTH_SERVERS = pytest.mark.parametrize("aio", [False, True], ids=["grpc", "aio"])


def aio_flags(aio: bool) -> list[str]:
    """The flag that selects the asyncio server, for server.py and demo.py."""
    return ["--aio"] if aio else []


def script(name: str) -> str:
    """Returns the path of one of the example's scripts."""
    return str(EXAMPLE / name)


def run(
    name: str, *args: str, timeout: float = RUN_TIMEOUT, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs an example script to completion with a timeout, capturing its output."""
    return subprocess.run(
        [sys.executable, script(name), *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


def read_line(stream: IO[str], timeout: float) -> str:
    """Reads one line from ``stream``, failing the test if none comes within ``timeout``."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not result:
        pytest.fail(f"no line within {timeout}s")
    return result[0]


class Server:
    """A running server.py: its process, address and stderr file."""

    def __init__(self, process: subprocess.Popen[str], target: str, stderr: Path) -> None:
        self.process = process
        self.target = target
        self.stderr = stderr

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Sends ``sig`` and returns the exit code, failing the test if it does not exit."""
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"server did not exit within {timeout}s of {sig.name}")


@contextlib.contextmanager
def server(
    tmp_path: Path,
    *args: str,
    step_seconds: float = 0.05,
    aio: bool = False,
    program: Sequence[str] = (),
) -> Iterator[Server]:
    """Starts server.py (``--aio`` with ``aio``) on a free port; kills it on the way out if it is
    still running. ``program`` replaces ``server.py`` (e.g. ``["-c", SOURCE]``)."""
    stderr_path = tmp_path / f"server-{len(list(tmp_path.glob('server-*')))}.stderr"
    command = [
        sys.executable,
        *(program or [script("server.py")]),
        "--step-seconds", str(step_seconds),
        *aio_flags(aio),
        *args,
    ]  # fmt: skip
    with (
        stderr_path.open("w") as stderr,
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=ENV, cwd=tmp_path
        ) as p,
    ):
        try:
            assert p.stdout is not None
            line = read_line(p.stdout, START_TIMEOUT)
            match = re.fullmatch(r"listening on (127\.0\.0\.1:(\d+))\n", line)
            assert match, f"unexpected first line {line!r}; stderr: {stderr_path.read_text()}"
            assert int(match.group(2)) > 0
            yield Server(p, match.group(1), stderr_path)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=15.0)


def free_port() -> int:
    """Returns a port nothing listens on (bound and released at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_generated_code_is_current() -> None:
    """generate.py --check finds the committed tls_pb2*.py up to date with tls.proto."""
    assert importlib.util.find_spec("grpc_tools"), "grpcio-tools (the dev extra) is needed"
    result = run("generate.py", "--check")
    assert result.returncode == 0, result.stderr


def test_generated_code_imports_longrunning() -> None:
    """tls_pb2 imports cleanly and declares ProvisionDut's operation_info."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import tls_pb2, tls_pb2_grpc;"
            "from google.longrunning import operations_pb2 as o;"
            "m = tls_pb2.DESCRIPTOR.services_by_name['Common'].methods_by_name['ProvisionDut'];"
            "i = m.GetOptions().Extensions[o.operation_info];"
            "print(m.output_type.full_name, i.response_type, i.metadata_type)",
        ],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "google.longrunning.Operation",
        "ProvisionDutResponse",
        "ProvisionDutMetadata",
    ]


@BOTH_SERVERS
def test_demo_runs_end_to_end(tmp_path: Path, aio: bool) -> None:
    """demo.py provisions 'some host', sees NOT_FOUND for another DUT and exits 0."""
    result = run(
        "demo.py", "--step-seconds", "0.05", *aio_flags(aio), timeout=2 * RUN_TIMEOUT, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"({'grpc.aio' if aio else 'grpc'}), store" in result.stdout  # the server it asked for
    assert "demo: ok" in result.stdout
    assert "client| done: " in result.stdout
    assert "client| error: NOT_FOUND Unknown DUT unknown host" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert "store: sqlite:" in result.stdout  # the embedded default, a file it names
    assert (tmp_path / "tls_provision.db").exists()


@BOTH_SERVERS
def test_client_provisions_known_dut(tmp_path: Path, aio: bool) -> None:
    """The client prints the op name, progress, and done with the installed image; exit 0."""
    with server(tmp_path, step_seconds=0.2, aio=aio) as srv:
        result = run("client.py", "--target", srv.target, "--dut", "some host", "--image", "img/1")
        assert srv.stop() == 0
    assert result.returncode == 0, result.stdout + result.stderr
    assert OPERATION_NAME.search(result.stdout)
    assert "progress: done 100%" in result.stdout
    assert result.stdout.rstrip().endswith('done: installed_image: "img/1"')


@BOTH_SERVERS
def test_client_reports_unknown_dut_as_not_found(tmp_path: Path, aio: bool) -> None:
    """Any DUT but 'some host' ends in an operation with NOT_FOUND; the client exits 1."""
    with server(tmp_path, aio=aio) as srv:
        result = run("client.py", "--target", srv.target, "--dut", "other host")
        assert srv.stop() == 0
    assert result.returncode == 1, result.stdout + result.stderr
    assert OPERATION_NAME.search(result.stdout), "the operation should exist"
    assert "error: NOT_FOUND Unknown DUT other host" in result.stdout
    assert "Traceback" not in result.stderr


@BOTH_SERVERS
def test_client_empty_dut_is_rejected_before_an_operation_exists(tmp_path: Path, aio: bool) -> None:
    """An empty DUT name fails the call itself with INVALID_ARGUMENT; no operation is made."""
    with server(tmp_path, aio=aio) as srv:
        result = run("client.py", "--target", srv.target, "--dut", "")
        assert srv.stop() == 0
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error: INVALID_ARGUMENT" in result.stdout
    assert "name must not be empty" in result.stdout
    assert not OPERATION_NAME.search(result.stdout)


def test_client_reports_unreachable_server_in_one_line() -> None:
    """With no server listening the client says so in one line, without a traceback; exit 1."""
    result = run(
        "client.py", "--target", f"127.0.0.1:{free_port()}", "--dut", "x", "--timeout", "1"
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert "cannot reach the server" in result.stderr


@BOTH_SERVERS
def test_server_refuses_a_port_in_use(tmp_path: Path, aio: bool) -> None:
    """A second server on a busy port says so in one line and exits 1 (no SO_REUSEPORT sharing)."""
    with server(tmp_path) as srv:
        result = run("server.py", "--address", srv.target, *aio_flags(aio), cwd=tmp_path)
        assert srv.stop() == 0
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == f"server.py: cannot listen on {srv.target}"
    assert "Traceback" not in result.stderr


@BOTH_SERVERS
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_server_exits_zero_on_signal(tmp_path: Path, sig: signal.Signals, aio: bool) -> None:
    """SIGTERM and SIGINT (Ctrl-C) shut the server down gracefully with exit code 0."""
    with server(tmp_path, aio=aio) as srv:
        assert srv.stop(sig) == 0
    log = srv.stderr.read_text()
    assert f"received {sig.name}, shutting down" in log
    assert log.rstrip().endswith("stopped")
    assert "Traceback" not in log


@BOTH_SERVERS
def test_server_shutdown_hands_a_resumable_operation_over(tmp_path: Path, aio: bool) -> None:
    """SIGTERM during a long provisioning exits 0 within the grace + 5 s; the operation is handed
    over (not ABORTED), and the next server on the store resumes it at once, not a lease later."""
    import tls_pb2
    import tls_pb2_grpc
    from factories import eventually
    from google.longrunning import operations_pb2, operations_pb2_grpc

    import lrofw

    grace = 0.5
    with server(tmp_path, "--grace-seconds", str(grace), step_seconds=30.0, aio=aio) as first:
        with grpc.insecure_channel(first.target) as channel:
            stub = tls_pb2_grpc.CommonStub(channel)
            name = stub.ProvisionDut(tls_pb2.ProvisionDutRequest(name="some host")).name
            ops = operations_pb2_grpc.OperationsStub(channel)
            get = operations_pb2.GetOperationRequest(name=name)
            eventually(lambda: ops.GetOperation(get).HasField("metadata"), "its first report")
        assert first.stop(timeout=grace + 5.0) == 0
    log = first.stderr.read_text()
    assert "provisioning 'some host': stopped during downloading" in log
    assert "handed over" in log
    assert "Traceback" not in log
    # The lease is 15 s: a resume that waited for it would miss this deadline.
    with (
        server(tmp_path, step_seconds=0.01, aio=aio) as second,
        grpc.insecure_channel(second.target) as channel,
    ):
        op = lrofw.wait(channel, name, timeout=10.0)
    assert op.done and op.HasField("response"), op


@BOTH_SERVERS
def test_log_file_receives_the_logs(tmp_path: Path, aio: bool) -> None:
    """--log-file sends the server's log lines to that file instead of stderr."""
    log_file = tmp_path / "tls.log"
    with server(tmp_path, "--log-file", str(log_file), aio=aio) as srv:
        result = run("client.py", "--target", srv.target, "--dut", "some host")
        assert srv.stop() == 0
    assert result.returncode == 0, result.stdout + result.stderr
    log = log_file.read_text()
    assert "provisioning 'some host': downloading" in log
    assert "shutting down" in log
    assert "provisioning" not in srv.stderr.read_text()


def test_two_servers_can_share_one_log_file(tmp_path: Path) -> None:
    """Two server processes (one of each kind) write to one --log-file; both processes' lines
    are there."""
    log_file = tmp_path / "shared.log"
    with (
        server(tmp_path, "--log-file", str(log_file)) as first,
        server(tmp_path, "--log-file", str(log_file), aio=True) as second,
    ):
        assert first.stop() == 0
        assert second.stop() == 0
    # Each record starts "DATE TIME PID LEVEL ..." (server.LOG_FORMAT).
    pids = set(re.findall(r"^\S+ \S+ (\d+) ", log_file.read_text(), re.MULTILINE))
    assert pids == {str(first.process.pid), str(second.process.pid)}


@pytest.mark.parametrize(
    "args",
    [
        ["server.py", "--address", "nonsense"],
        ["server.py", "--address", "127.0.0.1:99999"],
        ["server.py", "--address", "127.0.0.1:http"],
        ["server.py", "--address", "::1:0"],
        ["server.py", "--step-seconds", "-1"],
        ["server.py", "--step-seconds", "nan"],
        ["server.py", "--max-workers", "0"],
        ["server.py", "--store", "no-such-store:"],
        ["server.py", "--no-such-flag"],
        ["server.py", "--tokens", "no-such-tokens.txt"],
        ["server.py", "--tls-cert", str(EXAMPLE / "tls.proto"), "--tls-key", "x.key"],
        ["client.py", "--dut", "some host"],
        ["client.py", "--target", "127.0.0.1:0", "--dut", "some host"],
        ["client.py", "--target", "127.0.0.1:1", "--dut", "x", "--timeout", "-3"],
        ["client.py", "--target", "127.0.0.1:1", "--dut", "x", "--tls-ca", "no-such-ca.pem"],
        ["demo.py", "--step-seconds", "-0.5"],
    ],
    ids=lambda args: " ".join(Path(arg).name if "/" in arg else arg for arg in args),
)
def test_bad_flags_exit_2_without_traceback(args: list[str]) -> None:
    """Bad flags end in argparse's usage message and exit code 2, never a traceback."""
    result = run(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("usage: ")
    assert "Traceback" not in result.stderr


# In-process: the servicer on lrofw.testing's real server.


def example_modules() -> tuple[Any, Any, Any]:
    """Imports servicer, tls_pb2 and tls_pb2_grpc from the example; skips without lrofw.testing."""
    pytest.importorskip("lrofw.testing")
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    # By name: the example's folder is not on mypy's (or ruff's) path.
    servicer, tls_pb2, tls_pb2_grpc = (
        importlib.import_module(name) for name in ("servicer", "tls_pb2", "tls_pb2_grpc")
    )
    return servicer, tls_pb2, tls_pb2_grpc


def servicer_for(aio: bool, step_seconds: float) -> Any:
    """The example's servicer for that server: AsyncCommon for grpc.aio, Common otherwise."""
    servicer, _, _ = example_modules()
    return (servicer.AsyncCommon if aio else servicer.Common)(step_seconds=step_seconds)


def future_of(channel: grpc.Channel, operation: Any) -> Any:
    """An lrofw.OperationFuture for a ProvisionDut operation."""
    _, tls_pb2, _ = example_modules()
    import lrofw

    return lrofw.OperationFuture(
        channel,
        operation,
        tls_pb2.ProvisionDutResponse,
        metadata_type=tls_pb2.ProvisionDutMetadata,
    )


def test_both_servicers_have_the_same_method() -> None:
    """AsyncCommon's handler is the async twin of Common's, declared by the same decorator."""
    servicer, _, _ = example_modules()
    assert not inspect.iscoroutinefunction(servicer.Common.ProvisionDut)
    assert inspect.iscoroutinefunction(servicer.AsyncCommon.ProvisionDut)
    assert inspect.signature(servicer.Common.ProvisionDut).parameters.keys() == (
        inspect.signature(servicer.AsyncCommon.ProvisionDut).parameters.keys()
    )


@BOTH_SERVERS
def test_servicer_in_process(aio: bool) -> None:
    """The servicer provisions 'some host', reports NOT_FOUND otherwise, rejects an empty name,
    and a repeated request_id gets the same operation."""
    _, tls_pb2, tls_pb2_grpc = example_modules()
    import lrofw.testing

    with lrofw.testing.serve(servicer_for(aio, step_seconds=0.01), aio=aio) as srv:
        stub = tls_pb2_grpc.CommonStub(srv.channel)

        def provision(name: str, request_id: str = "") -> Any:
            request = tls_pb2.ProvisionDutRequest(
                name=name, image_path="img/2", request_id=request_id
            )
            return future_of(srv.channel, stub.ProvisionDut(request, timeout=10))

        ok = provision("some host")
        assert ok.result(timeout=10) == tls_pb2.ProvisionDutResponse(installed_image="img/2")
        assert ok.metadata == tls_pb2.ProvisionDutMetadata(stage="done", percent=100)

        with pytest.raises(lrofw.OperationError) as not_found:
            provision("elsewhere").result(timeout=10)
        assert not_found.value.code == grpc.StatusCode.NOT_FOUND
        assert not_found.value.message == "Unknown DUT elsewhere"

        with pytest.raises(grpc.RpcError) as invalid:
            stub.ProvisionDut(tls_pb2.ProvisionDutRequest(name=""), timeout=10)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        first = provision("some host", request_id="req-1")
        assert provision("some host", request_id="req-1").name == first.name


@BOTH_SERVERS
def test_servicer_stops_when_cancelled(aio: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Cancelling a provisioning ends it with CANCELLED at once; the handler stops sleeping."""
    _, tls_pb2, tls_pb2_grpc = example_modules()
    import lrofw.testing

    caplog.set_level(logging.INFO, logger="tls_provision.servicer")
    with lrofw.testing.serve(servicer_for(aio, step_seconds=60.0), aio=aio) as srv:
        stub = tls_pb2_grpc.CommonStub(srv.channel)
        operation = stub.ProvisionDut(tls_pb2.ProvisionDutRequest(name="some host"), timeout=10)
        future = future_of(srv.channel, operation)
        future.cancel()
        with pytest.raises(lrofw.OperationError) as cancelled:
            future.result(timeout=10)
        assert cancelled.value.code == grpc.StatusCode.CANCELLED
    # The block's end waited (grace, 1 s) for the handler, far less than a 60 s stage.
    assert f"{operation.name}: provisioning 'some host': stopped during downloading" in caplog.text
