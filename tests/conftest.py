"""Shared test set-up: the example's generated code is importable as ``tls_pb2``."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Iterator

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "tls_provision"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))


@pytest.fixture(scope="session", autouse=True)
def _drop_postgres_schemas() -> Iterator[None]:
    """At the end of the run, drop the PostgreSQL schemas its tests created (tests/pgschemas.py)."""
    yield
    if "pgschemas" in sys.modules:
        sys.modules["pgschemas"].drop_schemas()
