"""The SQLite store's schema: what a file of each version holds, and the way from each to the next.

A file carries its version in ``PRAGMA user_version``. :func:`migrate` brings an older file up to
:data:`SCHEMA_VERSION` inside the caller's write transaction (``BEGIN IMMEDIATE``: two processes
opening one file at once migrate it once, one after the other) and refuses a newer one.
"""

from __future__ import annotations

import functools
import sqlite3

from .base import StoreOpenError

#: The schema this code writes. A file with a newer one is refused; older ones are migrated.
SCHEMA_VERSION = 4

#: The ``meta`` row holding the largest position ever deleted (see ``_OPS_FLOOR_TRIGGER``): a
#: new operation's position is above it and above every stored one, and the positions above it
#: up to the newest have no gaps.
POSITION_FLOOR = "position_floor"

# Schema 3's (and 4's) table and indexes; ``{table}`` is ``ops`` (or the new table while
# migrating).
_OPS_TABLE = """CREATE TABLE {table} (
    position INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    method TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    error_code INTEGER NOT NULL DEFAULT 0,
    create_time REAL NOT NULL,
    done_time REAL,
    owner TEXT,
    request BLOB,
    request_key TEXT,
    request_hash BLOB,
    data BLOB NOT NULL,
    principal TEXT,
    lost INTEGER NOT NULL DEFAULT 0
)"""

#: Every index of schemas 3 and 4, and what needs it. A create writes three b-trees (the table, the
#: name, the unfinished operations) and a finish three (the table, the unfinished operations,
#: expiry), plus ``ops_error`` for a finish with an error.
_OPS_INDEXES = (
    # Expiry: finished operations by finish time; its cost grows with what it removes.
    "CREATE INDEX ops_expiry ON ops(done_time) WHERE done = 1",
    # Recovery: unfinished operations by owner.
    "CREATE INDEX ops_unfinished ON ops(owner) WHERE done = 0",
    # AIP-155 request ids: one operation per key.
    "CREATE UNIQUE INDEX ops_request_key ON ops(request_key) WHERE request_key IS NOT NULL",
    # A principal's listing walks its own positions: a page costs what it returns.
    "CREATE INDEX ops_principal ON ops(principal, position) WHERE principal IS NOT NULL",
    # A List filtered on one error code (``error.code = 5``) walks that code's positions. Only
    # failed operations are in it: a create or a successful finish never writes it. (The store
    # adds the index's own condition to such a query, so that SQLite sees it applies.)
    "CREATE INDEX ops_error ON ops(error_code, position) WHERE error_code != 0",
)

#: Schema 3's trigger, which kept the position of a newest operation deleted (only those); schema
#: 4 replaced it with ``_OPS_FLOOR_TRIGGER``.
_OPS_TOP_TRIGGER = f"""CREATE TRIGGER ops_top AFTER DELETE ON ops
    WHEN NOT EXISTS (SELECT 1 FROM ops WHERE position > old.position)
BEGIN
    UPDATE meta SET value = max(value, old.position) WHERE key = '{POSITION_FLOOR}';
END"""

#: Positions are List cursors and are never reused: without AUTOINCREMENT (whose counter row is
#: one more b-tree written by every create) SQLite would give the next operation the largest
#: position stored plus one, that of a newest operation just deleted. So the largest position
#: ever deleted is kept in ``meta``, and a create takes the larger of it and the largest stored,
#: plus one. The same mark tells List where gaps may be: positions above it, up to the newest,
#: are all there (a create takes the next one), so the max_scan-th operation below a cursor
#: above it is max_scan positions down. The check is one look at ``meta`` per deleted row; the
#: row is written when the mark rises (expiry raises it once per transaction, before its
#: deletes, so its rows find it risen already).
_OPS_FLOOR_TRIGGER = f"""CREATE TRIGGER ops_floor AFTER DELETE ON ops
    WHEN old.position > (SELECT value FROM meta WHERE key = '{POSITION_FLOOR}')
BEGIN
    UPDATE meta SET value = old.position WHERE key = '{POSITION_FLOOR}';
END"""

