"""Celery 5 + Redis: submit-to-result of a no-op task, with 1 and 8 concurrent clients.

A contender for comparison with lrofw: how many "create a job, wait for its result" round trips
per second Celery does on this machine, what each costs in CPU, and how long one takes.

Run it (from the repository root)::

    python -m benchmarks.celery_bench            # 10 s per client count
    python -m benchmarks.celery_bench --quick    # 2 s per client count (well under 15 s in all)

How it measures:

- **Setup.** A Redis of the benchmark's own is both the broker and the result backend: a
  ``redis-server`` started on a free port of 127.0.0.1 in a temporary directory, persistence
  off, and stopped at the end, also on failure or Ctrl-C (``benchmarks._redis``); a Redis that
  is already running (on 6379, say) is never touched. Without ``redis-server`` on PATH the
  contender is skipped, and the report says so. The app, the task and the client are in
  ``benchmarks/_celery_app.py``, which gets the URL from the environment; all settings are
  Celery's defaults (see there).
- **Worker.** ``python -m celery -A benchmarks._celery_app worker --pool=prefork
  --concurrency=2 --loglevel=WARNING --without-mingle``: the prefork pool with one child per
  core (2 here, which is also Celery's default, the CPU count), and WARNING, which is the
  worker's default log level too (at INFO the worker logs two lines per task, a cost of its own
  and not of Celery's queueing). ``--without-mingle`` skips a start-up-only step (asking other
  workers, of which there are none, for their state: about a second of waiting); it changes
  nothing once the worker runs. It counts as ready once it answers ``app.control.ping`` and one
  task has made a full round trip; never after a fixed sleep. It is stopped with SIGTERM
  (Celery's warm shutdown), then killed, with its pool, if it has not exited within 10 s.
- **Clients.** ``benchmarks._load.run_clients`` with N processes (1 and 8) of one thread each:
  each is a loop of ``noop.delay().get(timeout=30)``, one submit-to-result after another. After
  a warm-up, the round trips that begin and end inside the window count; rate = ops / window;
  p50/p99 are over their latencies.
- **CPU.** Per operation, over the same window: the clients' own CPU (``time.process_time`` in
  each client process), the worker's whole process tree (main process and pool children) and
  ``redis-server`` (the one started for the run), read from ``/proc`` at the window's edges;
  ``total`` is their sum. **Memory**: the peak resident memory (VmHWM) of the worker tree,
  summed over its processes, read at the end of each measurement (so it only grows).
- **Noise.** The machine may be shared (another benchmark running at the same time distorts
  every figure here). Each row also has ``other_cpu_pct``: the share of all CPUs, over the
  window, busy with anything but the clients, the worker and Redis (from ``/proc/stat``). Trust
  a row only when it is near 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from benchmarks._load import run_clients
from benchmarks._proc import (
    CLOCK_TICKS,
    ROOT,
    Skipped,
    cpu_seconds,
    exit_on_sigterm,
    peak_rss_kb,
)
from benchmarks._redis import URL_VARIABLE, die_with_parent, redis_server

CONTENDER = "Celery 5 + Redis"
FACTORY = "benchmarks._celery_app:client"
WORKER_HOSTNAME = f"lrofw-bench-{os.getpid()}@%h"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def _percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, nearest-rank; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _check_prerequisites() -> None:
    """Celery and redis-py importable (redis-server itself: ``benchmarks._redis``)."""
    try:
        import celery  # type: ignore[import-untyped]  # noqa: F401
        import redis  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"Celery or redis-py is not installed ({exc}); "
            "install them with: .venv/bin/pip install 'celery[redis]'"
        ) from None


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for the block (the worker and the clients inherit it)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


@dataclass
class Worker:
    """A running Celery worker: its process (the pool's parent) and the output it has printed."""

    process: subprocess.Popen[str]
    hostname: str
    output: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output[-lines:])


def _wait_ready(worker: Worker, app: Any, timeout: float) -> None:
    """Until the worker answers a ping and one task has made a full round trip."""
    from benchmarks._celery_app import NOOP

    deadline = time.monotonic() + timeout
    while True:
        if worker.process.poll() is not None:
            raise RuntimeError(
                f"the Celery worker exited with code {worker.process.returncode} before it was "
                f"ready:\n{worker.tail()}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the Celery worker did not answer a ping within {timeout:.0f} s:\n{worker.tail()}"
            )
        # limit=1: return as soon as our one worker answers rather than after the timeout.
        replies = app.control.ping(destination=[worker.hostname], timeout=0.5, limit=1)
        if replies:
            break
    app.tasks[NOOP].delay().get(timeout=max(1.0, deadline - time.monotonic()))


