"""Memory per finished operation in a store of N, and the time to expire all N.

Run by ``python -m benchmarks`` in a process of its own per store (so that one store's memory
does not hide in another's)::

    python -m benchmarks.store_size --store memory --ops 1000000
    python -m benchmarks.store_size --store sqlite --ops 1000000

- ``memory``: N operations written through the API (``Manager.new_operation`` then
  ``set_result`` with a small response) into a ``MemoryStore``; the process's resident memory
  (VmRSS) before and after, divided by N. Then ``Manager.expire`` removes all N (a fake clock
  puts them past the TTL): its wall time.
- ``sqlite``: N finished operations bulk-loaded through the store's own schema (the fill of
  ``benchmarks/large_store.py``, which checks that its rows are exactly what the API writes);
  the file's size after a checkpoint, divided by N. Then ``Manager.expire`` removes all N: its
  wall time. SQLite's expiry is paced on purpose (small transactions, each followed by a pause
  twice its length) so that requests keep their latency while a million operations go.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

from benchmarks._proc import rss_kb


def memory(ops: int) -> dict[str, float]:
    from google.protobuf import duration_pb2

    from lrofw import Manager
    from lrofw.stores.memory import MemoryStore

    now = [time.time()]
    manager = Manager(MemoryStore(), expiry_interval=1e9, clock=lambda: now[0])
    response = duration_pb2.Duration(seconds=1)  # a small response message
    warm = [manager.new_operation("/bench.Service/Run") for _ in range(1000)]
    for op in warm:
        manager.set_result(op.name, response)
    gc.collect()
    before = rss_kb(os.getpid())
    start = time.perf_counter()
    for _ in range(ops):
        op = manager.new_operation("/bench.Service/Run")
        manager.set_result(op.name, response)
    write_seconds = time.perf_counter() - start
    gc.collect()
    after = rss_kb(os.getpid())
    start = time.perf_counter()
    removed = manager.expire(now=now[0] + manager.ttl + 1)
    expire_seconds = time.perf_counter() - start
    manager.close()
    if removed != ops + len(warm):
        raise SystemExit(f"expire removed {removed}, expected {ops + len(warm)}")
    return {
        "ops": ops,
        "bytes_per_op": (after - before) * 1024 / ops,
        "write_us_per_op": 1e6 * write_seconds / ops,
        "expire_seconds": expire_seconds,
    }


def sqlite(ops: int) -> dict[str, float]:
    from benchmarks import large_store

    with tempfile.TemporaryDirectory() as folder:
        store = large_store.Store("n", os.path.join(folder, "ops.db"), ops, seed=1)
        try:
            large_store.fill(store)
            large_store.check_fill(store)
            size, per_op = large_store.bytes_per_op(store)
            start = time.perf_counter()
            removed = store.manager.expire(now=store.cutoff_now)
            expire_seconds = time.perf_counter() - start
        finally:
            store.close()
    if removed != ops:
        raise SystemExit(f"expire removed {removed}, expected {ops}")
    return {
        "ops": ops,
        "bytes_per_op": per_op,
        "file_bytes": size,
        "expire_seconds": expire_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--store", choices=("memory", "sqlite"), required=True)
    parser.add_argument("--ops", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    result = memory(args.ops) if args.store == "memory" else sqlite(args.ops)
    print(json.dumps({"store": args.store, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
