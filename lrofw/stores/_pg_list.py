"""The PostgreSQL store's listing: one page of a bounded, filtered, newest-first scan."""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Any

import psycopg

from ..listing import And, Comparison, MatchAll, Node, Not, Or
from . import _sql
from .base import Operation, Record

Connection = psycopg.Connection[tuple[Any, ...]]
Read = Callable[[Connection], tuple[builtins.list[Record], int | None]]

#: The columns a Record is made of, in :func:`record`'s order.
RECORD = "data, method, create_time, done_time, position, principal"


def record(row: tuple[Any, ...]) -> Record:
    """A Record from a row of :data:`RECORD`'s columns."""
    return Record(Operation.FromString(row[0]), row[1], row[2], row[3], row[4], row[5])


def _without_nul(node: Node) -> Node:
    """``node`` with each comparison to a value holding NUL replaced by its known outcome: no
    stored name or method holds one (``=`` is never true, ``!=`` always)."""
    if isinstance(node, Comparison):
        if not isinstance(node.value, str) or "\x00" not in node.value:
            return node
        if node.op == "=":
            return Or(())
        if node.op == "!=":
            return MatchAll()
        raise ValueError(f"unsupported comparison {node}")
    if isinstance(node, Not):
        return Not(_without_nul(node.term))
    if isinstance(node, (And, Or)):
        return type(node)(tuple(_without_nul(t) for t in node.terms))
    return node


def reader(
    s: str,
    where: Node,
    before: int | None,
    limit: int,
    *,
    principal: str | None = None,
    max_scan: int | None = None,
    max_bytes: int | None = None,
) -> Read | None:
    """What reads a page of ``Store.list`` in schema ``s`` (quoted), given a connection;
    None when nothing can match (a principal with a NUL character)."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if max_scan is not None and max_scan < 1:
        raise ValueError(f"max_scan must be at least 1, got {max_scan}")
    if principal is not None and "\x00" in principal:
        return None
    condition, params = _sql.compiled(_without_nul(where), "%s")
    # The records examined: the positions below the cursor (of one principal: its index).
    scope = "position < %s"
    scoped: builtins.list[object] = [2**63 - 1 if before is None else before]
    if principal is not None:
        scope, scoped = "principal = %s AND " + scope, [principal, *scoped]
    matching = f"FROM {s}.ops WHERE {scope} AND position >= %s AND {condition}"

    def page(conn: Connection, edge: int | None) -> tuple[builtins.list[Record], bool]:
        args = (*scoped, 0 if edge is None else edge, *params, limit + 1)
        if max_bytes is None:
            rows = conn.execute(
                f"SELECT {RECORD} {matching} ORDER BY position DESC LIMIT %s", args
            ).fetchall()
            return [record(r) for r in rows[:limit]], len(rows) > limit
        # A page of large operations is never fetched whole: the running size decides in
        # the server which rows are sent (at least one), and whether any were left over.
        rows = conn.execute(
            "SELECT CASE WHEN rn <= %s AND (rn = 1 OR running <= %s) THEN data END,"
            " method, create_time, done_time, position, principal FROM ("
            f" SELECT {RECORD}, octet_length(data) AS size,"
            " row_number() OVER w AS rn, sum(octet_length(data)) OVER w AS running"
            f" {matching} WINDOW w AS (ORDER BY position DESC)"
            " ORDER BY position DESC LIMIT %s) AS p"
            " WHERE rn <= 2 OR running - size <= %s ORDER BY position DESC",
            (limit, max_bytes, *args, max_bytes),
        ).fetchall()
        records = [record(r) for r in rows if r[0] is not None]
        return records, len(records) < len(rows)

    def run(conn: Connection) -> tuple[builtins.list[Record], int | None]:
        edge = None  # the last position a bounded scan may examine
        if max_scan is not None:
            row = conn.execute(
                f"SELECT position FROM {s}.ops WHERE {scope}"
                " ORDER BY position DESC LIMIT 1 OFFSET %s",
                (*scoped, max_scan - 1),
            ).fetchone()
            edge = None if row is None else row[0]
        records, cut = page(conn, edge)
        if cut:
            return records, records[-1].position
        return records, edge  # the scan ended at its bound (go on below), or at the end

    def snapshot(conn: Connection) -> tuple[builtins.list[Record], int | None]:
        with conn.transaction():  # both statements see the store at one time
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            return run(conn)

    return run if max_scan is None else snapshot