def _stop(worker: Worker) -> None:
    """SIGTERM (warm shutdown), then SIGKILL to the worker's whole process group after a bound."""
    process = worker.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # The worker was started in a session of its own: its group is exactly it and its
            # pool children.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def celery_worker(app: Any) -> Iterator[Worker]:
    """Start the worker from the repository root, yield it once ready, stop it on exit.

    ``app`` is this process' own Celery app on the same Redis (to ping the worker with); the
    worker finds the Redis' URL in the environment (:func:`_environment`).
    """
    hostname = WORKER_HOSTNAME.replace("%h", os.uname().nodename)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "benchmarks._celery_app",
            "worker",
            "--pool=prefork",
            "--concurrency=2",
            "--loglevel=WARNING",
            # Mingle only runs at start-up: the worker asks the other workers for their revoked
            # task ids and logical clock and waits about a second for answers; there are none
            # here, so it would only add that second to every run, not change what is measured.
            "--without-mingle",
            f"--hostname={hostname}",
        ],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=die_with_parent(),  # SIGTERM (warm shutdown) if this process dies
    )
    worker = Worker(process, hostname)
    assert process.stdout is not None
    stdout = process.stdout

    def drain() -> None:
        for line in stdout:
            worker.output.append(line.rstrip("\n"))

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        _wait_ready(worker, app, START_TIMEOUT)
        yield worker
    finally:
        _stop(worker)
        reader.join(5)


def _machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / CLOCK_TICKS


def _measure(worker: Worker, redis_pid: int, clients: int, seconds: float) -> dict[str, object]:
    edges: dict[str, tuple[float, float, float]] = {}

    def sample(edge: str) -> None:
        edges[edge] = (
            cpu_seconds(worker.pid, tree=True),
            cpu_seconds(redis_pid),
            _machine_busy(),
        )

    result = run_clients(
        FACTORY,
        {},
        processes=clients,
        threads=1,
        seconds=seconds,
        warmup=0.5,
        on_start=lambda: sample("start"),
        on_end=lambda: sample("end"),
    )
    worker_cpu, redis_cpu, busy = (b - a for a, b in zip(edges["start"], edges["end"], strict=True))
    ours = result.client_cpu + worker_cpu + redis_cpu
    ops = result.ops

    def per_op_ms(cpu: float) -> float:
        return round(cpu / ops * 1000, 3) if ops else 0.0

    return {
        "contender": CONTENDER,
        "clients": clients,
        "create_to_result_per_s": round(result.rate, 1),
        "p50_ms": round(statistics.median(result.latencies) * 1000, 3) if ops else 0.0,
        "p99_ms": round(_percentile(result.latencies, 99) * 1000, 3),
        "cpu_ms_per_op": {
            "client": per_op_ms(result.client_cpu),
            "worker": per_op_ms(worker_cpu),
            "redis": per_op_ms(redis_cpu),
            "total": per_op_ms(ours),
        },
        "peak_mem_mb": round(peak_rss_kb(worker.pid, tree=True) / 1024, 1),
        "ops": ops,
        "errors": result.errors,
        "first_error": result.first_error,
        # Not part of the figure: how much of the machine's CPU something else used in the
        # window (another benchmark, say). Far above a few percent, the row is not to be trusted.
        "other_cpu_pct": round(max(0.0, busy - ours) / (seconds * (os.cpu_count() or 1)) * 100, 1),
    }


def run(
    *, quick: bool, clients: tuple[int, ...] = (1, 8), seconds: float | None = None
) -> list[dict[str, object]]:
    """Start a Redis and a worker, measure each client count in turn, stop both; a row a count.

    Raises:
        benchmarks._redis.RedisServerMissing: no ``redis-server`` (a :class:`Skipped`).
        RuntimeError: Celery or redis-py missing, or the worker or Redis did not start.
    """
    _check_prerequisites()
    import redis

    window = seconds if seconds is not None else (2.0 if quick else 10.0)
    rows: list[dict[str, object]] = []
    with redis_server() as server, _environment(URL_VARIABLE, server.url):
        with contextlib.closing(redis.Redis.from_url(server.url, socket_timeout=5)) as connection:
            redis_version = str(connection.info("server")["redis_version"])
        versions = {
            "celery": importlib.metadata.version("celery"),
            "redis-py": importlib.metadata.version("redis"),
            "redis-server": redis_version,
        }
        # Imported only now: the module makes its app from the URL in the environment.
        from benchmarks._celery_app import make_app

        app = make_app(server.url)
        try:
            with celery_worker(app) as worker:
                for count in clients:
                    row = _measure(worker, server.pid, count, window)
                    row["versions"] = versions
                    rows.append(row)
        finally:
            app.close()
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| contender | clients | jobs/s | p50 ms | p99 ms | CPU ms/job: client | worker | redis "
        "| total | worker peak MB | ops | errors | other CPU % |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        cpu = row["cpu_ms_per_op"]
        assert isinstance(cpu, dict)
        lines.append(
            f"| {row['contender']} | {row['clients']} | {row['create_to_result_per_s']:.0f} "
            f"| {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {cpu['client']:.2f} "
            f"| {cpu['worker']:.2f} | {cpu['redis']:.2f} | {cpu['total']:.2f} "
            f"| {row['peak_mem_mb']:.1f} | {row['ops']} | {row['errors']} "
            f"| {row['other_cpu_pct']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s per client count")
    parser.add_argument("--seconds", type=float, help="window per client count (default 10)")
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[1, 8], help="client counts (1 8)"
    )
    options = parser.parse_args(argv)
    exit_on_sigterm()
    try:
        rows = run(quick=options.quick, clients=tuple(options.clients), seconds=options.seconds)
    except Skipped as exc:
        print(f"celery_bench: skipped: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"celery_bench: {exc}", file=sys.stderr)
        return 1
    print(markdown(rows))
    if rows:
        print(f"\nversions: {rows[0]['versions']}")
    for row in rows:
        if row["errors"]:
            print(f"{row['clients']} clients: first error: {row['first_error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
