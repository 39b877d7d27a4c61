"""Does the SQLite store stay fast when it holds many finished operations, and while they expire?

The requirement this measures:

    With 1,000,000 finished operations in SQLite, a Get, a filtered List page and a create each
    take at most 2x what they take with 1,000; while all 1,000,000 expire, requests keep a p99
    within 3x of their p99 without expiry running.

Run it (from the repository root)::

    python -m benchmarks.large_store              # N=1,000,000 vs M=1,000 (several minutes)
    python -m benchmarks.large_store --quick      # N=20,000 vs M=1,000 (a smoke run, ~30 s)
    python -m benchmarks.large_store --ops 200000 --small 1000

Everything goes through :class:`lrofw.Manager`'s programmatic API (no gRPC), on
:class:`lrofw.stores.SQLiteStore` files in a temporary folder, so the figures are the store's and
the manager's, not the network's. Only the fill bypasses the API, for speed: it writes, in large
transactions, exactly the rows that ``new_operation`` + ``set_result`` / ``set_error`` write (the
script checks this against rows written by the API, and reads filled operations back through
``manager.get`` and ``manager.list``).

Timings on a shared machine are noisy, so the script asserts nothing: it prints the figures, the
ratios and PASS/FAIL against the 2x / 3x bounds, and always exits 0 unless the benchmark itself
breaks.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import math
import os
import platform
import random
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from google.longrunning import operations_proto_pb2 as operations_pb2
from google.protobuf import any_pb2, wrappers_pb2
from google.rpc import status_pb2

from lrofw import Manager, errors
from lrofw.stores import SQLiteStore

METHOD = "/bench.Service/Run"
RESPONSE = wrappers_pb2.StringValue(value="ok")
ERROR = status_pb2.Status(code=5, message="no such thing")
FILTER_ERRORS = "done = true AND error.code = 5"
FILTER_METHOD = f'method = "{METHOD}" AND done = true'
DAY = 86400.0
FILL_BATCH = 50_000
RATIO_BOUND = 2.0
EXPIRY_BOUND = 3.0


def _packed_response() -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(RESPONSE)
    return packed


PACKED_RESPONSE = _packed_response()


# --- the fill -------------------------------------------------------------------------------------


def name_of(seed: int, i: int) -> str:
    """The name of filled operation ``i``: a uuid4-shaped name, recomputed on demand so that the
    benchmark never holds a million names in memory."""
    digest = hashlib.blake2b(b"%d:%d" % (seed, i), digest_size=16).digest()
    return f"operations/{uuid.UUID(bytes=digest, version=4)}"


def is_error(i: int) -> bool:
    """1% of filled operations end with NOT_FOUND, the rest with a response."""
    return i % 100 == 50


def finished_row(name: str, error: bool, create_time: float, done_time: float) -> tuple:
    """The ``ops`` row that ``new_operation(METHOD)`` followed by ``set_result(RESPONSE)`` (or
    ``set_error(ERROR)``) leaves: ``SQLiteStore.insert`` then ``SQLiteStore.finish``."""
    op = operations_pb2.Operation(name=name, done=True)
    if error:
        op.error.CopyFrom(ERROR)
    else:
        op.response.CopyFrom(PACKED_RESPONSE)
    code = ERROR.code if error else 0
    # name, method, done, error_code, create_time, done_time, owner, request, request_key,
    # request_hash, data
    return (name, METHOD, 1, code, create_time, done_time, None, None, None, None,
            op.SerializeToString())  # fmt: skip


_COLUMNS = (
    "name, method, done, error_code, create_time, done_time, owner, request, request_key,"
    " request_hash, data"
)
# Every column but position, create_time and done_time, which the fill chooses itself.
_COMPARED = "name, method, done, error_code, owner, request, request_key, request_hash, data"


@dataclass
class Store:
    """One benchmark store: a SQLiteStore file with ``n`` filled operations and its Manager."""

    label: str
    path: str
    n: int
    seed: int
    store: SQLiteStore = field(init=False)
    manager: Manager = field(init=False)
    fill_seconds: float = 0.0
    last_rows: int = 1  # how many operations the last List page returned
    # Filled operations finish between base - 1 day and base - 1 day + 0.5 s ...
    base: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.store = SQLiteStore(self.path)
        # No background expiry: the benchmark calls expire() itself.
        self.manager = Manager(store=self.store, expiry_interval=1e9)

    @property
    def cutoff_now(self) -> float:
        """The ``now`` to pass to ``manager.expire`` so that exactly the filled operations (not
        the ones the benchmark creates) are past the TTL."""
        return self.base - DAY + 1.0 + self.manager.ttl

    def name(self, i: int) -> str:
        return name_of(self.seed, i)

    def close(self) -> None:
        self.manager.close()
        self.store.close()


def check_rows_match_api(s: Store) -> None:
    """Write one success and one failure through the API, and check that the fill's rows for
    the same names are identical in every column the fill does not choose itself."""
    m = s.manager
    ok = m.new_operation(METHOD)
    m.set_result(ok.name, RESPONSE)
    bad = m.new_operation(METHOD)
    m.set_error(bad.name, ERROR)
    conn = s.store._conn
    with s.store._lock:
        for name, error in ((ok.name, False), (bad.name, True)):
            api = conn.execute(f"SELECT {_COMPARED} FROM ops WHERE name = ?", (name,)).fetchone()
            ours = finished_row(name, error, 0.0, 0.0)
            ours = ours[:4] + ours[6:]  # drop create_time, done_time
            if tuple(api) != ours:
                raise SystemExit(f"the fill would not write what the API writes:\n{api}\n{ours}")
    m.delete(ok.name)
    m.delete(bad.name)


def fill(s: Store) -> None:
    """Bulk-load ``s.n`` finished operations through the store's own schema, then ANALYZE."""
    check_rows_match_api(s)
    start = time.perf_counter()
    first = s.base - 2 * DAY
    step = DAY / max(s.n, 1)

    def rows(lo: int, hi: int) -> Iterator[tuple]:
        for i in range(lo, hi):
            created = first + i * step
            yield finished_row(s.name(i), is_error(i), created, created + 0.5)

    # A separate connection with a large page cache, so the store's own connection keeps its
    # default settings; the rows are the same either way.
    conn = sqlite3.connect(s.path, isolation_level=None)
    try:
        conn.execute("PRAGMA cache_size = -262144")  # 256 MiB, for the fill only
        for lo in range(0, s.n, FILL_BATCH):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                f"INSERT INTO ops({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows(lo, min(lo + FILL_BATCH, s.n)),
            )
            conn.execute("COMMIT")
    finally:
        conn.close()
    with s.store._lock:  # on the store's own connection, so its query planner sees the stats
        s.store._conn.execute("ANALYZE")
        s.store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    s.fill_seconds = time.perf_counter() - start


