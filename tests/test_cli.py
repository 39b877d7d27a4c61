"""Tests for the ``lrofw`` command: ``python -m lrofw`` run as a process against the example's
server processes (plaintext, TLS with a token, mutual TLS), every subcommand, output mode and
exit code."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_example import ENV, Server, free_port, read_line, server
from test_example_security import (  # the pki fixture is used by name
    TOKENS,
    Pki,
    bearer,
    channel,
    create,
    pki,  # noqa: F401
    tls_flags,
    tls_pb2,
)

import lrofw
from lrofw import _cli_render as render
from lrofw.cli import EXIT_CODES

RUN_TIMEOUT = 30.0  # seconds for one command to finish


def lrofw_cmd(
    *args: str, env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m lrofw ARGS`` to its end."""
    return subprocess.run(
        [sys.executable, "-m", "lrofw", *args],
        capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=timeout, check=False,
    )  # fmt: skip


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    """The command said what it had to in lines of its own, never a traceback."""
    assert "Traceback" not in result.stderr, result.stderr


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A plaintext example server, on the memory store, whose stages take 0.05 s."""
    with server(tmp_path_factory.mktemp("plain"), "--store", "memory:") as running:
        yield running


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An example server whose operations run for minutes unless cancelled."""
    folder = tmp_path_factory.mktemp("slow")
    with server(folder, "--store", "memory:", step_seconds=120.0) as running:
        yield running


def finished(target: str, *duts: str) -> list[str]:
    """Creates one operation per DUT on ``target`` and waits until all are done: their names."""
    with channel(target) as ch:
        names = [create(ch, dut=dut).name for dut in duts]
        for name in names:
            lrofw.wait(ch, name, timeout=RUN_TIMEOUT)
    return names


def running(target: str) -> str:
    """Creates an operation on ``target`` (the slow server's: it stays running)."""
    with channel(target) as ch:
        name: str = create(ch).name
    return name


def test_list_prints_a_table_and_json_lines_and_follows_pages(plain: Server) -> None:
    """list: a table by default; --json one object per line, metadata and response unpacked;
    --page-size pages, the rest with --all; --filter goes to the server."""
    good = finished(plain.target, "some host", "some host", "some host")
    (bad,) = finished(plain.target, "no such host")

    table = lrofw_cmd("ops", "list", "--target", plain.target)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["NAME", "DONE", "RESULT", "METADATA"]
    by_name = {row.split()[0]: row for row in rows}
    assert set(good) | {bad} <= set(by_name)
    assert by_name[good[0]].split()[1:] == [
        "yes", "OK", "chromiumos.config.api.test.tls.ProvisionDutMetadata"
    ]  # fmt: skip
    assert "NOT_FOUND: Unknown DUT no such host" in by_name[bad]

    one_page = lrofw_cmd("ops", "list", "--target", plain.target, "--json", "--page-size", "2")
    assert one_page.returncode == 0, one_page.stderr
    assert len(one_page.stdout.splitlines()) == 2
    assert "add --all" in one_page.stderr

    every = lrofw_cmd(
        "ops", "list", "--target", plain.target, "--json", "--page-size", "2", "--all"
    )
    assert every.returncode == 0, every.stderr
    ops = {op["name"]: op for op in map(json.loads, every.stdout.splitlines())}
    assert set(ops) == set(by_name)
    assert ops[good[0]]["response"] == {
        "@type": "type.googleapis.com/chromiumos.config.api.test.tls.ProvisionDutResponse",
        "installedImage": "img/9",
    }
    assert ops[good[0]]["metadata"]["percent"] == 100
    assert ops[bad]["error"] == {"code": 5, "message": "Unknown DUT no such host"}

    failed = lrofw_cmd(
        "ops", "list", "--target", plain.target, "--json", "--filter", "error.code = NOT_FOUND"
    )
    assert failed.returncode == 0, failed.stderr
    assert bad in failed.stdout
    assert not set(good) & {json.loads(line)["name"] for line in failed.stdout.splitlines()}


