"""The test PostgreSQL server: fresh schemas for this test run, dropped when it ends.

Plain code imported by the tests. The server is ``$LROFW_TEST_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/test``: trust auth, database ``test``). Every schema a
test run creates starts with :data:`RUN` (``lrofw_t`` and 8 random hex digits), so runs never
collide and :func:`drop_schemas` removes exactly what this run made. Without psycopg or a
reachable server, :func:`require` skips the test that asks.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import uuid
from typing import Any

import pytest

DSN = os.environ.get("LROFW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")

#: This run's schema prefix.
RUN = f"lrofw_t{uuid.uuid4().hex[:8]}"


@functools.lru_cache(maxsize=1)
def _why_not() -> str | None:
    """Why PostgreSQL tests cannot run here, or None when they can."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'lrofw[postgres]')"
    try:
        with psycopg.connect(DSN, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return f"no PostgreSQL server at {DSN}: {exc}"


def require() -> None:
    """Skip the calling test unless the test server is usable."""
    why = _why_not()
    if why is not None:
        pytest.skip(why)


def schema(label: str | pathlib.Path | None = None) -> str:
    """A schema name of this run: the same for the same ``label`` (a test's folder, say), a
    new one for None."""
    text = uuid.uuid4().hex if label is None else str(label)
    return f"{RUN}_{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def store(label: str | pathlib.Path | None = None, **options: Any) -> Any:
    """A PostgresStore on the test server in this run's schema for ``label``."""
    require()
    from lrofw.stores import PostgresStore

    return PostgresStore(DSN, schema=schema(label), **options)


def connect(**options: Any) -> Any:
    """A new autocommit connection to the test server (for a test's own statements)."""
    import psycopg

    return psycopg.connect(DSN, autocommit=True, **options)


def drop_schemas() -> None:
    """Drop every schema this run created (one at a time: few locks per transaction)."""
    if _why_not() is not None:
        return
    with connect() as conn:
        rows = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, %s)", (RUN + "_",)
        ).fetchall()
        for (name,) in rows:
            conn.execute(f'DROP SCHEMA "{name}" CASCADE')
