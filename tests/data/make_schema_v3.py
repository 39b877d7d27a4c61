"""Writes tests/data/schema_v3.sqlite: a SQLite store file at schema version 3.

It must run with schema 3's code (lrofw at commit ``b5e6d85``, before schema 4); it refuses to run
with any other. From the repository root, at that commit::

    PYTHONPATH=.:examples/tls_provision python tests/data/make_schema_v3.py

The file is checkpointed and ``VACUUM``ed so that it is one file (no -wal, no -shm).
"""

from __future__ import annotations

import os
import pathlib
import sqlite3
import sys

import tls_pb2
from google.longrunning import operations_proto_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2

from lrofw.stores import NewOperation, SQLiteStore
from lrofw.stores import sqlite as sqlite_module

NOW = 1_700_000_000.0
M = "/chromiumos.config.api.test.tls.Common/ProvisionDut"
OUT = pathlib.Path(__file__).resolve().parent / "schema_v3.sqlite"


def packed(message: object) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)  # type: ignore[arg-type]
    return out


def add(store: SQLiteStore, name: str, stage: str, at: float, **new: object) -> None:
    op = operations_proto_pb2.Operation(name=name)
    if stage:
        op.metadata.CopyFrom(packed(tls_pb2.ProvisionDutMetadata(stage=stage)))
    store.insert(op, at, NewOperation(**new))  # type: ignore[arg-type]


def main() -> int:
    if sqlite_module.SCHEMA_VERSION != 3:
        print("run this with schema 3's code (lrofw at commit b5e6d85)", file=sys.stderr)
        return 1
    for suffix in ("", "-wal", "-shm"):
        path = pathlib.Path(f"{OUT}{suffix}")
        if path.exists():
            path.unlink()
    store = SQLiteStore(OUT)
    try:
        add(store, "operations/v3-ok", "done", NOW, method=M, principal="alice")
        add(store, "operations/v3-deleted", "", NOW + 1, method=M)
        add(store, "operations/v3-failed", "x", NOW + 2, method="/a.S/M", principal="bob")
        add(store, "operations/v3-running", "flashing", NOW + 3, method=M, owner="dead-owner",
            request=b"\x00request\xff")  # fmt: skip
        add(store, "operations/v3-newest", "queued", NOW + 4, method=M)
        done = store.finish(
            "operations/v3-ok", NOW + 10,
            response=packed(tls_pb2.ProvisionDutResponse(installed_image="img-1")),
        )  # fmt: skip
        failed = store.finish(
            "operations/v3-failed", NOW + 11, error=status_pb2.Status(code=5, message="no such DUT")
        )
        assert done is not None and failed is not None
        # Not the newest: schema 3 kept no mark of it (its position floor stays 0).
        assert store.delete("operations/v3-deleted")
    finally:
        store.close()
    conn = sqlite3.connect(OUT)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode = DELETE")  # one file: no -wal, no -shm
        conn.execute("VACUUM")
    finally:
        conn.close()
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
