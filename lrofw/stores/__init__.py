"""Stores: where operations live. Pick one by object or by URL.

Example:
    >>> from lrofw.stores import open_store
    >>> store = open_store("sqlite:ops.db")
"""

from __future__ import annotations

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

__all__ = [
    "DuplicateRequest",
    "MemoryStore",
    "NewOperation",
    "Orphan",
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
URL_FORMS = ("memory:", "sqlite:PATH")


def open_store(url: str) -> Store:
    """Open the store a URL names: the one place store URLs are parsed.

    - ``memory:`` keeps operations in this process only.
    - ``sqlite:PATH`` keeps them in the SQLite file at ``PATH`` (relative to the working
      directory, or absolute: ``sqlite:/var/lib/app/ops.db``), created if missing.

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
    raise ValueError(f"unsupported store URL {url!r}; supported: {', '.join(URL_FORMS)}")
