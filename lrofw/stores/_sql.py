"""Compile a parsed listing filter (:mod:`lrofw.listing`) to a SQL condition, for SQL stores."""

from __future__ import annotations

import functools

from ..listing import And, Comparison, MatchAll, Node, Not, Or

#: Filter field -> column. Field and operator are checked by ``Comparison`` itself, and only
#: these fixed strings reach the query text; values always travel as parameters.
COLUMNS = {"done": "done", "error.code": "error_code", "method": "method", "name": "name"}
_OPS = {"=": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


@functools.lru_cache(maxsize=256)
def compiled(node: Node, placeholder: str = "?") -> tuple[str, tuple[object, ...]]:
    """:func:`where`, remembered for the last 256 filters (a client paging through a list sends
    the same one with every page)."""
    condition, params = where(node, placeholder)
    return condition, tuple(params)


def where(node: Node, placeholder: str = "?") -> tuple[str, list[object]]:
    """``(condition, parameters)`` for ``node``; ``placeholder`` is the driver's marker.

    Example:
        >>> where(parse_filter("done = true AND error.code != 0"))
        ('(done = ? AND error_code <> ?)', [1, 0])
    """
    params: list[object] = []

    def compile_(n: Node) -> str:
        if isinstance(n, MatchAll):
            return "1 = 1"
        if isinstance(n, Comparison):
            value = n.value
            if isinstance(value, bool):
                value = int(value)
            params.append(value)
            return f"{COLUMNS[n.field]} {_OPS[n.op]} {placeholder}"
        if isinstance(n, Not):
            return f"NOT ({compile_(n.term)})"
        if isinstance(n, (And, Or)):
            if not n.terms:
                return "1 = 1" if isinstance(n, And) else "1 = 0"
            joiner = " AND " if isinstance(n, And) else " OR "
            return "(" + joiner.join(compile_(t) for t in n.terms) + ")"
        raise TypeError(f"not a filter node: {n!r}")

    return compile_(node), params
