"""Client load for the benchmarks: P processes x T threads, each a loop of one call after another.

:func:`run_clients` starts ``processes`` copies of this module (``python -m benchmarks._load``).
Each child imports a *factory* (``"module:function"``), calls ``factory(**args)`` once per
thread to get a zero-argument callable (one "client": it makes one call, or one whole
create-then-result, and returns), runs it once to warm up, reports ``ready``, and waits for the
parent's ``go START``. Every thread then calls its client in a loop: calls that end before
``START`` are warm-up; the ones that begin at or after ``START`` and end before
``START + seconds`` are counted, with their latencies. The child's own CPU time over that window
(``time.process_time``, all its threads, including grpc's) is reported too, so that a figure can
add the client's CPU to the server's.

The parent reads the server's CPU at ``START`` and at the end itself (see ``benchmarks._proc``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks._proc import ROOT, sleep_until


@dataclass
class LoadResult:
    """What the clients did in the measured window."""

    ops: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    client_cpu: float = 0.0
    errors: int = 0
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0


def _resolve(spec: str) -> Callable[..., Callable[[], object]]:
    module, _, name = spec.partition(":")
    factory: Callable[..., Callable[[], object]] = getattr(importlib.import_module(module), name)
    return factory


def child_main(factory: str, args: dict[str, Any], threads: int, seconds: float) -> int:
    clients = [_resolve(factory)(**args) for _ in range(threads)]
    for client in clients:
        client()
    print("ready", flush=True)
    line = sys.stdin.readline().split()
    start = float(line[1])
    end = start + seconds
    latencies: list[list[float]] = [[] for _ in clients]
    errors = [0] * len(clients)
    first_error: list[str] = []

    def loop(index: int) -> None:
        client = clients[index]
        mine = latencies[index]
        clock = time.monotonic
        while True:
            began = clock()
            if began >= end:
                return
            try:
                client()
            except Exception as exc:
                errors[index] += 1
                if not first_error:
                    first_error.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            finished = clock()
            if began >= start and finished <= end:
                mine.append(finished - began)

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(len(clients))]
    for worker in workers:
        worker.start()
    sleep_until(start)
    cpu_start = time.process_time()
    sleep_until(end)
    cpu_end = time.process_time()
    for worker in workers:
        worker.join()
    flat = [x for mine in latencies for x in mine]
    print(
        json.dumps(
            {
                "ops": len(flat),
                "latencies": flat,
                "cpu": cpu_end - cpu_start,
                "errors": sum(errors),
                "first_error": first_error[0] if first_error else "",
            }
        ),
        flush=True,
    )
    return 0


def run_clients(
    factory: str,
    args: dict[str, Any] | list[dict[str, Any]],
    *,
    processes: int,
    threads: int = 1,
    seconds: float,
    warmup: float = 0.5,
    on_start: Callable[[], None] | None = None,
    on_end: Callable[[], None] | None = None,
) -> LoadResult:
    """Run the clients; ``on_start``/``on_end`` run in this process at the window's edges.

    ``args`` is the factory's arguments for every process, or a list of them handed out round
    robin (process ``i`` gets ``args[i % len(args)]``: clients spread over several servers).
    """
    per_process = args if isinstance(args, list) else [args]
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks._load",
                "--factory",
                factory,
                "--args",
                json.dumps(per_process[i % len(per_process)]),
                "--threads",
                str(threads),
                "--seconds",
                str(seconds),
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"load client {factory} did not start: {line!r}")
        start = time.monotonic() + warmup
        for child in children:
            assert child.stdin is not None
            child.stdin.write(f"go {start}\n")
            child.stdin.flush()
        sleep_until(start)
        if on_start:
            on_start()
        sleep_until(start + seconds)
        if on_end:
            on_end()
        result = LoadResult(ops=0, seconds=seconds)
        for child in children:
            assert child.stdout is not None
            report = json.loads(child.stdout.readline())
            result.ops += report["ops"]
            result.latencies.extend(report["latencies"])
            result.client_cpu += report["cpu"]
            result.errors += report["errors"]
            result.first_error = result.first_error or report["first_error"]
            child.wait(30)
        return result
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--factory", required=True)
    parser.add_argument("--args", default="{}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, required=True)
    options = parser.parse_args(argv)
    return child_main(options.factory, json.loads(options.args), options.threads, options.seconds)


if __name__ == "__main__":
    sys.exit(main())
