"""The benchmark's PostgreSQL and replica rows: what the report shows, which ratios it checks,
what counts as missing, and the run's own PostgreSQL schemas (made fresh, always dropped; an
unreachable PostgreSQL is a skip, not a crash). No timings are asserted."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest
from test_bench_report import complete

from benchmarks import _postgres, _report

PG = _report.POSTGRES[0]
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/test"


def test_a_complete_run_with_postgres_and_replicas_misses_nothing() -> None:
    assert _report.missing(complete(), None) == []


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda r: r["throughput"].pop(-1), "lrofw PostgreSQL, aio: no inline figures"),
        (lambda r: r["replicas"]["notice"].pop(2), f"{PG}: no notice figures waiting through"),
        (lambda r: r["replicas"]["throughput"].pop(4), f"{PG}: no figures with 2 replicas"),
        (
            lambda r: r["replicas"]["throughput"][0].update(errors=1, first_error="UNAVAILABLE"),
            "shared SQLite, sync on 1 replicas: 410 ops, 1 errors UNAVAILABLE",
        ),
    ],
)
def test_missing_postgres_or_replica_figures_are_reported(damage: Any, expected: str) -> None:
    results = complete()
    damage(results)
    problems = _report.missing(results, None)
    assert any(expected in p for p in problems), problems


def test_postgres_skipped_is_said_and_only_its_rows_are_spared() -> None:
    results = complete()
    results["throughput"] = [
        r for r in results["throughput"] if r["contender"] not in _report.POSTGRES
    ]
    replicas = results["replicas"]
    replicas["notice"] = [r for r in replicas["notice"] if r["contender"] != PG]
    replicas["throughput"] = [r for r in replicas["throughput"] if r["contender"] != PG]
    reason = f"PostgreSQL at {UNREACHABLE} is unreachable: connection refused"
    results["skipped"] = {"postgres": reason}
    assert _report.missing(results, None) == []
    results["ratios"] = _report.ratios(results)
    text = _report.markdown(results)
    assert f"**Skipped: postgres.** {reason}" in text
    assert PG not in text
    # Shared SQLite still has to be there.
    replicas["notice"].pop()
    assert any(_report.SHARED_SQLITE in p for p in _report.missing(results, None))


def test_postgres_ratios_are_issue_11s() -> None:
    ratios = {r["what"]: r for r in _report.ratios(complete())}
    sync = ratios[f"{PG}: create-then-wait / the memory store's (lrofw memory, sync)"]
    assert sync["value"] == pytest.approx(450 / 900) and sync["met"] and sync["bound"] == 0.5
    aio = ratios["lrofw PostgreSQL, aio: create-then-wait / the memory store's (lrofw memory, aio)"]
    assert aio["value"] == pytest.approx(0.5)
    # The round trip is the one-client empty call's p50 (0.5 ms): 4 ms is 8x, within 10x.
    notice = ratios[f"{PG}: notice p50 across replicas / empty-call round trip p50"]
    assert notice["value"] == pytest.approx(8.0) and notice["met"] and not notice["at_least"]
    assert ratios[f"{PG}: notice p99 across replicas, ms"]["value"] == pytest.approx(8.0)
    # Shared SQLite's notice across replicas is shown, not held to PostgreSQL's bound.
    assert not any("shared SQLite" in what for what in ratios)


def test_postgres_ratios_out_of_bounds_are_not_met() -> None:
    results = complete()
    for r in results["throughput"]:
        if r["contender"] == PG and r["mode"] == "create_to_result":
            r["per_s"] = 400.0
    for r in results["replicas"]["notice"]:
        if r["contender"] == PG and r["wait_through"] == _report.ACROSS:
            r["p50_ms"] = 5.5
    ratios = {r["what"]: r for r in _report.ratios(results)}
    assert not ratios[f"{PG}: create-then-wait / the memory store's (lrofw memory, sync)"]["met"]
    assert not ratios[f"{PG}: notice p50 across replicas / empty-call round trip p50"]["met"]


def test_the_report_shows_postgres_and_replicas() -> None:
    results = complete()
    results["ratios"] = _report.ratios(results)
    text = _report.markdown(results)
    # PostgreSQL's CPU beside lrofw's in the throughput table.
    assert f"| {PG} | 900 | 450 | 800 | 1.000 (lrofw 0.600 + PostgreSQL 0.400) |" in text
    assert f"| {PG} | another replica | 20 | 4.00 | 8.00 | 9.00 |" in text
    assert f"| {PG} | 3 | 430 | 1.00 | 2.00 | 1.000 | 0.700 (0.100) | 0.500 | 1.000 |" in text
    assert f"| {_report.SHARED_SQLITE} | 2 | 420 | 1.00 | 2.00 | 0.500 | - |" in text
    assert PG in _report.svg(results)


def test_an_unreachable_postgres_is_a_skip() -> None:
    unreachable = re.escape(f"PostgreSQL at {UNREACHABLE} is unreachable: ")
    with (
        pytest.raises(_postgres.PostgresMissing, match=unreachable),
        _postgres.postgres_run(UNREACHABLE),
    ):
        pass  # pragma: no cover


def _schemas(prefix: str) -> list[str]:
    import psycopg

    with psycopg.connect(_postgres.DEFAULT_DSN) as conn:
        rows = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (prefix + "%",)
        ).fetchall()
    return [r[0] for r in rows]


@pytest.fixture
def pg() -> Any:
    try:
        with _postgres.postgres_run() as run:
            yield run
    except _postgres.PostgresMissing as exc:
        pytest.skip(str(exc))


def test_schemas_are_fresh_and_dropped_even_on_failure() -> None:
    try:
        context = _postgres.postgres_run()
        run = context.__enter__()
    except _postgres.PostgresMissing as exc:
        pytest.skip(str(exc))
    with pytest.raises(RuntimeError, match="a section broke"):
        try:
            first, second = run.store_url(), run.store_url()
            assert first != second
            assert first.startswith(_postgres.DEFAULT_DSN + "?schema=" + run.prefix)
            assert sorted(_schemas(run.prefix)) == [f"{run.prefix}_0", f"{run.prefix}_1"]
            raise RuntimeError("a section broke")
        except BaseException:
            assert context.__exit__(*sys.exc_info()) is not True
            raise
    assert _schemas(run.prefix) == []


def test_the_backends_serving_a_process_are_found_and_timed(pg: _postgres.PostgresRun) -> None:
    """A child process with two connections: both backends are found by their client ports,
    and none of this test's own admin connection."""
    script = (
        "import sys, psycopg\n"
        f"conns = [psycopg.connect({_postgres.DEFAULT_DSN!r}) for _ in range(2)]\n"
        "print(*[c.execute('SELECT pg_backend_pid()').fetchone()[0] for c in conns], flush=True)\n"
        "sys.stdin.readline()\n"
        "for _ in range(300):\n"
        "    conns[0].execute('SELECT count(*) FROM generate_series(1, 20000)').fetchone()\n"
        "print('done', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        try:
            expected = sorted(int(p) for p in child.stdout.readline().split())
            assert sorted(pg.backend_pids([child.pid])) == expected
            own = pg.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            assert own not in expected
            before = pg.sample([child.pid])
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "done"
            spent = _postgres.cpu_delta(before, pg.sample([child.pid]))
            assert spent["backends"] > 0  # 300 queries of 20,000 rows: some clock ticks
            assert set(before["background"]) and spent["background"] >= 0
        finally:
            child.kill()
