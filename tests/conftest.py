"""Shared test set-up: the example's generated code is importable as ``tls_pb2``."""

from __future__ import annotations

import pathlib
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "tls_provision"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))
