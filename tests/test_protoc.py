"""python -m lrofw.protoc: a service of one's own that imports google/longrunning/operations.proto
compiles, and its generated code carries the operation_info lrofw reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}

PROTO = """\
syntax = "proto3";
package demo.v1;
import "google/longrunning/operations.proto";
service Builder {
  rpc Build(BuildRequest) returns (google.longrunning.Operation) {
    option (google.longrunning.operation_info) = {
      response_type: "BuildResponse"
      metadata_type: "BuildMetadata"
    };
  }
}
message BuildRequest { string target = 1; }
message BuildResponse { string artifact = 1; }
message BuildMetadata { int32 percent = 1; }
"""


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Runs ``python ARGS`` in ``cwd``, capturing its output."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120
    )


def test_plain_protoc_cannot_find_operations_proto(tmp_path: Path) -> None:
    """The failure users meet: grpc_tools.protoc alone does not know the file's canonical name."""
    (tmp_path / "builder.proto").write_text(PROTO)
    result = run("-m", "grpc_tools.protoc", "-I.", "--python_out=.", "builder.proto", cwd=tmp_path)
    assert result.returncode != 0
    assert "google/longrunning/operations.proto: File not found" in result.stdout + result.stderr


def test_lrofw_protoc_compiles_a_service_that_returns_operations(tmp_path: Path) -> None:
    """python -m lrofw.protoc compiles it; the generated module imports and declares the
    method's operation_info."""
    (tmp_path / "builder.proto").write_text(PROTO)
    result = run(
        "-m", "lrofw.protoc", "-I.", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.",
        "builder.proto", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert {"builder_pb2.py", "builder_pb2.pyi", "builder_pb2_grpc.py"} <= {
        p.name for p in tmp_path.iterdir()
    }
    check = run(
        "-c",
        "import builder_pb2, builder_pb2_grpc\n"
        "from google.longrunning import operations_pb2\n"
        "m = builder_pb2.DESCRIPTOR.services_by_name['Builder'].methods_by_name['Build']\n"
        "info = m.GetOptions().Extensions[operations_pb2.operation_info]\n"
        "print(info.response_type, info.metadata_type, m.output_type.full_name)",
        cwd=tmp_path,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.split() == [
        "BuildResponse",
        "BuildMetadata",
        "google.longrunning.Operation",
    ]


def test_lrofw_protoc_reports_protoc_errors_without_a_traceback(tmp_path: Path) -> None:
    """A missing file is protoc's own error and a non-zero exit, not a Python traceback."""
    result = run("-m", "lrofw.protoc", "-I.", "--python_out=.", "missing.proto", cwd=tmp_path)
    assert result.returncode != 0
    assert "missing.proto" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_lrofw_protoc_help_says_what_it_is(tmp_path: Path) -> None:
    """--help prints the command's own page (and exits 0)."""
    result = run("-m", "lrofw.protoc", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "google/longrunning/operations.proto" in result.stdout
