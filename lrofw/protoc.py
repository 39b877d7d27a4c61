"""``python -m lrofw.protoc``: grpcio-tools' protoc, with ``google/longrunning/operations.proto``
importable.

A service whose methods return ``google.longrunning.Operation`` imports
``google/longrunning/operations.proto``. googleapis-common-protos ships that file as
``google/longrunning/operations_proto.proto`` (its compiled module registers itself under the
canonical name), so plain ``python -m grpc_tools.protoc`` fails with ``File not found``. This
command lays out a temporary include directory with the file under its canonical name, plus the
``google/api`` and ``google/rpc`` protos it imports and grpcio-tools' well-known types, and runs
protoc with your arguments after those include paths.

Needs grpcio-tools: ``pip install 'lrofw[protoc]'``.

Example::

    python -m lrofw.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. my_service.proto
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["includes", "main"]

#: The googleapis-common-protos modules whose protos are laid out, and where.
_GOOGLEAPIS = (
    ("google.api.annotations_pb2", "google/api"),
    ("google.rpc.status_pb2", "google/rpc"),
)


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SystemExit(f"lrofw.protoc: cannot find {module}; install googleapis-common-protos")
    return Path(spec.origin).parent


def _protoc() -> object:
    try:
        from grpc_tools import protoc  # type: ignore[import-untyped]
    except ImportError:
        raise SystemExit(
            "lrofw.protoc: grpcio-tools is not installed; pip install 'lrofw[protoc]'"
        ) from None
    return protoc


@contextmanager
def includes() -> Iterator[list[str]]:
    """The ``--proto_path`` arguments that make ``import "google/longrunning/operations.proto"``
    (and the googleapis and well-known protos it imports) work, valid inside the block.

    Example:
        >>> with includes() as paths:
        ...     protoc.main(["protoc", *paths, "-I.", "--python_out=.", "my.proto"])
    """
    protoc = _protoc()
    well_known = Path(str(protoc.__file__)).resolve().parent / "_proto"  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory(prefix="lrofw-protos-") as tmp:
        include = Path(tmp)
        for module, subdir in _GOOGLEAPIS:
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
        yield [f"--proto_path={include}", f"--proto_path={well_known}"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run protoc with ``argv`` (protoc's own arguments) and the include paths; protoc's exit
    code (1 when it reported errors, 2 when grpcio-tools is missing).

    Example:
        >>> main(["-I.", "--python_out=out", "my_service.proto"])
        0
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    try:
        protoc = _protoc()
        with includes() as paths:
            # Your include paths first: your files win over the laid-out copies.
            return int(protoc.main(["protoc", *args, *paths]))  # type: ignore[attr-defined]
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