def test_get_and_wait_show_a_block_and_exit_by_the_result(plain: Server) -> None:
    """get/wait of a finished operation: a readable block (or JSON), 0 for a response, 1 with
    the code name and message for an error."""
    good, bad = finished(plain.target, "some host", "no such host")
    for command in ("get", "wait"):
        shown = lrofw_cmd("ops", command, good, "--target", plain.target)
        assert shown.returncode == 0, shown.stderr
        assert f"name:     {good}\ndone:     yes\nresult:   OK\n" in shown.stdout
        assert 'installed_image: "img/9"' in shown.stdout

        failed = lrofw_cmd("ops", command, bad, "--target", plain.target, "--json")
        assert failed.returncode == 1
        assert json.loads(failed.stdout)["error"]["code"] == 5
        assert f"{bad} failed: NOT_FOUND: Unknown DUT no such host" in failed.stderr


def test_wait_shows_progress_and_ends_at_its_timeout(slow: Server) -> None:
    """wait --timeout: a progress line from the metadata (plain text off a terminal), then exit
    1 when the operation is not done in time; get of a running operation exits 0."""
    name = running(slow.target)
    got = lrofw_cmd("ops", "get", name, "--target", slow.target)
    assert got.returncode == 0, got.stderr
    assert "done:     no" in got.stdout

    waited = lrofw_cmd("--target", slow.target, "ops", "wait", name, "--timeout", "1.5")
    assert waited.returncode == 1
    assert f"{name}: 0% stage=downloading" in waited.stderr
    assert f"{name} was not done after 1.5 s (--timeout)" in waited.stderr
    assert "done:     no" in waited.stdout  # the latest state seen
    no_traceback(waited)


def test_cancel_and_delete(slow: Server) -> None:
    """cancel ends a running operation with CANCELLED; delete removes it; both then NOT_FOUND."""
    name = running(slow.target)
    cancelled = lrofw_cmd("ops", "cancel", name, "--target", slow.target)
    assert (cancelled.returncode, cancelled.stdout) == (0, f"cancel requested: {name}\n")
    waited = lrofw_cmd("ops", "wait", name, "--target", slow.target, "--timeout", "20")
    assert waited.returncode == 1
    assert f"{name} failed: CANCELLED" in waited.stderr

    deleted = lrofw_cmd("ops", "delete", name, "--target", slow.target)
    assert (deleted.returncode, deleted.stdout) == (0, f"deleted: {name}\n")
    for command in ("get", "wait", "cancel", "delete"):
        gone = lrofw_cmd("ops", command, name, "--target", slow.target)
        assert gone.returncode == 1, command
        assert "NOT_FOUND" in gone.stderr
        assert len(gone.stderr.splitlines()) == 1, gone.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ops", "list"], "lrofw: --target HOST:PORT is required\n"),
        (["ops", "get"], "NAME"),
        (["ops", "frobnicate", "--target", "h:1"], "invalid choice"),
        (["ops", "list", "--target", "h:1", "--page-size", "-1"], "must be >= 0"),
        (["ops", "wait", "x", "--target", "h:1", "--timeout", "soon"], "expected seconds"),
        (["ops", "list", "--target", "h:1", "--tls-cert", "c.pem"], "go together"),
        (["ops", "list", "--target", "h:1", "--tls-ca", "no-such-ca.pem"], "cannot read"),
        (["ops", "list", "--target", "127.0.0.1:{port}"], "cannot connect to 127.0.0.1:"),
    ],
    ids=["no target", "no name", "unknown", "page size", "timeout", "half pair", "ca", "down"],
)
def test_usage_and_connection_failures_exit_2_in_one_line(args: list[str], message: str) -> None:
    """Bad usage and an unreachable target: exit 2 with one line on stderr, no traceback."""
    result = lrofw_cmd(*(arg.format(port=free_port()) for arg in args))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert message in result.stderr


def test_help_lists_the_exit_codes() -> None:
    """lrofw --help documents every exit code and both readings of --timeout."""
    result = lrofw_cmd("--help")
    assert result.returncode == 0
    for code in EXIT_CODES:
        assert f"\n  {code:<4}" in result.stdout
    assert "the longest wait in all" in result.stdout


def test_sigint_while_waiting_exits_130(slow: Server) -> None:
    """Ctrl-C during wait: exit 130 and one line, no traceback."""
    name = running(slow.target)
    with subprocess.Popen(
        [sys.executable, "-m", "lrofw", "ops", "wait", name, "--target", slow.target],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    ) as process:  # fmt: skip
        assert process.stderr is not None
        assert read_line(process.stderr, RUN_TIMEOUT).startswith(f"{name}: 0%")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=RUN_TIMEOUT) == 130
        rest = process.stderr.read()
    assert "lrofw: interrupted" in rest
    assert "Traceback" not in rest


