"""lrofw side by side with the gRPC ceiling, a hand-written server, google-api-core and Celery.

Run it from the repository root, after the README's install step::

    python -m benchmarks              # the full run: about 15 minutes
    python -m benchmarks --quick      # a smoke run (CI): every contender, tiny windows, < 2 min
    python -m benchmarks --docs       # the full run, written into docs/performance.md

It prints a Markdown report and writes every figure as JSON (``--out``). Everything runs in one
go on one machine, each server in a process of its own, each client in processes of their own:

- **throughput**: 8 concurrent clients (8 processes, each one call after another) for
  ``--seconds`` against each server. *create*: the create RPC alone; *create-to-result*: create,
  then ``lrofw.wait`` (WaitOperation) until the no-op operation is done; *inline*: the same on a
  server whose method has ``inline_timeout=1`` (the create returns the operation done). The
  ceiling serves an empty unary call instead. Per operation: the server's CPU (the whole process,
  its store included) and the clients' CPU; the server's peak memory (VmHWM). lrofw on
  PostgreSQL too (``--postgres URL``, a fresh schema for each window, all dropped at the end;
  skipped, and said so in the report, when unreachable), with the CPU of the PostgreSQL backends
  serving the server added to its own (``benchmarks/_postgres.py`` says how they are found).
- **replicas**: two, then one to three, server processes (sync) on one shared store (a shared
  SQLite file; PostgreSQL): notice latency of a wait through replica B on an operation created
  through, and run by, replica A (and through A itself); create-to-result with 1, 2 and 3
  replicas, the client processes spread over them round robin; CPU of every replica and of the
  PostgreSQL backends.
- **notice**: one client waiting with ``lrofw.wait`` on operations that finish at a known moment:
  how late it returns (p50/p99), against the round trip of one empty call; and
  google-api-core's default polling against ``lrofw.wait`` for operations of 0.05 s, 1 s, 5 s.
- **celery**: Celery 5 with a Redis of its own (a ``redis-server`` it starts on a free port and
  stops; skipped, and said so in the report, without one) as broker and result backend, a local
  prefork worker: submit-to-result of a no-op task with 1 and 8 clients, and the CPU of client,
  worker and Redis.
- **store**: memory per finished operation in a store of ``--store-ops`` (1,000,000) and the time
  to expire them all, for the memory and SQLite stores; and each store's own write path in
  process (``benchmarks/store_write.py``): create + finish per operation with one thread, and
  eight threads' throughput against one's.
- **list**: Get latency while 4 clients list worst-case filters over 100,000 operations
  (``benchmarks/list_pressure.py``; 10,000 with ``--quick``), memory and SQLite stores.

Then it checks the ratios lrofw is held to (see docs/performance.md) and prints each with its
verdict. Timings on a shared machine are noisy, so the ratios never fail the command: it exits
1 only when a contender produced no figures (or a section broke), 0 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks import _report
from benchmarks._load import run_clients
from benchmarks._postgres import (
    DEFAULT_DSN,
    PostgresRun,
    cpu_delta,
    postgres_run,
    require_store,
)
from benchmarks._proc import ROOT, Skipped, exit_on_sigterm, spawn

#: (label, server arguments, what it serves: an empty call, or a long-running create)
SERVERS: list[tuple[str, list[str], str]] = [
    ("ceiling, sync", ["--kind", "ceiling"], "ceiling"),
    ("ceiling, aio", ["--kind", "ceiling", "--aio"], "ceiling"),
    ("hand-written (Go port), sync", ["--kind", "handwritten"], "lro"),
    ("lrofw memory, sync", ["--kind", "lrofw", "--store", "memory:"], "lro"),
    ("lrofw memory, aio", ["--kind", "lrofw", "--store", "memory:", "--aio"], "lro"),
    (
        "lrofw SQLite, sync",
        ["--kind", "lrofw", "--store", "sqlite:{tmp}/sync-{mode}-{round}.db"],
        "lro",
    ),
    (
        "lrofw SQLite, aio",
        ["--kind", "lrofw", "--store", "sqlite:{tmp}/aio-{mode}-{round}.db", "--aio"],
        "lro",
    ),
    # {pg}: a fresh schema of the run's PostgreSQL for each window (skipped without one)
    ("lrofw PostgreSQL, sync", ["--kind", "lrofw", "--store", "{pg}"], "lro"),
    ("lrofw PostgreSQL, aio", ["--kind", "lrofw", "--store", "{pg}", "--aio"], "lro"),
]

#: The shared stores replicas run on: (label, server arguments).
REPLICA_STORES: list[tuple[str, list[str]]] = [
    ("lrofw shared SQLite, sync", ["--kind", "lrofw", "--store", "sqlite:{tmp}/replicas-{n}.db"]),
    ("lrofw PostgreSQL, sync", ["--kind", "lrofw", "--store", "{pg}"]),
]


def measure(
    label: str,
    server_args: list[str],
    mode: str,
    *,
    clients: int,
    seconds: float,
    warmup: float,
    replicas: int = 1,
    pg: PostgresRun | None = None,
) -> dict[str, Any]:
    """One window of ``clients`` client processes against a fresh server (and store).

    With ``replicas`` > 1, that many server processes share the one store and the client
    processes are spread over them round robin. A ``{pg}`` in ``server_args`` becomes a fresh
    PostgreSQL schema's store URL (``pg``), and the CPU of the PostgreSQL backends serving
    the servers is measured too (``db_cpu_ms``; added into ``server_cpu_ms``).
    """
    server_args = [a.replace("{mode}", mode) for a in server_args]
    if any("{pg}" in a for a in server_args):
        if pg is None:
            raise RuntimeError(f"{label}: a PostgreSQL contender without PostgreSQL")
        url = pg.store_url()
        server_args = [a.replace("{pg}", url) for a in server_args]
    else:
        pg = None
    factory = {
        "empty": "benchmarks._clients:empty",
        "create": "benchmarks._clients:create",
        "create_to_result": "benchmarks._clients:create_to_result",
        "inline": "benchmarks._clients:create_to_result",
    }[mode]
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(spawn(["-m", "benchmarks._servers", *server_args]))
            for _ in range(replicas)
        ]
        pids = [s.pid for s in servers]
        cpu: list[float] = []
        db: list[dict[str, dict[int, float]]] = []

        def sample() -> None:
            cpu.append(sum(s.cpu() for s in servers))
            if pg is not None:
                db.append(pg.sample(pids))

        load = run_clients(
            factory,
            [{"target": s.target} for s in servers],
            processes=clients,
            seconds=seconds,
            warmup=warmup,
            on_start=sample,
            on_end=sample,
        )
        peak = max(s.peak_kb() for s in servers)
    ops = max(load.ops, 1)
    lrofw_ms = 1000 * (cpu[1] - cpu[0]) / ops
    client_ms = 1000 * load.client_cpu / ops
    row: dict[str, Any] = {
        "contender": label,
        "mode": mode,
        "clients": clients,
        "replicas": replicas,
        "ops": load.ops,
        "per_s": load.rate,
        "p50_ms": 1000 * _report.percentile(load.latencies, 50),
        "p99_ms": 1000 * _report.percentile(load.latencies, 99),
        "server_cpu_ms": lrofw_ms,
        "client_cpu_ms": client_ms,
        "total_cpu_ms": lrofw_ms + client_ms,
        "peak_mem_mb": peak / 1024,
        "errors": load.errors,
        "first_error": load.first_error,
    }
    if db:
        spent = cpu_delta(db[0], db[1])
        row["lrofw_cpu_ms"] = lrofw_ms
        row["db_cpu_ms"] = 1000 * spent["backends"] / ops
        row["db_background_cpu_ms"] = 1000 * spent["background"] / ops
        row["db_backends"] = len(db[1]["backends"])
        row["server_cpu_ms"] = lrofw_ms + row["db_cpu_ms"]
        row["total_cpu_ms"] = row["server_cpu_ms"] + client_ms
    return row


def throughput(args: argparse.Namespace, tmp: pathlib.Path) -> list[dict[str, Any]]:
    """Every (server, mode, clients) window, ``--rounds`` times over in turn, so that a drift of
    the machine's speed during the run touches every contender alike; the median of each."""
    clients = 2 if args.quick else 8
    plan: list[tuple[str, list[str], str, int]] = []
    for label, server_args, serves in SERVERS:
        if args.pg is None and any("{pg}" in a for a in server_args):
            continue  # PostgreSQL is unreachable: skipped, and the report says so
        server_args = [a.replace("{tmp}", str(tmp)) for a in server_args]
        if serves == "ceiling":
            plan.append((label, server_args, "empty", clients))
            continue
        plan.append((label, server_args, "create", clients))
        if label == _report.LROFW[0]:  # the cost of metrics: the same server, metrics on
            plan.append((_report.METRICS_ON, [*server_args, "--metrics"], "create", clients))
        plan.append((label, server_args, "create_to_result", clients))
        plan.append((label, [*server_args, "--inline", "1"], "inline", clients))
    # One client, one call after another: the round trip (what notice latency is held to),
    # and lrofw's best beside Celery's one-client figure.
    plan.append(("ceiling, sync", ["--kind", "ceiling"], "empty", 1))
    if not args.quick:
        plan.append(("lrofw memory, sync", ["--kind", "lrofw", "--inline", "1"], "inline", 1))
        plan.append(
            ("lrofw memory, aio", ["--kind", "lrofw", "--aio", "--inline", "1"], "inline", 1)
        )
    return _windows(args, [(*step, 1) for step in plan])