#: Raise the mark to the parameter, ahead of deleting positions up to it (see
#: ``_OPS_FLOOR_TRIGGER``).
RAISE_FLOOR = f"UPDATE meta SET value = max(value, ?) WHERE key = '{POSITION_FLOOR}'"

#: The mark, in the reader's snapshot: positions above it, up to the newest, have no gaps.
READ_FLOOR = f"SELECT value FROM meta WHERE key = '{POSITION_FLOOR}'"

#: The position a new operation gets (see ``_OPS_FLOOR_TRIGGER``).
NEXT_POSITION = (
    "max((SELECT ifnull(max(position), 0) FROM ops),"
    f" (SELECT value FROM meta WHERE key = '{POSITION_FLOOR}')) + 1"
)

# --- the statements of the write path ----------------------------------------------------------

_INSERTED = "name, method, create_time, owner, request, request_key, request_hash, principal, data"

#: Insert one operation; its parameters are ``_INSERTED``'s columns.
INSERT = (
    f"INSERT INTO ops(position, {_INSERTED}) VALUES ({NEXT_POSITION}, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

#: Finish one operation, in one statement: a serialized message followed by more fields is that
#: message with them set (protobuf merges), so the stored operation (not done: no result yet)
#: followed by ``done`` and its response (or error) is the finished operation, made where it
#: lies. ``||`` joins the bytes as text and the cast makes them a blob again, byte for byte. The
#: request is dropped with the same write (the idempotency hash stays while the operation does).
#: Parameters: error code, finish time, the bytes to append, name, owner (or None), owner again.
FINISH = (
    "UPDATE ops SET done = 1, error_code = ?, done_time = ?, owner = NULL, request = NULL,"
    " data = CAST(data || ? AS BLOB) WHERE name = ? AND done = 0 AND (? IS NULL OR owner = ?)"
    " RETURNING data, method, create_time, position, principal"
)

#: Most rows one statement of :func:`insert_many` or :func:`finish_many` takes.
MANY = 32


def _rows(count: int, width: int) -> str:
    row = "(" + ", ".join("?" * width) + ")"
    return ", ".join([row] * count)


@functools.lru_cache(maxsize=MANY)
def insert_many(count: int) -> str:
    """:data:`INSERT` of ``count`` operations in one statement: each row's parameters are its
    index (0, 1, ...) then ``_INSERTED``'s columns; it returns each one's name and position."""
    columns = ", ".join(f"v.column{i + 2}" for i in range(len(_INSERTED.split(", "))))
    return (
        f"INSERT INTO ops(position, {_INSERTED}) SELECT base.p + v.column1, {columns}"
        f" FROM (SELECT {NEXT_POSITION} AS p) AS base, (VALUES {_rows(count, 10)}) AS v"
        " RETURNING name, position"
    )


@functools.lru_cache(maxsize=MANY)
def finish_many(count: int) -> str:
    """:data:`FINISH` of ``count`` operations (distinct names) in one statement: each row's
    parameters are name, error code, finish time, the bytes to append, owner (or None); it
    returns the name and what :data:`FINISH` returns of each one it finished."""
    return (
        "UPDATE ops SET done = 1, error_code = v.column2, done_time = v.column3, owner = NULL,"
        " request = NULL, data = CAST(ops.data || v.column4 AS BLOB)"
        f" FROM (VALUES {_rows(count, 5)}) AS v WHERE ops.name = v.column1 AND ops.done = 0"
        " AND (v.column5 IS NULL OR ops.owner = v.column5)"
        " RETURNING name, data, method, create_time, position, principal"
    )


_META_TABLES = (
    "CREATE TABLE owners (owner TEXT PRIMARY KEY, lease_until REAL NOT NULL)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
)

#: Schema 4 from nothing (a new file).
_CREATE = (
    _OPS_TABLE.format(table="ops"),
    *_OPS_INDEXES,
    *_META_TABLES,
    f"INSERT INTO meta(key, value) VALUES ('{POSITION_FLOOR}', 0)",
    _OPS_FLOOR_TRIGGER,
)

_COLUMNS = (
    "position, name, method, done, error_code, create_time, done_time, owner, request,"
    " request_key, request_hash, data, principal, lost"
)

# Forward migrations: _MIGRATIONS[n] takes a file from schema n to n + 1.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    0: (
        """CREATE TABLE ops (
            position INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL UNIQUE,
            method TEXT NOT NULL,
            done INTEGER NOT NULL DEFAULT 0,
            error_code INTEGER NOT NULL DEFAULT 0,
            create_time REAL NOT NULL,
            done_time REAL,
            owner TEXT,
            request BLOB,
            request_key TEXT,
            request_hash BLOB,
            data BLOB NOT NULL
        )""",
        "CREATE INDEX ops_expiry ON ops(done_time) WHERE done = 1",
        "CREATE INDEX ops_unfinished ON ops(owner) WHERE done = 0",
        "CREATE UNIQUE INDEX ops_request_key ON ops(request_key) WHERE request_key IS NOT NULL",
        "CREATE INDEX ops_done ON ops(done, position)",
        "CREATE INDEX ops_error ON ops(error_code, position)",
        "CREATE INDEX ops_method ON ops(method, position)",
        *_META_TABLES,
    ),
    # v2 (issue 9): who created each operation, and how often it lost its owner. Both columns
    # are added without rewriting the table; existing operations have no principal and no loss.
    1: (
        "ALTER TABLE ops ADD COLUMN principal TEXT",
        "ALTER TABLE ops ADD COLUMN lost INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX ops_principal ON ops(principal, position) WHERE principal IS NOT NULL",
    ),
    # v3 (issue 13, "schema v2" there): a lean write path. The table is rebuilt without
    # AUTOINCREMENT (its counter becomes the position floor), and loses the indexes on done and
    # method (a List walks positions, bounded by max_scan); the error-code index keeps failed
    # operations only. Rows, positions and the token key are copied as they are.
    2: (
        _OPS_TABLE.format(table="ops_v3"),
        f"INSERT INTO ops_v3({_COLUMNS}) SELECT {_COLUMNS} FROM ops",
        # The largest position ever given (AUTOINCREMENT's counter), so none is given again.
        f"INSERT OR REPLACE INTO meta(key, value) VALUES ('{POSITION_FLOOR}',"
        " max(ifnull((SELECT seq FROM sqlite_sequence WHERE name = 'ops'), 0),"
        " ifnull((SELECT max(position) FROM ops), 0)))",
        "DROP TABLE ops",  # and its indexes
        "ALTER TABLE ops_v3 RENAME TO ops",
        *_OPS_INDEXES,
        _OPS_TOP_TRIGGER,
    ),
    # v4 (issue 13): the position floor becomes the largest position ever deleted, so that List
    # knows where positions may have gaps, in its own snapshot, whichever process deleted. What
    # a schema 3 file deleted below its newest operation is not known: the mark starts at the
    # newest position (so gaps are assumed anywhere below it; new operations are above it).
    3: (
        "DROP TRIGGER IF EXISTS ops_top",
        f"UPDATE meta SET value = ({NEXT_POSITION}) - 1 WHERE key = '{POSITION_FLOOR}'",
        _OPS_FLOOR_TRIGGER,
    ),
}


def migrate(conn: sqlite3.Connection, path: str) -> None:
    """Bring the file open on ``conn`` to :data:`SCHEMA_VERSION`, inside the caller's write
    transaction (the caller commits, or rolls back on an exception).

    Raises:
        StoreOpenError: the file has a newer schema than this code knows.
    """
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreOpenError(
            f"{path!r} has lrofw schema version {version}, newer than this lrofw "
            f"knows ({SCHEMA_VERSION}); upgrade lrofw to open it"
        )
    if version == SCHEMA_VERSION:
        return
    fresh = (
        version == 0
        and not conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ops'"
        ).fetchone()
    )
    steps = [_CREATE] if fresh else [_MIGRATIONS[step] for step in range(version, SCHEMA_VERSION)]
    for statements in steps:
        for statement in statements:
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
