"""Stores: where operations live. Pick one by object or by URL.

``PostgresStore`` needs the ``postgres`` extra (``pip install 'lrofw[postgres]'``); it is imported
on first use, so lrofw without the extra never imports psycopg.

Example:
    >>> from lrofw.stores import open_store
    >>> store = open_store("sqlite:ops.db")
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Any

from .. import _check
from .base import (
    DuplicateRequest,
    NewOperation,
    Orphan,
    Record,
    Store,
    StoreCorrupted,
    StoreError,
    StoreOpenError,
    StoreUnavailable,
)
from .memory import MemoryStore
from .sqlite import SQLiteStore

if TYPE_CHECKING:
    from .postgres import PostgresStore

__all__ = [
    "DuplicateRequest",
    "MemoryStore",
    "NewOperation",
    "Orphan",
    "PostgresStore",
    "Record",
    "SQLiteStore",
    "Store",
    "StoreCorrupted",
    "StoreError",
    "StoreOpenError",
    "StoreUnavailable",
    "open_store",
]

#: The URL forms :func:`open_store` understands.
URL_FORMS = ("memory:", "sqlite:PATH", "postgresql://USER@HOST:PORT/DB?schema=NAME")


def __getattr__(name: str) -> Any:
    # PostgresStore is imported when first asked for: psycopg is an optional dependency.
    if name == "PostgresStore":
        try:
            from .postgres import PostgresStore
        except ImportError as exc:
            raise ImportError(
                f"lrofw.stores.PostgresStore needs psycopg and psycopg-pool ({exc}); install "
                "them with: pip install 'lrofw[postgres]'"
            ) from exc
        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _postgres(url: str) -> Store:
    """A PostgresStore for a ``postgresql://`` (or ``postgres://``) URL: lrofw's own ``schema``
    parameter is taken out, the rest is passed to libpq as it is."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for key, value in query if key == "schema"]
    if len(schemas) > 1:
        raise ValueError(f"store URL {url!r} names more than one schema")
    rest = urllib.parse.urlencode([(k, v) for k, v in query if k != "schema"])
    dsn = urllib.parse.urlunsplit(parts._replace(query=rest))
    store: Store = __getattr__("PostgresStore")(dsn, **({"schema": schemas[0]} if schemas else {}))
    return store


def open_store(url: str) -> Store:
    """Open the store a URL names: the one place store URLs are parsed.

    - ``memory:`` keeps operations in this process only.
    - ``sqlite:PATH`` keeps them in the SQLite file at ``PATH`` (relative to the working
      directory, or absolute: ``sqlite:/var/lib/app/ops.db``), created if missing.
    - ``postgresql://USER@HOST:PORT/DB?schema=NAME`` (or ``postgres://``) keeps them in schema
      ``NAME`` (default ``lrofw``) of a PostgreSQL database (:class:`PostgresStore`, the
      ``postgres`` extra). Every other part of the URL is libpq's (``sslmode=``, say).

    Raises:
        TypeError: ``url`` is not a str.
        ValueError: the URL names no supported store; the message lists the supported forms.
        StoreOpenError: the store it names cannot be opened; the message says why.

    Example:
        >>> open_store("memory:")  # doctest: +ELLIPSIS
        <lrofw.stores.memory.MemoryStore object at ...>
    """
    if not isinstance(url, str):
        raise TypeError(
            f"url must be a str such as 'sqlite:ops.db' or 'memory:', got {_check.shown(url)}"
        )
    if url == "memory:":
        return MemoryStore()
    scheme, _, rest = url.partition(":")
    if scheme == "sqlite" and rest and (rest.startswith("///") or not rest.startswith("//")):
        return SQLiteStore(rest.removeprefix("//") if rest.startswith("///") else rest)
    if scheme in ("postgresql", "postgres") and rest.startswith("//"):
        return _postgres(url)
    raise ValueError(f"unsupported store URL {url!r}; supported: {', '.join(URL_FORMS)}")
