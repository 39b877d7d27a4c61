"""@long_running without types: they come from the RPC's google.longrunning.operation_info, read
from real generated code (protos compiled here with ``python -m lrofw.protoc``); types that are
given must agree with the proto, checked at registration."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import grpc
import pytest
import tls_pb2
import tls_pb2_grpc
from google.protobuf import any_pb2

import lrofw
from lrofw import decorator, registration
from lrofw.testing import serve

ROOT = Path(__file__).resolve().parent.parent
LONG = 30.0  # seconds to wait for something that should happen at once; reached only on failure
PACKAGE = "lrofw_opinfo_test"  # unique: generated modules and descriptors stay for the session

COMMON = f"""\
syntax = "proto3";
package {PACKAGE}.common;
message Artifact {{ string uri = 1; }}
message Progress {{ int32 percent = 1; }}
"""

BUILDS = f"""\
syntax = "proto3";
package {PACKAGE}.builds;
import "google/longrunning/operations.proto";
import "{PACKAGE}/common.proto";
service Builder {{
  rpc Build(BuildRequest) returns (google.longrunning.Operation) {{
    option (google.longrunning.operation_info) = {{
      response_type: "BuildResponse" metadata_type: "BuildMetadata" }};
  }}
  rpc Qualified(BuildRequest) returns (google.longrunning.Operation) {{
    option (google.longrunning.operation_info) = {{
      response_type: "{PACKAGE}.builds.BuildResponse"
      metadata_type: ".{PACKAGE}.builds.BuildMetadata" }};
  }}
  rpc Foreign(BuildRequest) returns (google.longrunning.Operation) {{
    option (google.longrunning.operation_info) = {{
      response_type: "{PACKAGE}.common.Artifact" metadata_type: "common.Progress" }};
  }}
  rpc ResponseOnly(BuildRequest) returns (google.longrunning.Operation) {{
    option (google.longrunning.operation_info) = {{ response_type: "BuildResponse" }};
  }}
  rpc Bare(BuildRequest) returns (google.longrunning.Operation);
  rpc Misnamed(BuildRequest) returns (google.longrunning.Operation) {{
    option (google.longrunning.operation_info) = {{
      response_type: "NoSuchResponse" metadata_type: "BuildMetadata" }};
  }}
  rpc Plain(BuildRequest) returns (BuildResponse);
}}
message BuildRequest {{ string target = 1; }}
message BuildResponse {{ string artifact = 1; }}
message BuildMetadata {{ int32 percent = 1; }}
"""

# A second service called Builder, whose generated _grpc module also imports builds_pb2 (for the
# request type), which has a Builder too: the full name the generated code registers decides.
V2 = f"""\
syntax = "proto3";
package {PACKAGE}.v2;
import "google/longrunning/operations.proto";
import "{PACKAGE}/builds.proto";
service Builder {{
  rpc Build({PACKAGE}.builds.BuildRequest) returns (google.longrunning.Operation) {{
    option (google.longrunning.operation_info) = {{
      response_type: "Result" metadata_type: "{PACKAGE}.builds.BuildMetadata" }};
  }}
}}
message Result {{ string artifact = 1; }}
"""


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """The three protos, compiled with python -m lrofw.protoc and imported."""
    src = tmp_path_factory.mktemp("protos")
    out = tmp_path_factory.mktemp("generated")
    files = {"common.proto": COMMON, "builds.proto": BUILDS, "v2.proto": V2}
    (src / PACKAGE).mkdir()
    for name, text in files.items():
        (src / PACKAGE / name).write_text(text)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "lrofw.protoc", f"-I{src}", f"--python_out={out}",
         f"--grpc_python_out={out}", *(f"{PACKAGE}/{name}" for name in files)],
        cwd=src, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    sys.path.insert(0, str(out))
    try:

        def load(name: str) -> ModuleType:
            return importlib.import_module(f"{PACKAGE}.{name}")

        yield SimpleNamespace(
            common=load("common_pb2"),
            builds=load("builds_pb2"),
            builds_grpc=load("builds_pb2_grpc"),
            v2=load("v2_pb2"),
            v2_grpc=load("v2_pb2_grpc"),
        )
    finally:
        sys.path.remove(str(out))


def builder(gen: SimpleNamespace, method: str, *args: Any, **options: Any) -> Any:
    """A Builder servicer whose ``method`` is ``@long_running(*args, **options)`` and returns a
    BuildResponse after reporting BuildMetadata(percent=50)."""

    def body(self: Any, request: Any, op: lrofw.OperationContext) -> Any:
        op.report(gen.builds.BuildMetadata(percent=50))
        return gen.builds.BuildResponse(artifact=f"built {request.target}")

    body.__name__ = method
    cls = type("Builds", (gen.builds_grpc.BuilderServicer,), {method: body})
    setattr(cls, method, lrofw.long_running(*args, **options)(body))
    return cls()


def registered(servicer: object) -> None:
    """Registers ``servicer`` on a server that is never started (registration checks only)."""
    with ThreadPoolExecutor(1) as pool, lrofw.Manager() as manager:
        lrofw.add_servicer_to_server(servicer, grpc.server(pool), manager=manager)


def unpacked(message: any_pb2.Any, cls: type[Any]) -> Any:
    """``message`` unpacked as ``cls`` (asserting it is one)."""
    value = cls()
    assert message.Unpack(value), f"{message.type_url} is not a {cls.DESCRIPTOR.full_name}"
    return value


# --- no types: read from the proto, end to end ------------------------------------------------


@pytest.mark.parametrize(
    ("aio", "asynchronous"), [(False, False), (True, False), (True, True)],
    ids=["sync", "aio", "aio-async-def"],
)  # fmt: skip
def test_no_types_round_trip(gen: SimpleNamespace, aio: bool, asynchronous: bool) -> None:
    """@long_running() on Build: the op carries the proto's response and metadata types, and the
    runner holds them (a wrong return is INTERNAL naming the proto's response type)."""
    refused: list[str] = []

    def body(request: Any, op: lrofw.OperationContext | lrofw.AsyncOperationContext) -> Any:
        try:
            op.report(gen.common.Progress(percent=1))  # not the proto's metadata type
        except TypeError as exc:
            refused.append(str(exc))
        op.report(gen.builds.BuildMetadata(percent=50))
        if request.target == "wrong":
            return gen.common.Artifact(uri="not a BuildResponse")
        return gen.builds.BuildResponse(artifact=f"built {request.target}")

    class Builds(gen.builds_grpc.BuilderServicer):  # type: ignore[name-defined,misc]
        @lrofw.long_running()
        def Build(self, request: Any, op: lrofw.OperationContext) -> Any:
            return body(request, op)

    class AsyncBuilds(gen.builds_grpc.BuilderServicer):  # type: ignore[name-defined,misc]
        @lrofw.long_running()
        async def Build(self, request: Any, op: lrofw.AsyncOperationContext) -> Any:
            return body(request, op)

    servicer = AsyncBuilds() if asynchronous else Builds()
    with serve(servicer, aio=aio) as srv:
        stub = gen.builds_grpc.BuilderStub(srv.channel)
        op = lrofw.wait(srv.channel, stub.Build(gen.builds.BuildRequest(target="x")).name,
                        timeout=LONG)  # fmt: skip
        assert op.done and not op.HasField("error"), op
        assert unpacked(op.response, gen.builds.BuildResponse).artifact == "built x"
        assert unpacked(op.metadata, gen.builds.BuildMetadata).percent == 50
        bad = lrofw.wait(srv.channel, stub.Build(gen.builds.BuildRequest(target="wrong")).name,
                         timeout=LONG)  # fmt: skip
    assert bad.error.code == grpc.StatusCode.INTERNAL.value[0]
    assert f"expected {PACKAGE}.builds.BuildResponse" in bad.error.message
    assert refused and f"{PACKAGE}.builds.BuildMetadata" in refused[0]


def test_types_of_reads_the_proto_without_registration(gen: SimpleNamespace) -> None:
    """types_of(bound method) resolves as registration does, for an unregistered servicer."""
    types = registration.types_of(builder(gen, "Build").Build)
    assert types.response_type is gen.builds.BuildResponse
    assert types.metadata_type is gen.builds.BuildMetadata


@pytest.mark.parametrize(
    ("method", "response", "metadata"),
    [
        ("Build", "builds.BuildResponse", "builds.BuildMetadata"),  # unqualified
        ("Qualified", "builds.BuildResponse", "builds.BuildMetadata"),  # qualified, .absolute
        ("Foreign", "common.Artifact", "common.Progress"),  # another package; partly qualified
        ("ResponseOnly", "builds.BuildResponse", None),  # no metadata_type: any message
    ],
)
def test_names_resolve_as_protoc_does(
    gen: SimpleNamespace, method: str, response: str, metadata: str | None
) -> None:
    """Unqualified, qualified, absolute and other-package names resolve to the generated classes."""

    def cls(path: str | None) -> Any:
        if path is None:
            return None
        module, name = path.split(".")
        return getattr(getattr(gen, module), name)

    servicer = builder(gen, method)
    registered(servicer)
    types = registration.types_of(getattr(servicer, method))
    assert (types.response_type, types.metadata_type) == (cls(response), cls(metadata))


def test_a_type_from_another_package_round_trip(gen: SimpleNamespace) -> None:
    """Foreign's types live in the imported common.proto; the op carries them."""

    class Builds(gen.builds_grpc.BuilderServicer):  # type: ignore[name-defined,misc]
        @lrofw.long_running()
        def Foreign(self, request: Any, op: lrofw.OperationContext) -> Any:
            op.report(gen.common.Progress(percent=7))
            return gen.common.Artifact(uri=request.target)

    with serve(Builds()) as srv:
        stub = gen.builds_grpc.BuilderStub(srv.channel)
        created = stub.Foreign(gen.builds.BuildRequest(target="gs://x"))
        op = lrofw.wait(srv.channel, created.name, timeout=LONG)
    assert unpacked(op.response, gen.common.Artifact).uri == "gs://x"
    assert unpacked(op.metadata, gen.common.Progress).percent == 7


def test_same_short_service_name_in_an_imported_file(gen: SimpleNamespace) -> None:
    """v2.Builder's _grpc module also imports builds_pb2 (with its own Builder): lrofw takes the
    service the generated code registers, so the types and the operation's method are v2's."""

    class V2(gen.v2_grpc.BuilderServicer):  # type: ignore[name-defined,misc]
        @lrofw.long_running()
        def Build(self, request: Any, op: lrofw.OperationContext) -> Any:
            return gen.v2.Result(artifact=request.target)

    servicer = V2()
    types = registration.types_of(servicer.Build)
    assert (types.response_type, types.metadata_type) == (gen.v2.Result, gen.builds.BuildMetadata)
    with serve(servicer) as srv:
        stub = gen.v2_grpc.BuilderStub(srv.channel)
        created = stub.Build(gen.builds.BuildRequest(target="t"))
        op = lrofw.wait(srv.channel, created.name, timeout=LONG)
        listed, _ = srv.manager.list(filter=f'method = "/{PACKAGE}.v2.Builder/Build"')
    assert unpacked(op.response, gen.v2.Result).artifact == "t"
    assert [o.name for o in listed] == [op.name]


# --- explicit types: checked against the proto ------------------------------------------------


def test_matching_explicit_types_are_accepted(gen: SimpleNamespace) -> None:
    """Types that agree with operation_info register; a type left out comes from the proto."""
    both = builder(gen, "Build", gen.builds.BuildResponse, metadata_type=gen.builds.BuildMetadata)
    registered(both)
    response_only = builder(gen, "Build", gen.builds.BuildResponse)
    registered(response_only)
    assert registration.types_of(response_only.Build).metadata_type is gen.builds.BuildMetadata
    metadata_only = builder(gen, "Build", metadata_type=gen.builds.BuildMetadata)
    assert registration.types_of(metadata_only.Build).response_type is gen.builds.BuildResponse


def test_a_mismatched_response_type_is_a_type_error_at_registration(gen: SimpleNamespace) -> None:
    """The message names the method, both types and the fix; nothing is registered."""
    servicer = builder(gen, "Build", gen.common.Artifact)  # decorating is fine: no proto yet
    with pytest.raises(TypeError) as raised:
        registered(servicer)
    message = str(raised.value)
    assert f"Builds.Build (rpc /{PACKAGE}.builds.Builder/Build)" in message
    assert f"response_type={PACKAGE}.common.Artifact" in message
    assert f'response_type: "BuildResponse" ({PACKAGE}.builds.BuildResponse)' in message
    assert "make them agree" in message
    assert decorator.binding_of(servicer) is None


def test_a_mismatched_metadata_type_is_a_type_error_at_registration(gen: SimpleNamespace) -> None:
    """A metadata_type that differs from the proto's is refused on its own, naming both."""
    servicer = builder(gen, "Build", gen.builds.BuildResponse, metadata_type=gen.common.Progress)
    with pytest.raises(TypeError) as raised:
        registered(servicer)
    message = str(raised.value)
    assert f"/{PACKAGE}.builds.Builder/Build" in message
    assert f"metadata_type={PACKAGE}.common.Progress" in message
    assert f'metadata_type: "BuildMetadata" ({PACKAGE}.builds.BuildMetadata)' in message
    with pytest.raises(TypeError, match="metadata_type"):
        registration.types_of(servicer.Build)  # the same check, without a server


def test_no_types_and_no_operation_info_is_a_type_error(gen: SimpleNamespace) -> None:
    """Bare declares no operation_info: the decorator must give the types, and is told how."""
    with pytest.raises(TypeError) as raised:
        registered(builder(gen, "Bare"))
    message = str(raised.value)
    assert f"/{PACKAGE}.builds.Builder/Bare" in message
    assert "option (google.longrunning.operation_info)" in message
    assert "@lrofw.long_running(ResponseType, metadata_type=MetadataType)" in message
    explicit = builder(gen, "Bare", gen.builds.BuildResponse)
    registered(explicit)  # with types it registers, and keeps them
    types = registration.types_of(explicit.Bare)
    assert (types.response_type, types.metadata_type) == (gen.builds.BuildResponse, None)


def test_an_unknown_name_in_operation_info_is_a_type_error(gen: SimpleNamespace) -> None:
    """A name the pool does not know is refused, listing where it was looked for."""
    with pytest.raises(TypeError) as raised:
        registered(builder(gen, "Misnamed"))
    message = str(raised.value)
    assert '"NoSuchResponse"' in message
    assert f"{PACKAGE}.builds.NoSuchResponse, {PACKAGE}.NoSuchResponse, NoSuchResponse" in message
    with pytest.raises(TypeError, match="make them agree"):  # given a type, it cannot agree
        registered(builder(gen, "Misnamed", gen.builds.BuildResponse))


def test_an_rpc_that_does_not_return_an_operation_is_a_type_error(gen: SimpleNamespace) -> None:
    """@long_running on an RPC whose proto returns something else is refused at registration."""
    with pytest.raises(TypeError, match=f"returns? {PACKAGE}.builds.BuildResponse, not google"):
        registered(builder(gen, "Plain", gen.builds.BuildResponse))


def test_a_method_that_is_not_an_rpc_needs_types(gen: SimpleNamespace) -> None:
    """A decorated method the service does not have: no proto to read, so types are required."""
    with pytest.raises(TypeError, match="no generated service descriptor with this method"):
        registered(builder(gen, "Helper"))
    registered(builder(gen, "Helper", gen.builds.BuildResponse))


# --- no descriptor at all -----------------------------------------------------------------------


def test_without_generated_code_types_are_required() -> None:
    """A homemade servicer or a plain function has no proto: types_of says to give the types."""

    class Homemade:
        @lrofw.long_running()
        def Build(self, request: Any, op: Any) -> Any:
            return None

    @lrofw.long_running()
    def handler(request: Any, op: Any) -> Any:
        return None

    for method in (Homemade().Build, handler):
        with pytest.raises(TypeError, match=r"give the types: @lrofw\.long_running\(Response"):
            registration.types_of(method)
    typed = lrofw.long_running(tls_pb2.ProvisionDutResponse)(handler.__wrapped__)
    assert registration.types_of(typed).response_type is tls_pb2.ProvisionDutResponse
    with pytest.raises(TypeError, match="not a @long_running method"):
        registration.types_of(print)


def test_the_example_service_resolves_from_its_proto() -> None:
    """tls.proto declares ProvisionDut's operation_info: @long_running() takes the example's."""

    class Common(tls_pb2_grpc.CommonServicer):
        @lrofw.long_running()
        def ProvisionDut(self, request: Any, op: Any) -> Any:
            return tls_pb2.ProvisionDutResponse()

    types = registration.types_of(Common().ProvisionDut)
    assert types.response_type is tls_pb2.ProvisionDutResponse
    assert types.metadata_type is tls_pb2.ProvisionDutMetadata


def test_one_class_registered_twice_resolves_each_time(gen: SimpleNamespace) -> None:
    """Two instances of one decorated class, with two managers: both run with the proto's types;
    the decorator's own spec is left as written (no types)."""
    cls = type(builder(gen, "Build"))
    first, second = cls(), cls()
    with serve(first) as a, serve(second, aio=True) as b:
        for srv in (a, b):
            stub = gen.builds_grpc.BuilderStub(srv.channel)
            created = stub.Build(gen.builds.BuildRequest(target="t"))
            op = lrofw.wait(srv.channel, created.name, timeout=LONG)
            assert unpacked(op.response, gen.builds.BuildResponse).artifact == "built t"
    spec = decorator.spec_of(vars(type(first))["Build"])
    assert spec is not None and spec.response_type is None and spec.metadata_type is None
