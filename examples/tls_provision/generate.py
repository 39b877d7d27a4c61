"""Regenerate the Python code for ``tls.proto``.

Usage (from anywhere)::

    python examples/tls_provision/generate.py           # rewrite tls_pb2.py, .pyi, _grpc.py
    python examples/tls_provision/generate.py --check   # exit 1 if the committed code is stale

``tls.proto`` imports ``google/longrunning/operations.proto``, which plain ``grpc_tools.protoc``
cannot find (googleapis-common-protos ships it under another name): the include paths come from
:mod:`lrofw.protoc`, as for ``python -m lrofw.protoc`` on a service of your own.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "tls.proto"
OUTPUTS = ("tls_pb2.py", "tls_pb2.pyi", "tls_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Runs protoc on ``tls.proto``, writing the three generated files into ``out_dir``."""
    from lrofw import protoc

    args = [
        f"--proto_path={HERE}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        PROTO,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("generate.py: protoc failed (see the messages above)")


def main(argv: list[str] | None = None) -> int:
    """Regenerates the code, or with ``--check`` reports whether the committed code is current."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temporary directory and exit 1 if the committed files differ",
    )
    args = parser.parse_args(argv)
    if not args.check:
        generate(HERE)
        print("wrote " + ", ".join(str(HERE / name) for name in OUTPUTS))
        return 0
    with tempfile.TemporaryDirectory(prefix="tls-gen-") as tmp:
        generate(Path(tmp))
        stale = [
            name
            for name in OUTPUTS
            if not (HERE / name).exists()
            or not filecmp.cmp(Path(tmp) / name, HERE / name, shallow=False)
        ]
    if stale:
        print("stale generated code: " + ", ".join(stale) + "; run generate.py", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
