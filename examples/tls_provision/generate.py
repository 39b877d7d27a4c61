"""Regenerate the Python code for ``tls.proto``.

Usage (from anywhere)::

    python examples/tls_provision/generate.py           # rewrite tls_pb2.py, .pyi, _grpc.py
    python examples/tls_provision/generate.py --check   # exit 1 if the committed code is stale

``tls.proto`` imports ``google/longrunning/operations.proto``. googleapis-common-protos ships that
file as ``google/longrunning/operations_proto.proto`` (while its compiled module registers itself
as ``google/longrunning/operations.proto`` and ``google.longrunning.operations_pb2`` re-exports
it), so protoc cannot find it under the name the import uses. This script lays out a temporary
include directory with the file under its canonical name, plus the ``google/api`` and
``google/rpc`` protos it imports, and runs ``grpc_tools.protoc`` on it. The well-known types
(``google/protobuf/*.proto``) come from grpc_tools itself.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "tls.proto"
OUTPUTS = ("tls_pb2.py", "tls_pb2.pyi", "tls_pb2_grpc.py")


def _package_dir(module: str) -> Path:
    """Returns the directory holding ``module`` (a module of googleapis-common-protos)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SystemExit(f"generate.py: cannot find {module}; install googleapis-common-protos")
    return Path(spec.origin).parent


def _lay_out_includes(include: Path) -> None:
    """Copies the googleapis protos ``tls.proto`` needs into ``include`` under canonical names."""
    for module, subdir in (
        ("google.api.annotations_pb2", "google/api"),
        ("google.rpc.status_pb2", "google/rpc"),
    ):
        target = include / subdir
        target.mkdir(parents=True, exist_ok=True)
        for proto in _package_dir(module).glob("*.proto"):
            shutil.copy2(proto, target / proto.name)
    longrunning = include / "google/longrunning"
    longrunning.mkdir(parents=True, exist_ok=True)
    shutil.copy2(
        _package_dir("google.longrunning.operations_proto_pb2") / "operations_proto.proto",
        longrunning / "operations.proto",
    )


def generate(out_dir: Path) -> None:
    """Runs protoc on ``tls.proto``, writing the three generated files into ``out_dir``."""
    # Imported here so that ``--help`` works without grpcio-tools.
    from grpc_tools import protoc  # type: ignore[import-untyped]

    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory(prefix="tls-protos-") as tmp:
        include = Path(tmp)
        _lay_out_includes(include)
        args = [
            "grpc_tools.protoc",
            f"--proto_path={HERE}",
            f"--proto_path={include}",
            f"--proto_path={well_known}",
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
