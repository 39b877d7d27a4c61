"""What the scripts that write this folder's schema files share (``make_schema_v*.py``).

The scripts run with an older lrofw's code: copy this folder's ``.py`` files into a checkout of
the commit a script names, and run the script there (its docstring says how).
"""

from __future__ import annotations

import os
import pathlib
import sqlite3
import sys
from collections.abc import Callable

import tls_pb2
from google.longrunning import operations_proto_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2

from lrofw.stores import NewOperation, SQLiteStore
from lrofw.stores import sqlite as sqlite_module

NOW = 1_700_000_000.0
M = "/chromiumos.config.api.test.tls.Common/ProvisionDut"


def packed(message: object) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)  # type: ignore[arg-type]
    return out


def add(store: SQLiteStore, name: str, stage: str, at: float, **new: object) -> None:
    """Insert operation ``name`` with ProvisionDutMetadata(stage=``stage``) (none if empty)."""
    op = operations_proto_pb2.Operation(name=name)
    if stage:
        op.metadata.CopyFrom(packed(tls_pb2.ProvisionDutMetadata(stage=stage)))
    store.insert(op, at, NewOperation(**new))  # type: ignore[arg-type]


def finish_both(store: SQLiteStore, ok: str, failed: str, error: status_pb2.Status) -> None:
    """Finish ``ok`` at NOW + 10 with ProvisionDutResponse(installed_image="img-1"), and
    ``failed`` at NOW + 11 with ``error``."""
    response = packed(tls_pb2.ProvisionDutResponse(installed_image="img-1"))
    assert store.finish(ok, NOW + 10, response=response) is not None
    assert store.finish(failed, NOW + 11, error=error) is not None


def write(out: pathlib.Path, version: int, commit: str, fill: Callable[[SQLiteStore], None]) -> int:
    """Write ``out`` anew with ``fill`` on a store of schema ``version`` (refused with any other
    schema's code: lrofw at ``commit``), then make it one file (no -wal, no -shm)."""
    if version != sqlite_module.SCHEMA_VERSION:
        print(f"run this with schema {version}'s code (lrofw at commit {commit})", file=sys.stderr)
        return 1
    for suffix in ("", "-wal", "-shm"):
        path = pathlib.Path(f"{out}{suffix}")
        if path.exists():
            path.unlink()
    store = SQLiteStore(out)
    try:
        fill(store)
    finally:
        store.close()
    conn = sqlite3.connect(out)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode = DELETE")  # one file: no -wal, no -shm
        conn.execute("VACUUM")
    finally:
        conn.close()
    print(f"wrote {out} ({os.path.getsize(out)} bytes)")
    return 0
