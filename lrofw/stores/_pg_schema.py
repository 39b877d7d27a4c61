"""The PostgreSQL store's schema: its tables, versioned migrations run at open (safe when
replicas start at once), connection settings, and the errors that say why a store cannot open.

Imported only by :mod:`lrofw.stores.postgres` (it needs psycopg, the ``postgres`` extra).
"""

from __future__ import annotations

import os
import re
from typing import Any

import psycopg
from psycopg import conninfo as pg_conninfo

from .base import StoreOpenError

#: The schema this code writes. A schema with a newer one is refused; older ones are migrated.
SCHEMA_VERSION = 1

#: What a schema name may be: a plain identifier short enough that the notification channel
#: named after it (``lrofw_`` + schema) stays within PostgreSQL's 63 bytes.
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,56}")

#: The first key of the advisory locks the store takes (the second is a hash of the schema and
#: the lock's purpose): ``lrof`` in ASCII, to tell them from an application's own in ``pg_locks``.
LOCK_SPACE = 0x6C726F66

#: Advisory locks: one migration at a time, one expiry pass at a time (per schema).
MIGRATION_LOCK, EXPIRY_LOCK = "migrate", "expire"


def lock_key(schema: str, purpose: str) -> str:
    """The text whose ``hashtext`` is the second key of ``purpose``'s advisory lock."""
    return f"{schema}:{purpose}"


# Forward migrations: _MIGRATIONS[n] takes a schema from version n to n + 1. ``{s}`` is the
# schema, quoted. Names and methods compare as bytes (COLLATE "C"): the order Python gives them.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    0: (
        """CREATE TABLE {s}.ops (
            position BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name TEXT COLLATE "C" NOT NULL UNIQUE,
            method TEXT COLLATE "C" NOT NULL,
            done SMALLINT NOT NULL DEFAULT 0,
            error_code BIGINT NOT NULL DEFAULT 0,
            create_time DOUBLE PRECISION NOT NULL,
            done_time DOUBLE PRECISION,
            owner TEXT,
            epoch BIGINT NOT NULL DEFAULT 0,
            lost INTEGER NOT NULL DEFAULT 0,
            principal TEXT COLLATE "C",
            request BYTEA,
            request_key BYTEA,
            request_hash BYTEA,
            data BYTEA NOT NULL
        )""",
        "CREATE INDEX ops_expiry ON {s}.ops(done_time, position) WHERE done = 1",
        "CREATE INDEX ops_unfinished ON {s}.ops(owner) WHERE done = 0",
        # Request-id idempotency: INSERT ... ON CONFLICT DO NOTHING against this index.
        "CREATE UNIQUE INDEX ops_request_key ON {s}.ops(request_key) WHERE request_key IS NOT NULL",
        "CREATE INDEX ops_principal ON {s}.ops(principal, position) WHERE principal IS NOT NULL",
        "CREATE TABLE {s}.owners (owner TEXT PRIMARY KEY, lease_until DOUBLE PRECISION NOT NULL)",
    ),
}


def check_schema(schema: object) -> str:
    """``schema`` if it is a usable schema name; TypeError or ValueError otherwise."""
    if not isinstance(schema, str):
        raise TypeError(f"schema must be a str such as 'lrofw', got {type(schema).__name__}")
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(
            f"schema must be a plain identifier (letters, digits, _; not starting with a digit;"
            f" at most 57 characters), got {schema!r}"
        )
    return schema


def quoted(schema: str) -> str:
    """The schema as an SQL identifier (checked by :func:`check_schema`: nothing to escape)."""
    return f'"{schema}"'


def channel(schema: str) -> str:
    """The notification channel of a schema (at most 63 bytes)."""
    return f"lrofw_{schema}"


def shown(conninfo: str) -> str:
    """The connection string without its password, for messages and logs."""
    try:
        params = pg_conninfo.conninfo_to_dict(conninfo)
    except psycopg.Error:
        return "<a connection string libpq cannot parse>"
    params.pop("password", None)
    return pg_conninfo.make_conninfo("", **params) or "(libpq defaults)"


def open_error(conninfo: str, schema: str, exc: BaseException) -> StoreOpenError:
    """A StoreOpenError for a failed first connection, saying why and what to check."""
    text = str(exc).strip() or type(exc).__name__
    lowered = text.lower()
    if "password" in lowered or "authentication" in lowered or "role" in lowered:
        hint = "check the user name and password (or the server's pg_hba.conf)"
    elif "database" in lowered and "does not exist" in lowered:
        hint = "create the database, or name one that exists"
    elif "permission denied" in lowered:
        hint = f"grant the user CREATE on the database, or create schema {schema!r} for it"
    else:
        hint = "is the server running, and are host and port right?"
    return StoreOpenError(
        f"cannot open PostgreSQL store {shown(conninfo)!r} (schema {schema!r}): {text}; {hint}"
    )


def _version(conn: psycopg.Connection[tuple[Any, ...]], schema: str) -> int | None:
    """The schema's version, or None when it has no lrofw tables yet."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{quoted(schema)}.meta",)).fetchone()
    if row is None or not row[0]:
        return None
    found = conn.execute(
        f"SELECT value FROM {quoted(schema)}.meta WHERE key = 'schema_version'"
    ).fetchone()
    return None if found is None else int(bytes(found[0]).decode())


def migrate(conn: psycopg.Connection[tuple[Any, ...]], schema: str) -> bytes:
    """Bring ``schema`` to :data:`SCHEMA_VERSION` (creating it if missing) and return the
    page-token key every replica shares. Replicas starting at once queue on an advisory lock,
    so one migrates and the others find the work done.

    Raises:
        StoreOpenError: the schema is newer than this code knows.
    """
    s = quoted(schema)
    with conn.transaction():
        version = _version(conn, schema)
    if version is None or version < SCHEMA_VERSION:
        with conn.transaction():
            conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                (LOCK_SPACE, lock_key(schema, MIGRATION_LOCK)),
            )
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {s}.meta (key TEXT PRIMARY KEY, value BYTEA NOT NULL)"
            )
            version = _version(conn, schema) or 0
            for step in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step]:
                    conn.execute(statement.format(s=s))
            if version < SCHEMA_VERSION:
                conn.execute(
                    f"INSERT INTO {s}.meta(key, value) VALUES ('schema_version', %s)"
                    " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    (str(SCHEMA_VERSION).encode(),),
                )
            conn.execute(
                f"INSERT INTO {s}.meta(key, value) VALUES ('token_key', %s)"
                " ON CONFLICT (key) DO NOTHING",
                (os.urandom(32),),
            )
    if version is not None and version > SCHEMA_VERSION:
        raise StoreOpenError(
            f"PostgreSQL schema {schema!r} has lrofw schema version {version}, newer than this"
            f" lrofw knows ({SCHEMA_VERSION}); upgrade lrofw to open it"
        )
    with conn.transaction():
        row = conn.execute(f"SELECT value FROM {s}.meta WHERE key = 'token_key'").fetchone()
    assert row is not None
    return bytes(row[0])
