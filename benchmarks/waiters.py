"""Waiters at scale: thousands of concurrent WaitOperation calls on one server, sync and aio.

The requirement this measures:

    aio: 10,000 concurrent WaitOperation calls on one server all return when their operations
    finish, none dropped; the server's memory grows by at most 25 KB per waiter; creates and Gets
    made during the hold keep a p99 within 3x of their p99 with no waiters.
    sync: a server with N worker threads keeps serving creates and Gets while 10xN clients wait
    (blocking waits are bounded; past the bound a wait returns early with the latest state and
    lrofw.wait backs off, so no client spins).

Run it (from the repository root)::

    python -m benchmarks.waiters                  # 10,000 waiters (about 90 s)
    python -m benchmarks.waiters --quick          # 1,000 waiters (about 35 s)
    python -m benchmarks.waiters --waiters 5000 --threads 8 --only aio

Each column runs on a fresh server process (``benchmarks/_waiter_server.py``: the example's
``Common`` service with ``lrofw.SERVER_OPTIONS``, an in-memory store) on 127.0.0.1:

- ``aio``: a ``grpc.aio`` server, W waiters on W operations;
- ``grpc alone (floor)``: the same aio server without lrofw (a held WaitOperation awaits one
  shared event): what a held call costs grpc itself, the floor under the aio figure;
- ``sync, 10xN``: a ``grpc.server`` with N threads (``--threads``, 16) and 10xN waiters, the
  requirement's sync figure; ``sync, W``: the same server with W waiters, for comparison.

For each:

1. The server holds operations whose handlers block (aio: one per waiter, ``async def``
   handlers that hold no thread; sync: at most 100, ``def`` handlers on the manager's threads,
   the waiters spread over them).
2. A probe process sends a create (``ProvisionDut``, answered at once) and a Get every 20 ms, on
   schedule whether or not earlier ones were answered, with no waiters: the baseline p50/p99.
3. This process starts the waiters on one ``grpc.aio`` channel with a connection of its own:
   each is :func:`lrofw.aio.wait` (it asks WaitOperation to hold, and backs off when a wait comes
   back early), through a stub that counts every call and every error. aio: the hold begins once
   every call has reached the server (a server interceptor counts arrivals) and a second more.
   sync: once every waiter has asked once, and ``--settle`` seconds more, so that the waiters
   answered early are backing off.
4. During the hold: the server's RSS (VmRSS in ``/proc/PID/status``; before the waiters and in
   the hold, hence KB per waiter), the WaitOperation calls the server received per second, and
   the probe again.
5. The operations are released; every waiter must return the done operation. A drop is an RPC
   that ended with an error (CANCELLED, say; even one that lrofw.aio.wait retried) or a waiter
   that did not end with the done operation.

The script prints a Markdown table and PASS/FAIL against the bounds (0 drops, 25 KB per waiter
and a p99 within 3x on aio; 0 drops, no spinning and a p99 within 3x with 10xN sync clients),
and exits 0 whatever the verdicts: timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import pathlib
import platform
import select
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
SERVER = ROOT / "benchmarks" / "_waiter_server.py"
sys.path.insert(0, str(ROOT / "examples" / "tls_provision"))

import grpc  # noqa: E402
import tls_pb2  # noqa: E402
import tls_pb2_grpc  # noqa: E402
from google.longrunning import operations_pb2_grpc  # noqa: E402
from google.longrunning import operations_proto_pb2 as operations_pb2  # noqa: E402

import lrofw  # noqa: E402
from lrofw.client import DEFAULT_POLICY  # noqa: E402

CONTROL_METHOD = "/bench.Control/Command"
KB_BOUND = 25.0
P99_BOUND = 3.0
#: What a client that never paused after an early answer would come close to: one call per
#: waiter every ``first_pause`` (50 ms). Backing off, a waiter asks about once a second or less.
SPIN_RATE = 1.0 / DEFAULT_POLICY.first_pause
SYNC_OPS = 100
PROBE_INTERVAL = 0.02
WAITER_TIMEOUT = 120.0
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


# --- the server process ---------------------------------------------------------------------------


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    target: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kb(self) -> int:
        """The server's resident memory now, in KB (VmRSS)."""
        for line in pathlib.Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def server_process(kind: str, *args: str) -> Iterator[ServerProcess]:
    """Run ``_waiter_server.py --kind KIND ARGS`` until the block ends (SIGTERM, then kill)."""
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "--kind", kind, *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)  # it prints once serving
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("listening on "):
            raise RuntimeError(f"server did not start: {line!r}")
        yield ServerProcess(proc, line.split()[-1])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        proc.stdout.close()


