"""Stores: where operations live. Pick one by object or by URL.

Example:
    >>> from lrofw.stores import open_store
    >>> store = open_store("memory:")
"""

from __future__ import annotations

from .base import Record, Store
from .memory import MemoryStore

__all__ = ["MemoryStore", "Record", "Store", "open_store"]

_SCHEMES = ("memory:",)


def open_store(url: str) -> Store:
    """Open the store a URL names: the one place store URLs are parsed.

    Supported: ``memory:`` (in this process only).

    Raises:
        ValueError: the URL names no supported store; the message lists the supported forms.

    Example:
        >>> open_store("memory:")  # doctest: +ELLIPSIS
        <lrofw.stores.memory.MemoryStore object at ...>
    """
    if url == "memory:":
        return MemoryStore()
    raise ValueError(f"unsupported store URL {url!r}; supported: {', '.join(_SCHEMES)}")