def test_tls_and_token(pki: Pki, tmp_path: Path) -> None:  # noqa: F811
    """--tls-ca with --token or LROFW_TOKEN: the caller's operations; without a token the
    server's UNAUTHENTICATED (exit 1); an untrusted server a connection failure (exit 2)."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKENS)
    with server(tmp_path, "--store", "memory:", "--tokens", str(tokens), *tls_flags(pki)) as srv:
        with channel(srv.target, pki) as ch:
            mine = create(ch, bearer("tok-alice")).name
            theirs = create(ch, bearer("tok-bob")).name
            lrofw.wait(ch, mine, timeout=RUN_TIMEOUT, metadata=bearer("tok-alice"))
        tls = ["--target", srv.target, "--tls-ca", str(pki.ca)]

        by_flag = lrofw_cmd("ops", "list", *tls, "--token", "tok-alice", "--json")
        by_env = lrofw_cmd("ops", "list", *tls, "--json", env={"LROFW_TOKEN": "tok-alice"})
        for result in (by_flag, by_env):
            assert result.returncode == 0, result.stderr
            (op,) = map(json.loads, result.stdout.splitlines())
            assert op["name"] == mine and op["done"] is True
            assert op["response"]["installedImage"] == "img/9"
        assert theirs not in by_flag.stdout

        waited = lrofw_cmd("ops", "wait", mine, *tls, env={"LROFW_TOKEN": "tok-alice"})
        assert waited.returncode == 0, waited.stderr

        anonymous = lrofw_cmd("ops", "get", mine, *tls)
        assert anonymous.returncode == 1
        assert anonymous.stderr.startswith("lrofw: GetOperation: UNAUTHENTICATED")

        wrong_ca = str(pki.alice_cert)  # not the CA that signed the server's certificate
        untrusted = lrofw_cmd("ops", "list", "--target", srv.target, "--tls-ca", wrong_ca)
        assert untrusted.returncode == 2
        assert "over TLS" in untrusted.stderr
        no_traceback(untrusted)


def test_mutual_tls(pki: Pki, tmp_path: Path) -> None:  # noqa: F811
    """--tls-cert/--tls-key present a client certificate; a server that requires one refuses
    a client without (exit 2)."""
    with server(tmp_path, "--store", "memory:", *tls_flags(pki, client_ca=True)) as srv:
        tls = ["--target", srv.target, "--tls-ca", str(pki.ca)]
        with_cert = lrofw_cmd(
            "ops", "list", *tls, "--tls-cert", str(pki.alice_cert), "--tls-key", str(pki.alice_key)
        )
        assert with_cert.returncode == 0, with_cert.stderr
        assert with_cert.stdout.split() == ["NAME", "DONE", "RESULT", "METADATA"]
        without = lrofw_cmd("ops", "list", *tls)
        assert without.returncode in (1, 2), without.stderr
        assert len(without.stderr.splitlines()) == 1, without.stderr


def test_progress_bar_and_plain_line() -> None:
    """The progress line reads a percent field: a bar for a terminal, a number otherwise."""
    op = lrofw.client.Operation(name="operations/x")
    op.metadata.Pack(tls_pb2.ProvisionDutMetadata(stage="flashing", percent=50))
    types = render.Types()
    assert render.progress(op, types, bar=False) == "50% stage=flashing"
    assert render.progress(op, types, bar=True) == f"[{'#' * 15}{'.' * 15}]  50% stage=flashing"
    assert render.progress(lrofw.client.Operation(name="x"), types, bar=False) == "waiting"


def test_unknown_types_are_shown_as_the_any() -> None:
    """Without the message's type (no import, no reflection), JSON carries @type and value."""
    op: Any = lrofw.client.Operation(name="operations/x", done=True)
    op.response.type_url = "type.googleapis.com/nowhere.Unknown"
    op.response.value = b"\x08\x01"
    assert json.loads(render.as_json(op, render.Types()))["response"] == {
        "@type": "type.googleapis.com/nowhere.Unknown", "value": "CAE="
    }  # fmt: skip
    assert "(2 bytes; its type is not known here)" in render.block(op, render.Types())
