"""Where a benchmark server's CPU goes: a profile of every thread under the standard load.

Run it from the repository root (it needs yappi, in the ``bench`` extra)::

    python -m benchmarks.profile --server "--kind lrofw --inline 1" --mode inline
    python -m benchmarks.profile --server "--kind lrofw --aio" --mode create_to_result
    python -m benchmarks.profile --server "--kind lrofw --store sqlite:/tmp/p.db" --mode create
    python -m benchmarks.profile --server "--kind ceiling" --mode empty

It starts ``benchmarks/_servers.py`` with ``--profile`` (yappi, CPU clock, every thread), drives
it with the same 8 clients as ``python -m benchmarks`` for ``--seconds``, and prints the share of
the server's profiled CPU time spent in each part (grpc's Python layer, asyncio, threading and
queues, lrofw's own code, its SQLite store, protobuf's Python layer, the rest) and the functions
with the most time of their own. Time in C (grpc's core, sqlite3, protobuf's upb) counts to the
Python function that called it. yappi slows the server down several times over; read the shares,
not the rates.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tempfile

from benchmarks._load import run_clients
from benchmarks._proc import spawn

PARTS = (
    ("lrofw SQLite store", re.compile(r"/lrofw/stores/sqlite\.py|/lrofw/stores/_sql\.py")),
    ("lrofw PostgreSQL store", re.compile(r"/lrofw/stores/(postgres|_pg_\w+)\.py")),
    ("psycopg", re.compile(r"/psycopg(_pool|_binary)?/")),
    ("lrofw", re.compile(r"/lrofw/")),
    ("grpc (Python layer)", re.compile(r"/grpc/")),
    ("asyncio", re.compile(r"/asyncio/|selectors\.py")),
    ("threading, queues", re.compile(r"threading\.py|/concurrent/|queue\.py")),
    ("protobuf (Python layer)", re.compile(r"/google/protobuf/")),
    ("benchmark server", re.compile(r"/benchmarks/")),
)

LINE = re.compile(r"^(?P<name>.+?)\s+(?P<ncall>[\d/]+)\s+(?P<tsub>[\d.]+)\s+(?P<ttot>[\d.]+)\s*$")


def parse(text: str) -> list[tuple[str, int, float]]:
    """(function, calls, own seconds) from yappi's ``print_all`` output."""
    rows = []
    for line in text.splitlines():
        match = LINE.match(line.rstrip())
        if match and match["tsub"] != "tsub":
            calls = int(match["ncall"].split("/")[0])
            rows.append((match["name"].strip(), calls, float(match["tsub"])))
    return rows


def part_of(name: str) -> str:
    for part, pattern in PARTS:
        if pattern.search(name):
            return part
    return "other"


def report(rows: list[tuple[str, int, float]], ops: int, top: int) -> str:
    total = sum(r[2] for r in rows) or 1.0
    shares: dict[str, float] = {}
    for name, _, own in rows:
        shares[part_of(name)] = shares.get(part_of(name), 0.0) + own
    lines = [
        f"{ops} operations; profiled CPU {total:.2f} s ({1e3 * total / max(ops, 1):.3f} ms per "
        "operation under the profiler)",
        "",
        "| part | share of the server's CPU |",
        "|---|---:|",
    ]
    for part, seconds in sorted(shares.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {part} | {100 * seconds / total:.1f}% |")
    lines += ["", "| function (own time) | calls | share |", "|---|---:|---:|"]
    for name, calls, own in sorted(rows, key=lambda r: -r[2])[:top]:
        short = name.split("/site-packages/")[-1].split("/lib/python3")[-1]
        lines.append(f"| `{short}` | {calls} | {100 * own / total:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--server", required=True, help="arguments of benchmarks._servers")
    parser.add_argument(
        "--mode", choices=("empty", "create", "create_to_result", "inline"), required=True
    )
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    try:
        import yappi  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        print("benchmarks.profile needs yappi: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    factory = "create_to_result" if args.mode == "inline" else args.mode
    with tempfile.TemporaryDirectory() as folder:
        out = pathlib.Path(folder) / "profile.txt"
        with spawn(
            ["-m", "benchmarks._servers", *args.server.split(), "--profile", str(out)]
        ) as server:
            load = run_clients(
                f"benchmarks._clients:{factory}",
                {"target": server.target},
                processes=args.clients,
                seconds=args.seconds,
            )
        if load.errors:
            print(f"{load.errors} errors, e.g. {load.first_error}", file=sys.stderr)
        print(report(parse(out.read_text()), load.ops, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
