"""PostgreSQL for the benchmarks: fresh schemas that are always dropped, and the CPU of the
PostgreSQL backends that serve the run.

:func:`postgres_run` connects to the PostgreSQL the run was given (``--postgres``, by default
``postgresql://postgres@127.0.0.1:5432/test``), and yields a :class:`PostgresRun`. Each
:meth:`PostgresRun.store_url` creates a schema of its own, ``lrofw_bench_<random>_<n>`` (a fresh
store for each server, or each set of replicas, like the SQLite contenders' fresh files), and
returns the lrofw store URL for it (``...?schema=NAME``). When the ``with`` block ends, also on
an exception, Ctrl-C or SIGTERM (``benchmarks._proc.exit_on_sigterm``), every schema it created is
dropped, and only those. When PostgreSQL is unreachable (or psycopg is not installed) it raises
:class:`PostgresMissing`, a :class:`benchmarks._proc.Skipped`: the PostgreSQL rows are skipped and
the report says why.

CPU of PostgreSQL: the backends that serve the run are found from the server processes' side. A
server's TCP connections to PostgreSQL are sockets in ``/proc/PID/fd`` whose inodes
``/proc/net/tcp`` lists with their local port; ``pg_stat_activity`` gives the backend pid for each
``client_port``. Their user + system CPU (``/proc/PID/stat``, utime + stime) is read at the window's
start and end: the delta (a backend that connected during the window counts from zero) is the
PostgreSQL CPU of the run, and no other client of the same PostgreSQL (another test run, say) is
counted. The cluster's shared background processes (WAL writer, checkpointer, background
writer) are reported apart, as ``db_background_cpu_ms``: they also work for everyone else.

Example::

    with postgres_run("postgresql://postgres@127.0.0.1:5432/test") as pg:
        url = pg.store_url()          # postgresql://...?schema=lrofw_bench_3f2a9c1e_0
        ...                           # servers on it; pg.cpu(server_pids) before and after
"""

from __future__ import annotations

import contextlib
import pathlib
import secrets
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from benchmarks._proc import Skipped, children, cpu_seconds

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
PG_PORT_DEFAULT = 5432
#: The background processes of the cluster counted apart (pg_stat_activity.backend_type).
BACKGROUND = ("walwriter", "checkpointer", "background writer")
#: How long dropping a schema may wait for a lock before it gives up (and says which is left).
DROP_LOCK_TIMEOUT = "10s"


class PostgresMissing(Skipped):
    """PostgreSQL is unreachable, psycopg is not installed, or lrofw has no PostgreSQL store."""


def _with_schema(dsn: str, schema: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"


@dataclass
class PostgresRun:
    """The run's PostgreSQL: an admin connection (autocommit) and the schemas made for the run."""

    dsn: str
    conn: Any
    prefix: str
    schemas: list[str] = field(default_factory=list)

    def store_url(self) -> str:
        """Create a fresh schema and return the lrofw store URL on it."""
        schema = f"{self.prefix}_{len(self.schemas)}"
        self.conn.execute(f'CREATE SCHEMA "{schema}"')
        self.schemas.append(schema)
        return _with_schema(self.dsn, schema)

    def backend_pids(self, server_pids: Iterable[int]) -> list[int]:
        """The backends serving connections that ``server_pids`` (and their children) opened."""
        ports = client_ports(server_pids, self.port)
        if not ports:
            return []
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s)", (sorted(ports),)
        ).fetchall()
        return [int(r[0]) for r in rows]

    def background_pids(self) -> list[int]:
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = ANY(%s)", (list(BACKGROUND),)
        ).fetchall()
        return [int(r[0]) for r in rows]

    @property
    def port(self) -> int:
        return int(self.conn.info.port or PG_PORT_DEFAULT)

    def sample(self, server_pids: Iterable[int]) -> dict[str, dict[int, float]]:
        """CPU seconds so far of the serving backends and of the background processes."""
        return {
            "backends": {pid: cpu_seconds(pid) for pid in self.backend_pids(server_pids)},
            "background": {pid: cpu_seconds(pid) for pid in self.background_pids()},
        }

    def drop(self) -> list[str]:
        """Drop every schema made for the run; the ones that could not be dropped, with why."""
        left: list[str] = []
        for schema in self.schemas:
            try:
                self.conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            except Exception as exc:
                left.append(f"{schema}: {type(exc).__name__}: {exc}")
        self.schemas.clear()
        return left


def cpu_delta(
    start: dict[str, dict[int, float]], end: dict[str, dict[int, float]]
) -> dict[str, float]:
    """Seconds of CPU between two :meth:`PostgresRun.sample` calls, per kind of process.

    A process seen only at the end counts from zero (it started in the window); one seen only at
    the start has exited, and its CPU in the window is lost (a backend of a closed connection).
    """
    return {
        kind: sum(max(0.0, cpu - start[kind].get(pid, 0.0)) for pid, cpu in end[kind].items())
        for kind in end
    }


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        fds = list(pathlib.Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            link = fd.readlink().name
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[len("socket:[") : -1]))
    return inodes


def client_ports(server_pids: Iterable[int], pg_port: int) -> set[int]:
    """Local ports of the TCP connections to ``pg_port`` held by the processes (and children)."""
    inodes: set[int] = set()
    for pid in server_pids:
        for one in (pid, *children(pid)):
            inodes |= _socket_inodes(one)
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = pathlib.Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            fields = line.split()
            local, remote, inode = fields[1], fields[2], int(fields[9])
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == pg_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def require_store() -> None:
    """Raise :class:`PostgresMissing` unless this lrofw can serve from PostgreSQL."""
    import lrofw.stores

    try:
        lrofw.stores.PostgresStore  # noqa: B018  (imported when first asked for)
    except AttributeError:
        raise PostgresMissing(
            "this lrofw has no PostgreSQL store (lrofw.stores.PostgresStore)"
        ) from None
    except ImportError as exc:
        raise PostgresMissing(f"lrofw.stores.PostgresStore cannot be imported: {exc}") from None


@contextlib.contextmanager
def postgres_run(dsn: str = DEFAULT_DSN) -> Iterator[PostgresRun]:
    """The run's PostgreSQL; every schema made through it is dropped when the block ends.

    Raises:
        PostgresMissing: psycopg is not installed, or PostgreSQL at ``dsn`` cannot be reached.
    """
    try:
        import psycopg
    except ImportError as exc:
        raise PostgresMissing(
            f"psycopg is not installed (pip install -e '.[postgres]'): {exc}"
        ) from None
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PostgresMissing(f"PostgreSQL at {dsn} is unreachable: {first}") from None
    run = PostgresRun(dsn, conn, f"lrofw_bench_{secrets.token_hex(4)}")
    try:
        conn.execute(f"SET lock_timeout = '{DROP_LOCK_TIMEOUT}'")
        yield run
    finally:
        left = run.drop()
        conn.close()
        for problem in left:
            print(f"could not drop PostgreSQL schema {problem}", file=sys.stderr, flush=True)