def _windows(
    args: argparse.Namespace, plan: list[tuple[str, list[str], str, int, int]]
) -> list[dict[str, Any]]:
    """Every window of ``plan`` (label, server arguments, mode, clients, replicas),
    ``--rounds`` times over in turn; the median of each."""
    windows: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(plan))}
    for round_ in range(args.rounds):
        for i, (label, server_args, mode, count, replicas) in enumerate(plan):
            row = measure(
                label,
                [a.replace("{round}", str(round_)) for a in server_args],
                mode,
                clients=count,
                seconds=args.seconds,
                warmup=args.warmup,
                replicas=replicas,
                pg=args.pg,
            )
            windows[i].append(row)
            _progress(row)
    return [_median_row(windows[i]) for i in range(len(plan))]


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One figure from several windows: the median of each timing, the peak of memory, all the
    errors; the windows' rates are kept too."""
    out = dict(rows[0])
    timings = ("per_s", "p50_ms", "p99_ms", "server_cpu_ms", "client_cpu_ms", "total_cpu_ms")
    extra = ("lrofw_cpu_ms", "db_cpu_ms", "db_background_cpu_ms")
    for key in (*timings, *(k for k in extra if k in out)):
        out[key] = statistics.median(r[key] for r in rows)
    out["ops"] = sum(r["ops"] for r in rows)
    out["errors"] = sum(r["errors"] for r in rows)
    out["first_error"] = next((r["first_error"] for r in rows if r["first_error"]), "")
    out["peak_mem_mb"] = max(r["peak_mem_mb"] for r in rows)
    out["windows_per_s"] = [r["per_s"] for r in rows]
    return out


