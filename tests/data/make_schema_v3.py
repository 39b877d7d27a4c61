"""Writes tests/data/schema_v3.sqlite: a SQLite store file at schema version 3.

It must run with schema 3's code (lrofw at commit ``b5e6d85``, before schema 4); it refuses to run
with any other. From the root of a checkout of that commit, with this folder's ``.py`` files
copied into its ``tests/data``::

    PYTHONPATH=.:examples/tls_provision python tests/data/make_schema_v3.py

The file is checkpointed and ``VACUUM``ed so that it is one file (no -wal, no -shm).
"""

from __future__ import annotations

import pathlib
import sys

from _fixture_file import NOW, M, add, finish_both, write
from google.rpc import status_pb2

from lrofw.stores import SQLiteStore

OUT = pathlib.Path(__file__).resolve().parent / "schema_v3.sqlite"


def fill(store: SQLiteStore) -> None:
    add(store, "operations/v3-ok", "done", NOW, method=M, principal="alice")
    add(store, "operations/v3-deleted", "", NOW + 1, method=M)
    add(store, "operations/v3-failed", "x", NOW + 2, method="/a.S/M", principal="bob")
    add(store, "operations/v3-running", "flashing", NOW + 3, method=M, owner="dead-owner",
        request=b"\x00request\xff")  # fmt: skip
    add(store, "operations/v3-newest", "queued", NOW + 4, method=M)
    error = status_pb2.Status(code=5, message="no such DUT")
    finish_both(store, "operations/v3-ok", "operations/v3-failed", error)
    # Not the newest: schema 3 kept no mark of it (its position floor stays 0).
    assert store.delete("operations/v3-deleted")


def main() -> int:
    return write(OUT, 3, "b5e6d85", fill)


if __name__ == "__main__":
    sys.exit(main())