async def control(channel: grpc.aio.Channel, command: bytes) -> dict[str, Any]:
    """Ask the server's control service; retried a few times (a busy server may drop it)."""
    call = channel.unary_unary(CONTROL_METHOD)
    for attempt in range(20):
        try:
            return dict(json.loads(await call(command, timeout=30)))
        except grpc.RpcError:
            if attempt == 19:
                raise
            await asyncio.sleep(0.1)
    raise AssertionError("unreachable")


async def create_holds(channel: grpc.aio.Channel, count: int, batch: int = 200) -> list[str]:
    """Create ``count`` operations whose handlers block; return their names once all block."""
    stub = tls_pb2_grpc.CommonStub(channel)
    names: list[str] = []
    while len(names) < count:
        todo = min(batch, count - len(names))
        ops = await asyncio.gather(
            *(
                stub.ProvisionDut(tls_pb2.ProvisionDutRequest(name="hold"), timeout=60)
                for _ in range(todo)
            )
        )
        names += [op.name for op in ops]
    end = time.monotonic() + 60
    while (await control(channel, b"stats"))["held"] < count:
        if time.monotonic() > end:
            raise RuntimeError("the hold handlers did not all start")
        await asyncio.sleep(0.05)
    return names


# --- the probe: creates and Gets, from a process of its own ---------------------------------------


def probe_main(target: str, get_name: str, seconds: float) -> int:
    """Send a create and a Get every PROBE_INTERVAL for ``seconds`` (on schedule, whether or not
    the earlier ones were answered); print their latencies once all are answered."""
    latencies: dict[str, list[float]] = {"create": [], "get": []}
    errors: Counter[str] = Counter()
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        common = tls_pb2_grpc.CommonStub(channel)
        ops = operations_pb2_grpc.OperationsStub(channel)
        calls = (
            ("create", common.ProvisionDut, tls_pb2.ProvisionDutRequest(name="quick")),
            ("get", ops.GetOperation, operations_pb2.GetOperationRequest(name=get_name)),
        )
        warm = [rpc.future(request, timeout=60) for _ in range(5) for _, rpc, request in calls]
        for future in warm:  # the connection and the code paths are warm
            future.exception(timeout=60)

        def record(what: str, sent: float, future: grpc.Future) -> None:
            if future.code() is grpc.StatusCode.OK:
                latencies[what].append((time.perf_counter() - sent) * 1000)
            else:
                errors[future.code().name] += 1

        pending = []
        start = time.monotonic()
        for tick in range(int(seconds / PROBE_INTERVAL)):
            pause = start + tick * PROBE_INTERVAL - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            for what, rpc, request in calls:
                sent = time.perf_counter()
                future = rpc.future(request, timeout=60)
                future.add_done_callback(functools.partial(record, what, sent))
                pending.append(future)
        for future in pending:
            future.exception(timeout=90)
    print(json.dumps({**latencies, "errors": dict(errors)}))
    return 0


