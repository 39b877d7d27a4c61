"""The Celery benchmark's own Redis: started on a free port, persistence off, always stopped;
skipped, not failed, without redis-server; the Celery app never falls back to a running Redis."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import _redis

ROOT = Path(__file__).resolve().parent.parent
needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


def command(port: int, *words: str) -> bytes:
    """Sends one inline Redis command to 127.0.0.1:port; the raw reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(" ".join(words).encode() + b"\r\n")
        return connection.recv(4096)


@needs_redis
def test_a_fresh_redis_on_a_free_port_without_persistence() -> None:
    """It answers on its own port, saves nothing, and is gone with its directory afterwards."""
    with _redis.redis_server() as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert command(server.port, "PING") == b"+PONG\r\n"
        assert command(server.port, "DBSIZE") == b":0\r\n"
        assert command(server.port, "CONFIG", "GET", "save") == b"*2\r\n$4\r\nsave\r\n$0\r\n\r\n"
        directory = command(server.port, "CONFIG", "GET", "dir").split(b"\r\n")[4].decode()
        assert Path(directory).is_dir()
    assert server.process.returncode is not None
    assert not Path(directory).exists()
    with pytest.raises(OSError):
        command(server.port, "PING")


@needs_redis
def test_it_is_stopped_when_the_block_fails() -> None:
    """An exception (or Ctrl-C) inside the block still stops the server."""
    with pytest.raises(KeyboardInterrupt), _redis.redis_server() as server:
        raise KeyboardInterrupt
    assert server.process.returncode is not None


@needs_redis
def test_a_port_taken_before_redis_binds_it_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process takes the free port first: the next attempt uses another one."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = iter([busy, _redis._free_port()])
        monkeypatch.setattr(_redis, "_free_port", lambda: next(ports))
        with _redis.redis_server() as server:
            assert server.port != busy
            assert command(server.port, "PING") == b"+PONG\r\n"


def test_without_redis_server_it_is_a_skip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No redis-server on PATH: Skipped, with what to install, and nothing started."""
    monkeypatch.setenv("PATH", str(tmp_path))
    missing = pytest.raises(_redis.RedisServerMissing, match="redis-server is not on PATH")
    with missing, _redis.redis_server():
        pytest.fail("the block ran without a Redis")


def test_the_celery_app_has_no_default_redis() -> None:
    """Without the URL of the benchmark's own Redis the app refuses to load (no 6379 default)."""
    pytest.importorskip("celery")
    env = {k: v for k, v in os.environ.items() if k != _redis.URL_VARIABLE}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", "import benchmarks._celery_app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert f"{_redis.URL_VARIABLE} is not set" in done.stderr