def check_fill(s: Store) -> None:
    """Read filled operations back through the API: Get, and both List filters' first pages."""
    m = s.manager
    for i in sorted({0, 50, s.n // 2, s.n - 1}):
        op = m.get(s.name(i))
        ok = op.done and (op.error == ERROR if is_error(i) else op.response == PACKED_RESPONSE)
        if not ok or op.name != s.name(i):
            raise SystemExit(f"filled operation {i} reads back wrong: {op}")
    newest_errors = [s.name(i) for i in range(s.n - 1, -1, -1) if is_error(i)][:5]
    ops, _ = m.list(filter=FILTER_ERRORS, page_size=5)
    if [op.name for op in ops] != newest_errors:
        raise SystemExit(f"List {FILTER_ERRORS!r} reads back wrong")
    ops, token = m.list(filter=FILTER_METHOD, page_size=5)
    if [op.name for op in ops] != [s.name(i) for i in range(s.n - 1, s.n - 6, -1)] or not token:
        raise SystemExit(f"List {FILTER_METHOD!r} reads back wrong")
    count = s.store._read(lambda c: c.execute("SELECT count(*) FROM ops").fetchone()[0])
    if count != s.n:
        raise SystemExit(f"{s.label}: {count} rows, expected {s.n}")


def bytes_per_op(s: Store) -> tuple[int, float]:
    with s.store._lock:
        s.store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    size = os.path.getsize(s.path)
    wal = s.path + "-wal"
    if os.path.exists(wal):
        size += os.path.getsize(wal)
    return size, size / max(s.n, 1)


def query_plan(s: Store, filter_: str) -> str:
    """The plan SQLite picks for the store's List query with this filter."""
    from lrofw import listing
    from lrofw.stores import _sql
    from lrofw.stores.sqlite import _failed_only

    node = listing.parse_filter(filter_)
    condition, params = _sql.where(node)
    if _failed_only(node):  # the store states the error index's condition (see SQLiteStore.list)
        condition = f"error_code != 0 AND {condition}"
    query = (
        f"EXPLAIN QUERY PLAN SELECT data FROM ops WHERE position < ? AND {condition}"
        " ORDER BY position DESC LIMIT ?"
    )
    rows = s.store._read(lambda c: c.execute(query, (2**63 - 1, *params, 51)).fetchall())
    return "; ".join(r[-1] for r in rows)


# --- the figures ----------------------------------------------------------------------------------

Figure = Callable[[Store, random.Random], int]


def ns() -> int:
    return time.perf_counter_ns()


def get_random(s: Store, rng: random.Random) -> int:
    name = s.name(rng.randrange(s.n))
    t = ns()
    s.manager.get(name)
    return ns() - t


def list_page(filter_: str, size: int) -> Figure:
    def run(s: Store, rng: random.Random) -> int:
        t = ns()
        ops, _ = s.manager.list(filter=filter_, page_size=size)
        elapsed = ns() - t
        s.last_rows = len(ops)
        return elapsed

    return run


def create(s: Store, rng: random.Random) -> int:
    t = ns()
    op = s.manager.new_operation(METHOD)
    s.manager.set_result(op.name, RESPONSE)
    elapsed = ns() - t
    s.manager.delete(op.name)  # untimed: keep the store at its size
    return elapsed


FIGURES: list[tuple[str, Figure, int]] = [
    # (label, figure, samples per store)
    ("Get (random existing name)", get_random, 3000),
    # page_size 10: the small store holds only 10 failed ops, so both pages are full (like for
    # like); a page of 50 would compare 10 rows with 50.
    (f"List `{FILTER_ERRORS}`, page_size 10", list_page(FILTER_ERRORS, 10), 1000),
    (f"List `{FILTER_METHOD}`, page_size 50", list_page(FILTER_METHOD, 50), 1000),
    ("Create (`new_operation` + `set_result`)", create, 1500),
]


def pct(values: list[int], q: float) -> float:
    """Nearest-rank percentile, in microseconds."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] / 1000


@dataclass
class FigureResult:
    label: str
    samples: dict[str, list[int]]
    rows: dict[str, int]


def measure_figures(stores: list[Store], rounds: int, scale: float) -> list[FigureResult]:
    """Each figure, alternating between the stores in ``rounds`` rounds (so that drift on a noisy
    machine hits both alike), after a short warm-up that is not recorded."""
    rng = random.Random(1)
    results = []
    for label, figure, total in FIGURES:
        per_round = max(1, int(total * scale) // rounds)
        samples: dict[str, list[int]] = {s.label: [] for s in stores}
        rows: dict[str, int] = {}
        for s in stores:
            for _ in range(20):
                figure(s, rng)
        for r in range(rounds):
            for s in stores if r % 2 == 0 else reversed(stores):
                samples[s.label].extend(figure(s, rng) for _ in range(per_round))
                rows[s.label] = s.last_rows
                s.last_rows = 1
        results.append(FigureResult(label, samples, rows))
    return results


# --- the mix, with and without expiry -------------------------------------------------------------


@dataclass
class MixResult:
    kinds: list[str] = field(default_factory=list)
    latency: list[int] = field(default_factory=list)  # from the scheduled start (open loop)
    service: list[int] = field(default_factory=list)  # from the actual start
    not_found: int = 0
    seconds: float = 0.0

    def of(self, kind: str | None, scheduled: bool = True) -> list[int]:
        values = self.latency if scheduled else self.service
        return [v for k, v in zip(self.kinds, values, strict=True) if kind is None or k == kind]


MIX = ("get", "create", "list_errors", "get", "create", "list_method")


def run_mix(s: Store, stop: threading.Event, rate: float, seconds: float | None) -> MixResult:
    """A steady stream of requests (Get, create, List pages in equal shares) at ``rate`` per
    second, scheduled open-loop: each request's latency counts from when it was due, so a stall
    also counts against the requests queued behind it."""
    rng = random.Random(2)
    out = MixResult()
    interval = int(1e9 / rate)
    m = s.manager
    begin = next_due = ns()
    end = None if seconds is None else begin + int(seconds * 1e9)
    k = 0
    while not stop.is_set() and (end is None or next_due < end):
        now = ns()
        if now < next_due:
            time.sleep((next_due - now) / 1e9)
        kind = MIX[k % len(MIX)]
        k += 1
        name = s.name(rng.randrange(s.n)) if kind == "get" else ""
        start = ns()
        if kind == "get":
            try:
                m.get(name)
            except errors.NotFound:
                out.not_found += 1  # already expired: still an answered request
        elif kind == "create":
            op = m.new_operation(METHOD)
            m.set_result(op.name, RESPONSE)
        else:
            m.list(filter=FILTER_ERRORS if kind == "list_errors" else FILTER_METHOD, page_size=50)
        done = ns()
        out.kinds.append(kind)
        out.latency.append(done - next_due)
        out.service.append(done - start)
        next_due += interval
    out.seconds = (ns() - begin) / 1e9
    return out


@dataclass
class ExpiryResult:
    baseline: MixResult
    during: MixResult
    removed: int
    seconds: float


def measure_expiry(s: Store, rate: float, baseline_seconds: float) -> ExpiryResult:
    stop = threading.Event()
    baseline = run_mix(s, stop, rate, baseline_seconds)
    box: list[MixResult] = []
    thread = threading.Thread(target=lambda: box.append(run_mix(s, stop, rate, None)))
    thread.start()
    time.sleep(0.2)  # let the stream settle before expiry starts
    start = time.perf_counter()
    removed = s.manager.expire(now=s.cutoff_now)
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    left = s.store._read(
        lambda c: c.execute(
            "SELECT count(*) FROM ops WHERE done_time <= ?", (s.cutoff_now - s.manager.ttl,)
        ).fetchone()[0]
    )
    if left or removed != s.n:
        raise SystemExit(f"expiry removed {removed} of {s.n}; {left} expirable left")
    return ExpiryResult(baseline, box[0], removed, seconds)


# --- the report -----------------------------------------------------------------------------------


def verdict(ratio: float, bound: float) -> str:
    return "PASS" if ratio <= bound else "FAIL"


def report(
    args: argparse.Namespace,
    small: Store,
    big: Store,
    figures: list[FigureResult],
    expiry: ExpiryResult,
    sizes: dict[str, tuple[int, float]],
    plans: dict[str, str],
) -> None:
    print(f"\n## lrofw SQLite store: {big.n:,} vs {small.n:,} finished operations\n")
    print(
        f"python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}; command: "
        f"`{' '.join(['python -m benchmarks.large_store', *sys.argv[1:]])}`\n"
    )
    print(f"Fill: {big.n:,} ops in {big.fill_seconds:.1f} s "
          f"({big.n / max(big.fill_seconds, 1e-9):,.0f} ops/s); "
          f"{small.n:,} ops in {small.fill_seconds:.2f} s.\n")  # fmt: skip
    print(f"### Latency by store size (µs; ratio = big p50 / small p50, bound {RATIO_BOUND:g}x)\n")
    print(
        f"| Figure | rows (small/big) | {small.n:,}: p50 | p99 | {big.n:,}: p50 | p99 "
        "| ratio p50 | ratio p99 | verdict |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for f in figures:
        a, b = f.samples[small.label], f.samples[big.label]
        ratio = pct(b, 0.5) / pct(a, 0.5)
        ratio99 = pct(b, 0.99) / pct(a, 0.99)
        note = ""
        if f.rows[small.label] != f.rows[big.label]:
            note = " (not like for like: fewer rows on the small store's page)"
        print(
            f"| {f.label} | {f.rows[small.label]}/{f.rows[big.label]} "
            f"| {pct(a, 0.5):.0f} | {pct(a, 0.99):.0f} | {pct(b, 0.5):.0f} | {pct(b, 0.99):.0f} "
            f"| {ratio:.2f}x | {ratio99:.2f}x | {verdict(ratio, RATIO_BOUND)}{note} |"
        )
    base, during = expiry.baseline, expiry.during
    print(
        f"\n### Requests while all {big.n:,} expire (µs; one thread offering a mix of Get, create "
        f"and List pages at {args.rate:g}/s; ratio = p99 during / p99 before, "
        f"bound {EXPIRY_BOUND:g}x)\n"
    )
    print(
        "| Requests | n before | p50 before | p99 before | n during | p50 during | p99 during "
        "| max during | ratio p99 | verdict |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    rows = [
        ("**all requests**", None, False, True),
        ("Get", "get", False, False),
        ("create", "create", False, False),
        (f"List `{FILTER_ERRORS}`", "list_errors", False, False),
        (f"List `{FILTER_METHOD}`", "list_method", False, False),
        ("all, counted from when due (+ queueing)", None, True, False),
    ]
    for label, kind, scheduled, judged in rows:
        a, b = base.of(kind, scheduled), during.of(kind, scheduled)
        ratio = pct(b, 0.99) / pct(a, 0.99)
        mark = verdict(ratio, EXPIRY_BOUND) if judged else f"({verdict(ratio, EXPIRY_BOUND)})"
        print(
            f"| {label} | {len(a):,} | {pct(a, 0.5):.0f} | {pct(a, 0.99):.0f} | {len(b):,} "
            f"| {pct(b, 0.5):.0f} | {pct(b, 0.99):.0f} | {max(b) / 1000:,.0f} "
            f"| {ratio:.2f}x | {mark} |"
        )
    print(
        f"\nVerdict on each request's own latency (from its start); the last row also counts "
        f"the time a request waited behind earlier ones in this single thread, which grows "
        f"without bound when the thread cannot keep up with the offered rate. Served: "
        f"{len(base.kinds) / base.seconds:,.0f} requests/s before, "
        f"{len(during.kinds) / during.seconds:,.0f}/s during expiry (offered {args.rate:g}/s)."
    )
    print(
        f"\nExpiry: removed {expiry.removed:,} operations in {expiry.seconds:.1f} s "
        f"({expiry.removed / max(expiry.seconds, 1e-9):,.0f} ops/s, batches of 1,000); "
        f"{during.not_found:,} of the Gets during expiry found their operation already gone."
    )
    print("\n### Disk\n")
    print("| Store | bytes on disk (after WAL checkpoint) | bytes per op |")
    print("|---|---:|---:|")
    for label, (size, per) in sizes.items():
        print(f"| {label} | {size:,} | {per:,.0f} |")
    print("\n### Query plans on the big store\n")
    for filter_, plan in plans.items():
        print(f"- `{filter_}`: {plan}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.large_store", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--ops", type=int, default=1_000_000, help="big store size (N)")
    parser.add_argument("--small", type=int, default=1_000, help="small store size (M)")
    parser.add_argument(
        "--quick", action="store_true", help="N=20,000, M=1,000, fewer samples (~30 s)"
    )
    parser.add_argument("--rate", type=float, default=400.0, help="requests/s of the mix")
    parser.add_argument(
        "--baseline-seconds", type=float, default=None, help="mix without expiry (default 20 s)"
    )
    parser.add_argument("--dir", default=None, help="folder for the store files (default: tmp)")
    args = parser.parse_args(argv)
    if args.quick:
        args.ops, args.small = 20_000, 1_000
    scale = 0.3 if args.quick else 1.0
    baseline_seconds = args.baseline_seconds or (3.0 if args.quick else 20.0)
    if args.small < 100 or args.ops < args.small:
        parser.error("need --small >= 100 and --ops >= --small")

    with tempfile.TemporaryDirectory(prefix="lrofw-bench-", dir=args.dir) as folder:
        small = Store("small", os.path.join(folder, "small.db"), args.small, seed=11)
        big = Store("big", os.path.join(folder, "big.db"), args.ops, seed=22)
        try:
            for s in (small, big):
                print(f"filling {s.label}: {s.n:,} operations ...", file=sys.stderr, flush=True)
                fill(s)
                check_fill(s)
            sizes = {f"{s.n:,} ops": bytes_per_op(s) for s in (small, big)}
            plans = {f: query_plan(big, f) for f in (FILTER_ERRORS, FILTER_METHOD)}
            gc.collect()
            gc.freeze()
            print("measuring Get / List / create ...", file=sys.stderr, flush=True)
            figures = measure_figures([small, big], rounds=10, scale=scale)
            print(
                f"mix for {baseline_seconds:g} s, then expiring {big.n:,} under the same mix ...",
                file=sys.stderr,
                flush=True,
            )
            expiry = measure_expiry(big, args.rate, baseline_seconds)
        finally:
            small.close()
            big.close()
        report(args, small, big, figures, expiry, sizes, plans)
    return 0


if __name__ == "__main__":
    sys.exit(main())
