"""The store's own write path, in process: create + finish, one thread and eight.

Run by ``python -m benchmarks`` (its ``store`` section), or alone::

    python -m benchmarks.store_write --store sqlite
    python -m benchmarks.store_write --store memory --seconds 1 --rounds 3

One operation is what the manager asks of its store for a no-op operation: ``insert`` of a new
operation (a uuid4 name, owned by this process) and ``finish`` of it with a small response,
fenced by that owner. Each window runs on a fresh store (a new file in a temporary folder for
SQLite) for ``--seconds``: first with one thread, one operation after another, then with
``--threads`` threads at once; ``--rounds`` pairs of windows, the median of each. It reports
the single-threaded cost in microseconds per operation and how many times one thread's
throughput the threads reach together (group commit lets them share a commit). For SQLite each
round also times bare SQLite on the same machine (``raw_window``): the store's cost over it does
not move with the machine's speed as the cost itself does.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from google.longrunning import operations_proto_pb2
from google.protobuf import any_pb2, wrappers_pb2

from lrofw.stores import MemoryStore, NewOperation, SQLiteStore

METHOD = "/bench.Service/Run"
OWNER = "bench-owner"


def _packed() -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(wrappers_pb2.StringValue(value="ok"))
    return out


RESPONSE = _packed()


def one_op(store: Any) -> None:
    """Create and finish one operation, as the manager would for a no-op handler."""
    name = f"operations/{uuid.uuid4()}"
    now = time.time()
    store.insert(operations_proto_pb2.Operation(name=name), now, NewOperation(METHOD, owner=OWNER))
    if store.finish(name, now, response=RESPONSE, owner=OWNER) is None:
        raise RuntimeError(f"finish of {name} refused")


def window(make: Callable[[], Any], threads: int, seconds: float) -> tuple[int, float]:
    """Operations done by ``threads`` threads in about ``seconds`` on a fresh store, and the
    exact wall time they took."""
    store = make()
    try:
        for _ in range(50):  # warm: statements prepared, pages cached
            one_op(store)
        start = threading.Barrier(threads + 1)
        stop = threading.Event()
        counts = [0] * threads
        failures: list[BaseException] = []

        def worker(i: int) -> None:
            start.wait()
            try:
                while not stop.is_set():
                    one_op(store)
                    counts[i] += 1
            except BaseException as exc:  # reported below
                failures.append(exc)

        pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        start.wait()
        began = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        for t in pool:
            t.join()
        took = time.perf_counter() - began
        if failures:
            raise failures[0]
        return sum(counts), took
    finally:
        store.close()


def raw_window(path: str, seconds: float) -> float:
    """Microseconds per operation of bare SQLite on this machine, for reference: what issue 13
    measured beside the store ("in-process, WAL, synchronous=NORMAL, an insert and an update
    with a commit each"), on a table with a unique name, one thread."""
    conn = sqlite3.connect(path, isolation_level=None)  # autocommit: a commit per statement
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("CREATE TABLE ops (position INTEGER PRIMARY KEY, name TEXT UNIQUE, data BLOB)")
        data, done = b"o" * 60, b"d" * 80

        def op() -> None:
            name = f"operations/{uuid.uuid4()}"
            conn.execute("INSERT INTO ops(name, data) VALUES (?, ?)", (name, data))
            conn.execute("UPDATE ops SET data = ? WHERE name = ?", (done, name))

        for _ in range(50):
            op()
        count, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            op()
            count += 1
        return 1e6 * (time.perf_counter() - began) / count
    finally:
        conn.close()


def run(kind: str, *, seconds: float, rounds: int, threads: int) -> dict[str, Any]:
    """Median figures of ``rounds`` pairs of windows (one thread, then ``threads``)."""
    with tempfile.TemporaryDirectory(prefix="lrofw-store-write-") as folder:
        made = [0]

        def make() -> Any:
            if kind == "memory":
                return MemoryStore()
            made[0] += 1
            return SQLiteStore(os.path.join(folder, f"ops-{made[0]}.db"))

        single: list[float] = []
        many: list[float] = []
        raw: list[float] = []
        for round_ in range(rounds):
            for count, rates in ((1, single), (threads, many)):
                ops, took = window(make, count, seconds)
                rates.append(ops / took)
            if kind == "sqlite":
                raw.append(raw_window(os.path.join(folder, f"raw-{round_}.db"), seconds))
    one, all_ = statistics.median(single), statistics.median(many)
    reference = {"raw_us_per_op": statistics.median(raw), "windows_raw_us": raw} if raw else {}
    return {
        **reference,
        "store": kind,
        "threads": threads,
        "us_per_op_1": 1e6 / one,
        "per_s_1": one,
        f"per_s_{threads}": all_,
        "scaling": all_ / one,
        "windows_per_s_1": single,
        f"windows_per_s_{threads}": many,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--store", choices=("memory", "sqlite"), required=True)
    parser.add_argument("--seconds", type=float, default=1.0, help="each window")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of windows (the median)")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    result = run(args.store, seconds=args.seconds, rounds=args.rounds, threads=args.threads)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
