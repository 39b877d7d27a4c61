"""Does a Get stay fast while other clients list worst-case filters over a large store?

The requirement this measures (issue 9, section 4):

    A benchmark shows Get p99 with 4 clients listing worst-case filters over 100k ops within
    3x of Get p99 without them.

Run it (from the repository root)::

    python -m benchmarks.list_pressure            # 100,000 operations per store: about 2 minutes
    python -m benchmarks.list_pressure --quick    # 10,000 operations, short windows: < 30 s
    python -m benchmarks.list_pressure --ops 200000 --seconds 10 --rounds 3 --stores memory

How it measures:

- **Server.** One process per store (``--serve``, below): a sync ``grpc.server`` with 16 RPC
  threads and ``lrofw.SERVER_OPTIONS``, the example's ``Common`` service and lrofw's Operations
  service, a default :class:`lrofw.Manager` (``max_list_scan`` 10,000) on the memory store or on
  a SQLite file.
- **Fill.** ``--ops`` finished operations. The memory store is filled in the server process
  through ``manager.new_operation`` and ``manager.set_result``; the SQLite file is bulk-loaded
  before the server starts by ``benchmarks.large_store.fill`` (the rows the API writes, checked
  against it).
- **Get.** One client process, one ``GetOperation`` after another, of a random name among the
  newest 1,000 (read with one ListOperations call before the window).
- **Listers.** 4 client processes, each one ``ListOperations`` after another (default page size),
  following the page tokens to the end and then starting over with the next filter of:
  ``name=a OR name=b OR ...`` (199 terms, the most that fit in the 2,000-character filter limit;
  none matches), ``method = "/no.Such/Method"`` (matches nothing: every call spends its whole
  scan budget) and ``NOT done = true`` (every filled operation is done: the same).
- **Windows.** ``--seconds`` of Get alone, then ``--seconds`` of Get while the listers run,
  ``--rounds`` times in turn on the same server; the p99 of each condition over its rounds. The
  verdict is Get p99 with listers / Get p99 alone (bound 3x). List latencies and calls per second
  are shown beside it.

Timings on a shared machine are noisy, so the script asserts nothing: it prints the figures, the
ratio and PASS/FAIL, and exits 0 unless the benchmark itself breaks (a server that does not start,
a client that gets errors).
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import random
import string
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from google.longrunning import operations_pb2_grpc as operations_grpc
from google.longrunning import operations_proto_pb2 as operations_pb2
from google.protobuf import wrappers_pb2

import lrofw
from benchmarks._load import LoadResult, run_clients
from benchmarks._proc import serve_sync_until, spawn
from benchmarks._report import percentile
from lrofw.stores import open_store

RATIO_BOUND = 3.0
LISTERS = 4
#: How much longer than the Get window the listers run: it covers the Get client's start-up.
PAD = 3.0
METHOD = "/bench.Service/Run"
#: 199 one-character values: the longest OR of ``name`` terms the 2,000-character limit allows.
NAME_OR = " OR ".join(
    f"name={c}" for c, _ in zip(itertools.cycle(string.ascii_letters), range(199))
)
FILTERS = (NAME_OR, 'method = "/no.Such/Method"', "NOT done = true")


# --- the clients (run in benchmarks._load's processes) -------------------------------------------


def get(target: str) -> Callable[[], object]:
    """One Get client: a random name among the newest 1,000 per call."""
    stub = operations_grpc.OperationsStub(grpc.insecure_channel(target))
    page = stub.ListOperations(operations_pb2.ListOperationsRequest(page_size=1000), timeout=60)
    names = [op.name for op in page.operations]
    if not names:
        raise RuntimeError("the server holds no operations")
    rng = random.Random()

    def call() -> object:
        name = rng.choice(names)
        return stub.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=60)

    return call


def lister(target: str) -> Callable[[], object]:
    """One lister: each call is one ListOperations page; it follows the tokens to the end, then
    starts over with the next filter (each lister starts at a random one)."""
    stub = operations_grpc.OperationsStub(grpc.insecure_channel(target))
    filters = itertools.cycle(FILTERS)
    for _ in range(random.randrange(len(FILTERS))):
        next(filters)
    state = {"filter": next(filters), "token": ""}

    def call() -> object:
        request = operations_pb2.ListOperationsRequest(
            filter=state["filter"], page_token=state["token"]
        )
        page = stub.ListOperations(request, timeout=60)
        state["token"] = page.next_page_token
        if not page.next_page_token:
            state["filter"] = next(filters)
        return page

    return call


# --- the server (``--serve``) ---------------------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    """A sync server on ``args.store``, filled with ``args.fill`` finished operations first."""
    import signal

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from benchmarks._servers import servicers

    bounds = {} if args.max_list_scan is None else {"max_list_scan": args.max_list_scan}
    manager = lrofw.Manager(open_store(args.store), **bounds)
    response = wrappers_pb2.StringValue(value="ok")
    for _ in range(args.fill):
        manager.set_result(manager.new_operation(METHOD).name, response)
    server = grpc.server(futures.ThreadPoolExecutor(args.threads), options=lrofw.SERVER_OPTIONS)
    lrofw.add_servicer_to_server(servicers(None)[0], server, manager=manager)
    serve_sync_until(server, stop, lambda: manager.close(grace=1.0))
    return 0


# --- the measurement ------------------------------------------------------------------------------


def _window(target: str, seconds: float, listers: bool) -> tuple[LoadResult, LoadResult | None]:
    """Get for ``seconds``, alone or while the listers run (they start first and end after)."""
    if not listers:
        return run_clients("benchmarks.list_pressure:get", {"target": target}, processes=1,
                           seconds=seconds), None  # fmt: skip
    started = threading.Event()
    window: dict[str, float] = {}
    listed: list[LoadResult] = []
    failed: list[BaseException] = []

    def run_listers() -> None:
        try:
            listed.append(
                run_clients(
                    "benchmarks.list_pressure:lister",
                    {"target": target},
                    processes=LISTERS,
                    # Long enough to cover the Get client's start-up and its whole window.
                    seconds=seconds + PAD,
                    on_start=lambda: (window.update(start=time.monotonic()), started.set()),
                )
            )
        except BaseException as exc:
            failed.append(exc)
            started.set()

    thread = threading.Thread(target=run_listers)
    thread.start()
    started.wait()
    try:
        if failed:
            raise failed[0]
        got = run_clients(
            "benchmarks.list_pressure:get",
            {"target": target},
            processes=1,
            seconds=seconds,
            on_end=lambda: window.update(end=time.monotonic()),
        )
    finally:
        thread.join()
    if failed:
        raise failed[0]
    if window["end"] > window["start"] + seconds + PAD:
        got.errors += 1
        got.first_error = "the listers stopped before the Get window ended (raise PAD)"
    return got, listed[0]


def measure(
    label: str, spec: str, ops: int, seconds: float, rounds: int, max_scan: int | None = None
) -> dict[str, Any]:
    """Every window on one fresh server; the pooled figures of each condition."""
    fill = ops if spec == "memory:" else 0
    alone: list[float] = []
    pressed: list[float] = []
    lists: list[float] = []
    list_calls = 0
    errors: list[str] = []
    with spawn(
        ["-m", "benchmarks.list_pressure", "--serve", "--store", spec, "--fill", str(fill)]
        + ([] if max_scan is None else ["--max-list-scan", str(max_scan)]),
        timeout=300,
    ) as server:
        for _ in range(rounds):
            got, _ = _window(server.target, seconds, listers=False)
            alone += got.latencies
            errors += [got.first_error] if got.errors else []
            got, listed = _window(server.target, seconds, listers=True)
            pressed += got.latencies
            errors += [got.first_error] if got.errors else []
            assert listed is not None
            lists += listed.latencies
            list_calls += listed.ops
            errors += [listed.first_error] if listed.errors else []
            print(f"  {label}: round done", file=sys.stderr, flush=True)
    row = {
        "store": label,
        "ops": ops,
        "get_alone_p50_ms": 1000 * percentile(alone, 50),
        "get_alone_p99_ms": 1000 * percentile(alone, 99),
        "get_listing_p50_ms": 1000 * percentile(pressed, 50),
        "get_listing_p99_ms": 1000 * percentile(pressed, 99),
        "gets_alone": len(alone),
        "gets_listing": len(pressed),
        "list_p50_ms": 1000 * percentile(lists, 50),
        "list_p99_ms": 1000 * percentile(lists, 99),
        "list_calls_per_s": list_calls / (rounds * (seconds + PAD)),
        "errors": errors,
    }
    alone_p99 = row["get_alone_p99_ms"]
    row["ratio"] = row["get_listing_p99_ms"] / alone_p99 if alone_p99 else float("inf")
    return row


def run(
    *,
    quick: bool,
    ops: int | None = None,
    seconds: float | None = None,
    rounds: int | None = None,
    stores: tuple[str, ...] = ("memory", "sqlite"),
    max_scan: int | None = None,
) -> list[dict[str, Any]]:
    """Measure each store; returns one row of figures per store (what ``python -m benchmarks``
    reports in its ``list`` section)."""
    from benchmarks import large_store

    ops = ops if ops is not None else (10_000 if quick else 100_000)
    seconds = seconds if seconds is not None else (1.0 if quick else 5.0)
    rounds = rounds if rounds is not None else (1 if quick else 2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lrofw-listbench-") as tmp:
        for kind in stores:
            if kind == "memory":
                spec = "memory:"
            else:
                path = str(pathlib.Path(tmp) / "ops.db")
                filled = large_store.Store("sqlite", path, ops, seed=9)
                large_store.fill(filled)
                filled.close()
                spec = f"sqlite:{path}"
            rows.append(measure(kind, spec, ops, seconds, rounds, max_scan))
            print(f"  list {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def verdict(ratio: float) -> str:
    return "PASS" if ratio <= RATIO_BOUND else "FAIL"


def report(rows: list[dict[str, Any]], seconds_note: str) -> str:
    lines = [
        f"Get latency, alone and while {LISTERS} clients list worst-case filters ({seconds_note}):",
        "",
        "| store | ops | Get p50 / p99 alone (ms) | Get p50 / p99 with listers (ms) | "
        "List p50 / p99 (ms) | List calls/s | p99 ratio (bound 3x) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['store']} | {r['ops']:,} | {r['get_alone_p50_ms']:.2f} / "
            f"{r['get_alone_p99_ms']:.2f} | {r['get_listing_p50_ms']:.2f} / "
            f"{r['get_listing_p99_ms']:.2f} | {r['list_p50_ms']:.1f} / {r['list_p99_ms']:.1f} | "
            f"{r['list_calls_per_s']:.0f} | {r['ratio']:.2f}x {verdict(r['ratio'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="10,000 ops, short windows")
    parser.add_argument("--ops", type=int, default=None, help="operations in each store")
    parser.add_argument("--seconds", type=float, default=None, help="each Get window")
    parser.add_argument("--rounds", type=int, default=None, help="windows per condition")
    parser.add_argument("--stores", nargs="+", choices=("memory", "sqlite"),
                        default=["memory", "sqlite"])  # fmt: skip
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", default="memory:", help=argparse.SUPPRESS)
    parser.add_argument("--fill", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument(
        "--max-list-scan", type=int, default=None, help="the server's Manager(max_list_scan=)"
    )
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args)
    rows = run(
        quick=args.quick,
        ops=args.ops,
        seconds=args.seconds,
        rounds=args.rounds,
        stores=tuple(args.stores),
        max_scan=args.max_list_scan,
    )
    print(report(rows, "python -m benchmarks.list_pressure" + (" --quick" if args.quick else "")))
    print(json.dumps(rows))
    broken = [f"{r['store']}: {e}" for r in rows for e in r["errors"]]
    for problem in broken:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
