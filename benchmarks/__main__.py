"""lrofw side by side with the gRPC ceiling, a hand-written server, google-api-core and Celery.

Run it from the repository root, after the README's install step::

    python -m benchmarks              # the full run: about 10 minutes
    python -m benchmarks --quick      # a smoke run (CI): every contender, tiny windows, < 1 min
    python -m benchmarks --docs       # the full run, written into docs/performance.md

It prints a Markdown report and writes every figure as JSON (``--out``). Everything runs in one
go on one machine, each server in a process of its own, each client in processes of their own:

- **throughput**: 8 concurrent clients (8 processes, each one call after another) for
  ``--seconds`` against each server. *create*: the create RPC alone; *create-to-result*: create,
  then ``lrofw.wait`` (WaitOperation) until the no-op operation is done; *inline*: the same on a
  server whose method has ``inline_timeout=1`` (the create returns the operation done). The
  ceiling serves an empty unary call instead. Per operation: the server's CPU (the whole process,
  its store included) and the clients' CPU; the server's peak memory (VmHWM).
- **notice**: one client waiting with ``lrofw.wait`` on operations that finish at a known moment:
  how late it returns (p50/p99), against the round trip of one empty call; and
  google-api-core's default polling against ``lrofw.wait`` for operations of 0.05 s, 1 s, 5 s.
- **celery**: Celery 5 with a Redis of its own (a ``redis-server`` it starts on a free port and
  stops; skipped, and said so in the report, without one) as broker and result backend, a local
  prefork worker: submit-to-result of a no-op task with 1 and 8 clients, and the CPU of client,
  worker and Redis.
- **store**: memory per finished operation in a store of ``--store-ops`` (1,000,000) and the time
  to expire them all, for the memory and SQLite stores.
- **list**: Get latency while 4 clients list worst-case filters over 100,000 operations
  (``benchmarks/list_pressure.py``; 10,000 with ``--quick``), memory and SQLite stores.

Then it checks the ratios lrofw is held to (see docs/performance.md) and prints each with its
verdict. Timings on a shared machine are noisy, so the ratios never fail the command: it exits
1 only when a contender produced no figures (or a section broke), 0 otherwise.
"""

from __future__ import annotations

import argparse
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
]


def measure(
    label: str,
    server_args: list[str],
    mode: str,
    *,
    clients: int,
    seconds: float,
    warmup: float,
) -> dict[str, Any]:
    """One window of ``clients`` client processes against a fresh server (and store)."""
    server_args = [a.replace("{mode}", mode) for a in server_args]
    factory = {
        "empty": "benchmarks._clients:empty",
        "create": "benchmarks._clients:create",
        "create_to_result": "benchmarks._clients:create_to_result",
        "inline": "benchmarks._clients:create_to_result",
    }[mode]
    with spawn(["-m", "benchmarks._servers", *server_args]) as server:
        cpu: list[float] = []
        load = run_clients(
            factory,
            {"target": server.target},
            processes=clients,
            seconds=seconds,
            warmup=warmup,
            on_start=lambda: cpu.append(server.cpu()),
            on_end=lambda: cpu.append(server.cpu()),
        )
        peak = server.peak_kb()
    ops = max(load.ops, 1)
    server_ms = 1000 * (cpu[1] - cpu[0]) / ops
    client_ms = 1000 * load.client_cpu / ops
    return {
        "contender": label,
        "mode": mode,
        "clients": clients,
        "ops": load.ops,
        "per_s": load.rate,
        "p50_ms": 1000 * _report.percentile(load.latencies, 50),
        "p99_ms": 1000 * _report.percentile(load.latencies, 99),
        "server_cpu_ms": server_ms,
        "client_cpu_ms": client_ms,
        "total_cpu_ms": server_ms + client_ms,
        "peak_mem_mb": peak / 1024,
        "errors": load.errors,
        "first_error": load.first_error,
    }


def throughput(args: argparse.Namespace, tmp: pathlib.Path) -> list[dict[str, Any]]:
    """Every (server, mode, clients) window, ``--rounds`` times over in turn, so that a drift of
    the machine's speed during the run touches every contender alike; the median of each."""
    clients = 2 if args.quick else 8
    plan: list[tuple[str, list[str], str, int]] = []
    for label, server_args, serves in SERVERS:
        server_args = [a.replace("{tmp}", str(tmp)) for a in server_args]
        if serves == "ceiling":
            plan.append((label, server_args, "empty", clients))
            continue
        plan.append((label, server_args, "create", clients))
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
    windows: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(plan))}
    for round_ in range(args.rounds):
        for i, (label, server_args, mode, count) in enumerate(plan):
            row = measure(
                label,
                [a.replace("{round}", str(round_)) for a in server_args],
                mode,
                clients=count,
                seconds=args.seconds,
                warmup=args.warmup,
            )
            windows[i].append(row)
            _progress(row)
    return [_median_row(windows[i]) for i in range(len(plan))]


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One figure from several windows: the median of each timing, the peak of memory, all the
    errors; the windows' rates are kept too."""
    out = dict(rows[0])
    for key in ("per_s", "p50_ms", "p99_ms", "server_cpu_ms", "client_cpu_ms", "total_cpu_ms"):
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


def celery(args: argparse.Namespace) -> list[dict[str, Any]]:
    from benchmarks import celery_bench

    rows = celery_bench.run(quick=args.quick, seconds=args.seconds * args.rounds)
    for row in rows:
        print(f"  celery {row}", file=sys.stderr, flush=True)
    return [dict(row) for row in rows]


def store(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for kind in ("memory", "sqlite"):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.store_size",
                "--store",
                kind,
                "--ops",
                str(args.store_ops),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"store_size {kind} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  store {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def _progress(row: dict[str, Any]) -> None:
    print(
        f"  {row['contender']:32s} {row['mode']:17s} x{row['clients']}: {row['per_s']:7.0f}/s "
        f"server {row['server_cpu_ms']:.3f} ms/op, errors {row['errors']}",
        file=sys.stderr,
        flush=True,
    )


def list_pressure(args: argparse.Namespace) -> list[dict[str, Any]]:
    from benchmarks import list_pressure as bench

    return bench.run(quick=args.quick)


SECTIONS: dict[str, Callable[..., Any]] = {
    "throughput": throughput,
    "notice": notice,
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
    with tempfile.TemporaryDirectory(prefix="lrofw-bench-") as tmp:
        for name, section in SECTIONS.items():
            if args.only and name not in args.only:
                continue
            print(f"{name} ...", file=sys.stderr, flush=True)
            try:
                if name in ("throughput",):
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