def notice(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import notice as notice_bench

    samples = 20 if args.quick else 300
    out: dict[str, Any] = {"latency": [], "polling": []}
    for label, server_args in (
        ("lrofw memory, sync", ["--kind", "lrofw"]),
        ("lrofw memory, aio", ["--kind", "lrofw", "--aio"]),
        ("hand-written (Go port), sync", ["--kind", "handwritten"]),
    ):
        with spawn(["-m", "benchmarks._servers", *server_args]) as server:
            figures = notice_bench.notice_latency(server.target, samples)
        out["latency"].append({"contender": label, **figures})
        print(f"  notice {label}: {figures}", file=sys.stderr, flush=True)
    durations = (0.05, 1.0) if args.quick else (0.05, 1.0, 5.0)
    with spawn(["-m", "benchmarks._servers", "--kind", "lrofw", "--aio"]) as server:
        out["polling"] = notice_bench.polling_vs_wait(
            server.target, durations, per_duration=2 if args.quick else 10
        )
    for row in out["polling"]:
        print(f"  polling {row}", file=sys.stderr, flush=True)
    return out


def replicas(args: argparse.Namespace, tmp: pathlib.Path) -> dict[str, Any]:
    """Several server processes on one shared store (shared SQLite; PostgreSQL when reachable).

    - notice: created through replica A, waited on through replica B (and through A itself,
      for comparison), one client; p50/p99 of how late the wait returns.
    - throughput: create-to-result with 1, 2 and 3 replicas, the client processes spread over
      them round robin (each client keeps to its replica); CPU of every replica and, for
      PostgreSQL, of the backends serving them.
    """
    from benchmarks import notice as notice_bench

    stores = [
        (label, [a.replace("{tmp}", str(tmp)) for a in server_args])
        for label, server_args in REPLICA_STORES
        if args.pg is not None or not any("{pg}" in a for a in server_args)
    ]
    samples = 20 if args.quick else 300
    out: dict[str, Any] = {"notice": [], "throughput": []}
    for n, (label, server_args) in enumerate(stores):
        server_args = [a.replace("{n}", f"notice-{n}") for a in server_args]
        if any("{pg}" in a for a in server_args):
            url = args.pg.store_url()
            server_args = [a.replace("{pg}", url) for a in server_args]
        with (
            spawn(["-m", "benchmarks._servers", *server_args]) as a,
            spawn(["-m", "benchmarks._servers", *server_args]) as b,
        ):
            for through, wait_target in (("another replica", b.target), ("the same", a.target)):
                figures = notice_bench.notice_latency(a.target, samples, wait_target=wait_target)
                row = {"contender": label, "wait_through": through, **figures}
                out["notice"].append(row)
                print(f"  notice across replicas {row}", file=sys.stderr, flush=True)
    clients = 3 if args.quick else 8
    plan = [
        (label, [a.replace("{n}", f"{count}-{{round}}") for a in server_args],
         "create_to_result", clients, count)
        for label, server_args in stores
        for count in (1, 2, 3)
    ]  # fmt: skip
    out["throughput"] = _windows(args, plan)
    return out


def celery(args: argparse.Namespace) -> list[dict[str, Any]]:
    from benchmarks import celery_bench

    rows = celery_bench.run(quick=args.quick, seconds=args.seconds * args.rounds)
    for row in rows:
        print(f"  celery {row}", file=sys.stderr, flush=True)
    return [dict(row) for row in rows]


def store(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per store, each in a process of its own: memory per finished operation and the time to
    expire them (``store_size``), then the write path in process (``store_write``: create +
    finish with one thread and with eight; rows with ``"figure": "write"``)."""
    seconds = str(min(args.seconds, 1.0))
    runs = [
        ("store_size", kind, ["--ops", str(args.store_ops)], {}) for kind in ("memory", "sqlite")
    ] + [
        ("store_write", kind, ["--seconds", seconds, "--rounds", str(args.rounds)],
         {"figure": "write"})
        for kind in ("memory", "sqlite")
    ]  # fmt: skip
    rows = []
    for module, kind, options, extra in runs:
        done = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{module}", "--store", kind, *options],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{module} {kind} failed:\n{done.stderr[-2000:]}")
        rows.append({**json.loads(done.stdout.strip().splitlines()[-1]), **extra})
        print(f"  store {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def _progress(row: dict[str, Any]) -> None:
    replicas = f" on {row['replicas']} replicas" if row.get("replicas", 1) > 1 else ""
    db = f" (PostgreSQL {row['db_cpu_ms']:.3f})" if "db_cpu_ms" in row else ""
    print(
        f"  {row['contender']:32s} {row['mode']:17s} x{row['clients']}{replicas}: "
        f"{row['per_s']:7.0f}/s server {row['server_cpu_ms']:.3f} ms/op{db}, "
        f"errors {row['errors']}",
        file=sys.stderr,
        flush=True,
    )


def list_pressure(args: argparse.Namespace) -> list[dict[str, Any]]:
    from benchmarks import list_pressure as bench

    return bench.run(quick=args.quick)


SECTIONS: dict[str, Callable[..., Any]] = {
    "throughput": throughput,
    "notice": notice,
    "replicas": replicas,
    "celery": celery,
    "store": store,
    "list": list_pressure,
}


def machine() -> dict[str, Any]:
    import grpc

    cpu = ""
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "kernel": platform.release(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny windows (CI)")
    parser.add_argument("--seconds", type=float, default=None, help="each throughput window")
    parser.add_argument(
        "--rounds", type=int, default=None, help="windows per throughput figure (the median)"
    )
    parser.add_argument("--store-ops", type=int, default=None, help="operations in the store")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(SECTIONS), default=None, help="run only these"
    )
    parser.add_argument("--out", default=".benchmarks/results.json", help="JSON written here")
    parser.add_argument(
        "--postgres",
        default=DEFAULT_DSN,
        metavar="URL",
        help="the PostgreSQL the PostgreSQL contenders use: each gets a fresh schema, dropped at "
        f"the end (default {DEFAULT_DSN}); unreachable: they are skipped",
    )
    parser.add_argument(
        "--docs",
        action="store_true",
        help="write the report into docs/performance.md (and its JSON and plot beside it)",
    )
    args = parser.parse_args(argv)
    exit_on_sigterm()
    if args.seconds is None:
        args.seconds = 0.6 if args.quick else 3.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    args.warmup = 0.3 if args.quick else 1.0
    if args.store_ops is None:
        args.store_ops = 20_000 if args.quick else 1_000_000
    started = time.monotonic()
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick}
    results["command"] = "python -m benchmarks" + (" --quick" if args.quick else "")
    import tempfile

    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lrofw-bench-") as tmp, contextlib.ExitStack() as pg:
        args.pg = None
        if not args.only or {"throughput", "replicas"} & set(args.only):
            try:
                require_store()
                args.pg = pg.enter_context(postgres_run(args.postgres))
            except Skipped as exc:
                results.setdefault("skipped", {})["postgres"] = str(exc)
                print(f"PostgreSQL contenders skipped: {exc}", file=sys.stderr, flush=True)
        for name, section in SECTIONS.items():
            if args.only and name not in args.only:
                continue
            print(f"{name} ...", file=sys.stderr, flush=True)
            try:
                if name in ("throughput", "replicas"):
                    results[name] = section(args, pathlib.Path(tmp))
                else:
                    results[name] = section(args)
            except Skipped as exc:
                results.setdefault("skipped", {})[name] = str(exc)
                print(f"{name} skipped: {exc}", file=sys.stderr, flush=True)
            except Exception as exc:
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                print(f"{name} failed: {exc}", file=sys.stderr, flush=True)
    results["seconds"] = time.monotonic() - started
    results["ratios"] = _report.ratios(results)
    missing = _report.missing(results, args.only)
    report = _report.markdown(results)
    print(report)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"figures written to {out}", file=sys.stderr)
    if args.docs:
        _report.write_docs(results, report, ROOT / "docs")
        print("docs/performance.md updated", file=sys.stderr)
    for problem in failures + missing:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if failures or missing else 0


if __name__ == "__main__":
    sys.exit(main())