def run_probe(target: str, get_name: str, seconds: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.waiters", "--probe", target, get_name, str(seconds)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=seconds + 120,
        check=True,
    )
    return dict(json.loads(out.stdout))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (NaN when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# --- the waiters ----------------------------------------------------------------------------------


class CountingStub:
    """An OperationsStub for :func:`lrofw.aio.wait` that counts calls and their errors."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = operations_pb2_grpc.OperationsStub(channel)
        self.calls = 0
        self.errors: Counter[str] = Counter()

    async def _call(self, rpc: Any, request: Any, timeout: float | None) -> Any:
        self.calls += 1
        try:
            return await rpc(request, timeout=timeout)
        except grpc.RpcError as exc:
            self.errors[exc.code().name] += 1
            raise

    def WaitOperation(self, request: Any, timeout: float | None = None) -> Any:
        return self._call(self._stub.WaitOperation, request, timeout)

    def GetOperation(self, request: Any, timeout: float | None = None) -> Any:
        return self._call(self._stub.GetOperation, request, timeout)


async def waiter(stub: CountingStub, name: str, timeout: float) -> str:
    """One client: lrofw.aio.wait until the op is done; "done" or why not."""
    try:
        op = await lrofw.aio.wait(stub, name, timeout=timeout)
    except Exception as exc:
        return type(exc).__name__
    return "done" if op.done and op.HasField("response") else "not done"


@dataclass
class Row:
    label: str
    kind: str
    waiters: int
    ops: int
    threads: int | None = None
    outcomes: Counter[str] = field(default_factory=Counter)
    rpc_errors: Counter[str] = field(default_factory=Counter)
    rss_before: int = 0
    rss_hold: int = 0
    blocking: int | None = None  # sync: WaitOperation calls inside the servicer in the hold
    wait_rate: float = 0.0  # WaitOperation calls per second the server received during the hold
    start_seconds: float = 0.0  # from the first waiter to the hold
    release_seconds: float = 0.0  # from release to the last waiter's return
    base: dict[str, Any] = field(default_factory=dict)
    hold: dict[str, Any] = field(default_factory=dict)

    @property
    def drops(self) -> int:
        return sum(self.rpc_errors.values()) + self.waiters - self.outcomes["done"]

    @property
    def kb_per_waiter(self) -> float:
        return (self.rss_hold - self.rss_before) / self.waiters

    def p(self, phase: dict[str, Any], what: str, q: float) -> float:
        return percentile(phase.get(what, []), q)

    def ratio(self, what: str) -> float:
        return self.p(self.hold, what, 99) / self.p(self.base, what, 99)


async def run_row(row: Row, probe_seconds: float, settle: float) -> Row:
    args = ["--manager-workers", str(row.ops + 64), "--max-queued", "1000"]
    if row.threads is not None:
        args += ["--threads", str(row.threads)]
    with server_process(row.kind, *args) as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            names = await create_holds(channel, row.ops)
            row.base = await asyncio.to_thread(run_probe, server.target, names[0], probe_seconds)
            await asyncio.sleep(0.5)
            row.rss_before = server.rss_kb()
            # The waiters come on a connection of their own (a local subchannel pool: grpc would
            # otherwise share the control channel's connection), as other clients would.
            async with grpc.aio.insecure_channel(server.target, options=OWN_CONNECTION) as waiting:
                await hold_and_release(row, server, channel, waiting, names, probe_seconds, settle)
    return row


async def hold_and_release(
    row: Row,
    server: ServerProcess,
    channel: grpc.aio.Channel,
    waiting: grpc.aio.Channel,
    names: list[str],
    probe_seconds: float,
    settle: float,
) -> None:
    """Start the waiters, measure during the hold, release, and collect what they returned."""
    stub = CountingStub(waiting)
    started = time.monotonic()
    tasks = [
        asyncio.ensure_future(waiter(stub, names[i % row.ops], timeout=WAITER_TIMEOUT))
        for i in range(row.waiters)
    ]
    try:
        end = started + 120
        while time.monotonic() < end:
            await asyncio.sleep(0.05)
            finished = sum(t.done() for t in tasks)
            if row.kind != "sync":
                stats = await control(channel, b"stats")
                if stats["wait_calls"] + finished >= row.waiters:
                    await asyncio.sleep(1.0)  # the last ones arrived: let them reach the servicer
                    break
            elif stub.calls >= row.waiters:
                await asyncio.sleep(settle)  # the early-answered waiters are backing off
                break
        row.start_seconds = time.monotonic() - started
        rss = [server.rss_kb()]
        before = await control(channel, b"stats")
        t0 = time.monotonic()
        row.hold = await asyncio.to_thread(run_probe, server.target, names[0], probe_seconds)
        after = await control(channel, b"stats")
        rss.append(server.rss_kb())
        row.wait_rate = (after["wait_calls"] - before["wait_calls"]) / (time.monotonic() - t0)
        row.blocking = after["wait_in_flight"] if row.kind == "sync" else None
        row.rss_hold = max(rss)

        released = time.monotonic()
        await control(channel, b"release")
        done, pending = await asyncio.wait(tasks, timeout=120)
        row.release_seconds = time.monotonic() - released
    finally:
        for task in tasks:
            task.cancel()
    row.outcomes = Counter(t.result() for t in done)
    row.outcomes["still waiting"] += len(pending)
    row.rpc_errors = stub.errors
    return row


# --- the report -----------------------------------------------------------------------------------


def errors_text(row: Row) -> str:
    errors = Counter(row.base.get("errors")) + Counter(row.hold.get("errors"))
    return ", ".join(f"{code} {n}" for code, n in errors.items()) or "none"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(rows: list[Row]) -> str:
    def ms(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{x:.2f}"

    lines = [
        "| | " + " | ".join(r.label for r in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]

    def add(what: str, values: list[str]) -> None:
        lines.append(f"| {what} | " + " | ".join(values) + " |")

    add("server", [f"{r.kind}" + (f", {r.threads} threads" if r.threads else "") for r in rows])
    add("waiters (operations held)", [f"{r.waiters:,} ({r.ops:,})" for r in rows])
    add("drops (RPC errors + waiters not done)", [str(r.drops) for r in rows])
    add("time until all waiting (s)", [f"{r.start_seconds:.1f}" for r in rows])
    add("time from release to all returned (s)", [f"{r.release_seconds:.1f}" for r in rows])
    add(
        "WaitOperation calls inside the sync servicer in the hold",
        ["n/a" if r.blocking is None else str(r.blocking) for r in rows],
    )
    add("WaitOperation calls/s during the hold", [f"{r.wait_rate:,.0f}" for r in rows])
    add("  per waiter per second", [f"{r.wait_rate / r.waiters:.2f}" for r in rows])
    add(
        "server RSS before / in the hold (MB)",
        [f"{r.rss_before / 1024:.0f} / {r.rss_hold / 1024:.0f}" for r in rows],
    )
    add("server memory per waiter (KB)", [f"{r.kb_per_waiter:.1f}" for r in rows])
    for what, label in (("create", "create"), ("get", "Get")):
        for phase, phase_label in (("base", "no waiters"), ("hold", "during the hold")):
            cells = []
            for r in rows:
                figures = getattr(r, phase)
                cells.append(f"{ms(r.p(figures, what, 50))} / {ms(r.p(figures, what, 99))}")
            add(f"{label} p50 / p99, {phase_label} (ms)", cells)
        add(f"{label} p99 ratio (hold / none)", [f"{r.ratio(what):.2f}x" for r in rows])
    add(
        "probe samples (creates, no waiters / hold)",
        [f"{len(r.base.get('create', []))} / {len(r.hold.get('create', []))}" for r in rows],
    )
    add("probe errors", [errors_text(r) for r in rows])
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> list[str]:
    out = []
    for r in rows:
        if r.kind == "floor":
            out.append(
                f"{r.label}: {r.kb_per_waiter:.1f} KB per waiter, drops {r.drops} (no lrofw: "
                "what a held call costs grpc itself)"
            )
            continue
        if r.kind == "aio":
            out += [
                f"{r.label}: drops {r.drops} (bound 0): {verdict(r.drops == 0)}",
                f"{r.label}: {r.kb_per_waiter:.1f} KB per waiter (bound {KB_BOUND:g}): "
                f"{verdict(r.kb_per_waiter <= KB_BOUND)}",
            ]
        else:
            bound = r.waiters * SPIN_RATE
            out += [
                f"{r.label}: drops {r.drops} (bound 0): {verdict(r.drops == 0)}",
                f"{r.label}: {r.wait_rate:,.0f} WaitOperation calls/s (spinning: "
                f"{bound:,.0f}/s): {verdict(r.wait_rate < bound)}",
            ]
        for what in ("create", "get"):
            ratio = r.ratio(what)
            note = "" if r.kind == "aio" or r.waiters <= 10 * (r.threads or 0) else " (informative)"
            out.append(
                f"{r.label}: {what} p99 {ratio:.2f}x with no waiters (bound {P99_BOUND:g}x): "
                f"{verdict(ratio <= P99_BOUND)}{note}"
            )
    return out


async def main_async(args: argparse.Namespace) -> list[Row]:
    w, n = args.waiters, args.threads
    rows = [
        Row(f"aio, {w:,} waiters", "aio", w, w),
        Row(f"grpc alone (floor), {w:,} waiters", "floor", w, w),
        Row(f"sync, 10xN = {10 * n} waiters", "sync", 10 * n, min(10 * n, SYNC_OPS), n),
        Row(f"sync, {w:,} waiters", "sync", w, min(w, SYNC_OPS), n),
    ]
    rows = [r for r in rows if args.only in (None, "sync" if r.kind == "sync" else "aio")]
    for row in rows:
        print(f"running: {row.label} ...", file=sys.stderr, flush=True)
        await run_row(row, args.probe_seconds, args.settle)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Waiters at scale: sync and aio servers.")
    parser.add_argument("--waiters", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=16, help="the sync server's N")
    parser.add_argument("--probe-seconds", type=float, default=5.0)
    parser.add_argument("--settle", type=float, default=4.0, help="sync: seconds before the hold")
    parser.add_argument("--quick", action="store_true", help="1,000 waiters, shorter probes")
    parser.add_argument(
        "--only",
        choices=("aio", "sync"),
        help="only the aio rows (with the floor) or the sync ones",
    )
    parser.add_argument(
        "--probe", nargs=3, metavar=("TARGET", "NAME", "SECONDS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.probe:
        return probe_main(args.probe[0], args.probe[1], float(args.probe[2]))
    if args.quick:
        args.waiters, args.probe_seconds, args.settle = 1000, 2.0, 2.5
    started = time.monotonic()
    rows = asyncio.run(main_async(args))
    print(
        f"## Waiters at scale: {args.waiters:,} waiters "
        f"(python {platform.python_version()}, grpcio {grpc.__version__}, "
        f"{os.cpu_count()} cores, {time.monotonic() - started:.0f} s)\n"
    )
    print(report(rows))
    print()
    for line in verdicts(rows):
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
