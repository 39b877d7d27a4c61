"""docs/tutorial.md, done exactly as it says: its files written from the page, its proto compiled
with ``python -m lrofw.protoc``, its tests run with pytest, its server started, called by its
client and stopped with SIGTERM, all with the page's own commands."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import lrofw

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "tutorial.md"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    "PYTHONUNBUFFERED": "1",
}
#: Bounds on each step, against hangs only (nothing is timed).
STEP_TIMEOUT = 120

FILE_MARKER = re.compile(r"^<!-- file: (\S+) -->$")


def tutorial_files(text: str) -> dict[str, str]:
    """Each ``<!-- file: NAME -->`` marker's file: the fenced block after it (other HTML
    comment lines, such as a doctest marker, may stand between)."""
    lines = text.splitlines()
    files: dict[str, str] = {}
    for index, line in enumerate(lines):
        marker = FILE_MARKER.match(line.strip())
        if marker is None:
            continue
        start = index + 1
        while lines[start].startswith("<!--"):
            start += 1
        assert lines[start].startswith("```"), f"no code block after the marker of {marker[1]}"
        end = lines.index("```", start + 1)
        assert marker[1] not in files, f"{marker[1]} is written twice"
        files[marker[1]] = "\n".join(lines[start + 1 : end]) + "\n"
    return files


def tutorial_commands(text: str) -> list[list[str]]:
    """The ``python ...`` command lines of the page's ``sh`` blocks, split like a shell would,
    with ``python`` as this interpreter."""
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```$", text, flags=re.M | re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("python "):
                commands.append([sys.executable, *shlex.split(line)[1:]])
    return commands


def command(commands: list[list[str]], script: str) -> list[str]:
    """The one command of the page that runs ``script`` (a file or ``-m module``)."""
    found = [c for c in commands if script in c[1:3]]
    assert len(found) == 1, f"the tutorial should run {script} once: {found}"
    return found[0]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=STEP_TIMEOUT
    )


class Server:
    """The tutorial's server.py as a process: started with the page's command (on a free port),
    stopped with SIGTERM."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.log = (cwd / "server.log").open("a")
        self.proc = subprocess.Popen(
            args, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), f"server said {line!r}"
        self.target = line.split()[-1]

    def terminate(self) -> int:
        """Sends SIGTERM; the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=STEP_TIMEOUT)
        self.close()
        return code

    def kill(self) -> None:
        """Ends the process if it still runs (after a failed test)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.close()

    def close(self) -> None:
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.log.close()


@pytest.fixture(scope="module")
def page() -> str:
    return TUTORIAL.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def project(page: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the tutorial's files written and its proto compiled by its command."""
    folder = tmp_path_factory.mktemp("render")
    for name, content in tutorial_files(page).items():
        (folder / name).write_text(content, encoding="utf-8")
    result = run(command(tutorial_commands(page), "lrofw.protoc"), folder)
    assert result.returncode == 0, result.stdout + result.stderr
    return folder


@pytest.fixture
def server(page: str, project: Path) -> Iterator[Server]:
    args = command(tutorial_commands(page), "server.py")
    args[2:] = ["127.0.0.1:0"]  # the page's address, on a port free here
    started = Server(args, project)
    yield started
    started.kill()


def test_the_tutorial_writes_a_proto_a_service_tests_a_server_and_a_client(page: str) -> None:
    """The page gives every file it talks about, and a command for each step."""
    assert set(tutorial_files(page)) == {
        "render.proto", "renderer.py", "test_renderer.py", "server.py", "client.py",
    }  # fmt: skip
    commands = tutorial_commands(page)
    for script in ("lrofw.protoc", "pytest", "server.py", "client.py"):
        command(commands, script)
    assert "google.longrunning.operation_info" in tutorial_files(page)["render.proto"]


def test_lrofw_protoc_compiles_the_proto(project: Path) -> None:
    """The compile step writes the messages, their types and the gRPC module."""
    assert {"render_pb2.py", "render_pb2.pyi", "render_pb2_grpc.py"} <= {
        p.name for p in project.iterdir()
    }


def test_the_tutorials_tests_pass(page: str, project: Path) -> None:
    """The page's test file passes under its own pytest command, every test of it."""
    result = run([*command(tutorial_commands(page), "pytest"), "-p", "no:cacheprovider"], project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b5 passed\b", result.stdout), result.stdout


def test_the_server_renders_for_the_client_and_stops_cleanly_on_sigterm(
    page: str, project: Path, server: Server
) -> None:
    """The page's client renders its scene on the page's server; SIGTERM lets a running render
    finish within the grace and the process exits 0; a client following it rides through a
    restart on the same address and ops.db, where both operations are finished with their
    videos."""
    client = command(tutorial_commands(page), "client.py")
    result = run([*client[:2], server.target, *client[3:]], project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("started operations/")
    assert "%\n" in result.stdout  # progress was shown
    assert result.stdout.rstrip().endswith("done: file:///renders/teapot.mp4")
    first = result.stdout.split()[1]

    running = subprocess.Popen(
        [*client[:2], server.target, "scenes/bunny", "5"],
        cwd=project, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    restarted: Server | None = None
    try:
        assert running.stdout is not None
        started = running.stdout.readline()
        assert started.startswith("started operations/")
        assert server.terminate() == 0
        # The client sees the render done before the server stops, or goes on asking (lrofw
        # retries UNAVAILABLE) until a server answers on the same address.
        args = command(tutorial_commands(page), "server.py")
        restarted = Server([*args[:2], server.target], project)
        out, _ = running.communicate(timeout=STEP_TIMEOUT)
    finally:
        if running.poll() is None:
            running.kill()
            running.communicate()
    assert running.returncode == 0
    assert out.rstrip().endswith("done: file:///renders/bunny.mp4"), out
    second = started.split()[1]

    try:
        assert restarted.target == server.target
        with grpc.insecure_channel(restarted.target) as channel:
            ops = [lrofw.wait(channel, name, timeout=10) for name in (first, second)]
        for op in ops:  # the second finished within the grace, not ABORTED
            assert op.response.type_url.endswith("/render.v1.RenderResponse"), op
        assert restarted.terminate() == 0
    finally:
        if restarted is not None:
            restarted.kill()
