"""Writes tests/data/schema_v2.sqlite: a SQLite store file at schema version 2.

It must run with schema 2's code (lrofw at commit ``8ac39ac``, before schema 3); it refuses to run
with any other. From the root of a checkout of that commit, with this folder's ``.py`` files
copied into its ``tests/data``::

    PYTHONPATH=.:examples/tls_provision python tests/data/make_schema_v2.py

The file is checkpointed and ``VACUUM``ed so that it is one file (no -wal, no -shm).
"""

from __future__ import annotations

import hashlib
import pathlib
import sys

import tls_pb2
from _fixture_file import NOW, M, add, finish_both, packed, write
from google.rpc import status_pb2

from lrofw.stores import SQLiteStore

OUT = pathlib.Path(__file__).resolve().parent / "schema_v2.sqlite"
#: The request that created operations/v2-ok, with its AIP-155 request id.
REQUEST = tls_pb2.ProvisionDutRequest(name="dut", image_path="img-1", request_id="id-1")
#: Its idempotency key as the manager makes it for principal "alice" (manager._new_for).
KEY = hashlib.sha256(b"alice").hexdigest() + f":{M}\nid-1"


def fill(store: SQLiteStore) -> None:
    add(store, "operations/v2-running", "flashing", NOW, method=M, owner="dead-owner",
        request=b"\x00request\xff", principal="alice")  # fmt: skip
    add(store, "operations/v2-ok", "done", NOW + 1, method=M, request_key=KEY,
        request_hash=hashlib.sha256(REQUEST.SerializeToString(deterministic=True)).digest(),
        principal="alice")  # fmt: skip
    add(store, "operations/v2-failed", "x", NOW + 2, method="/a.S/M", principal="bob")
    add(store, "operations/v2-deleted", "", NOW + 3, method=M)
    add(store, "operations/v2-unowned", "queued", NOW + 4, method="")
    add(store, "operations/v2-claimed", "", NOW + 5, method=M, owner="dead-owner",
        request=b"resumable")  # fmt: skip
    add(store, "operations/v2-newest", "", NOW + 6, method=M)
    details = [packed(tls_pb2.ProvisionDutMetadata(stage="gone"))]
    error = status_pb2.Status(code=5, message="no such DUT", details=details)
    finish_both(store, "operations/v2-ok", "operations/v2-failed", error)
    assert store.delete("operations/v2-deleted")
    assert store.delete("operations/v2-newest")  # the newest position (7) is never reused
    assert store.claim("operations/v2-claimed", "dead-owner", "live-owner")  # lost = 1
    assert store.set_metadata(
        "operations/v2-claimed", packed(tls_pb2.ProvisionDutMetadata(stage="verifying"))
    )
    store.renew("live-owner", NOW + 100)


def main() -> int:
    return write(OUT, 2, "8ac39ac", fill)


if __name__ == "__main__":
    sys.exit(main())
