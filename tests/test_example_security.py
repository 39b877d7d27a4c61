"""Tests for examples/tls_provision's callers, TLS and bounded shutdown: real server processes.

Certificates are made at test time (a CA, a server certificate for 127.0.0.1 and localhost, and
two client certificates) with ``cryptography``. Ownership is checked on the memory store, which
keeps principals whatever the SQLite schema.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import ipaddress
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from factories import eventually, rpc_error
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2
from test_example import BOTH_SERVERS, EXAMPLE, OPERATION_NAME, run, server

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))
# By name: the example's folder is not on mypy's (or ruff's) path.
auth, tls_pb2, tls_pb2_grpc = (
    importlib.import_module(name) for name in ("auth", "tls_pb2", "tls_pb2_grpc")
)

ALICE = "CN=alice,O=lrofw tests"  # the client certificates' subjects, as gRPC reports them
BOB = "CN=bob,O=lrofw tests"
TOKENS = "# who may call\n\ntok-alice alice\ntok-bob   bob\n"
Metadata = tuple[tuple[str, str], ...]


# --- certificates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """The PEM files of a test CA, a server certificate and two client certificates."""

    ca: Path
    server_cert: Path
    server_key: Path
    alice_cert: Path
    alice_key: Path
    bob_cert: Path
    bob_key: Path


def _name(common_name: str) -> Any:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lrofw tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA valid for a day, a server certificate for 127.0.0.1 and localhost, alice and bob."""
    folder = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())

    def certificate(subject: Any, key: Any, *extensions: tuple[Any, bool]) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(_name("test CA"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(ca_key, hashes.SHA256())

    ca = certificate(
        _name("test CA"), ca_key, (x509.BasicConstraints(ca=True, path_length=0), True)
    )
    files: dict[str, bytes] = {"ca.pem": ca.public_bytes(serialization.Encoding.PEM)}
    leaf = (x509.BasicConstraints(ca=False, path_length=None), True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server_cert = certificate(
        _name("localhost"),
        server_key,
        leaf,
        (x509.SubjectAlternativeName(names), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
    )
    files["server.pem"] = server_cert.public_bytes(serialization.Encoding.PEM)
    files["server.key"] = _pem_key(server_key)
    for who in ("alice", "bob"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = certificate(
            _name(who), key, leaf, (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        )
        files[f"{who}.pem"] = cert.public_bytes(serialization.Encoding.PEM)
        files[f"{who}.key"] = _pem_key(key)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return Pki(
        *(
            folder / name
            for name in (
                "ca.pem", "server.pem", "server.key", "alice.pem", "alice.key", "bob.pem", "bob.key"
            )
        )
    )  # fmt: skip


def tls_flags(pki: Pki, client_ca: bool = False) -> list[str]:
    """server.py's flags to serve TLS (requiring client certificates with ``client_ca``)."""
    flags = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    return [*flags, "--tls-client-ca", str(pki.ca)] if client_ca else flags


@contextlib.contextmanager
def channel(target: str, pki: Pki | None = None, who: str | None = None) -> Iterator[grpc.Channel]:
    """A channel from the test to a server process: plaintext, TLS (``pki``), mTLS as ``who``."""
    if pki is None:
        opened = grpc.insecure_channel(target)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(),
            private_key=None if who is None else getattr(pki, f"{who}_key").read_bytes(),
            certificate_chain=None if who is None else getattr(pki, f"{who}_cert").read_bytes(),
        )
        opened = grpc.secure_channel(target, credentials)
    with opened:
        yield opened


def bearer(token: str) -> Metadata:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


def create(ch: grpc.Channel, metadata: Metadata = (), dut: str = "some host") -> Any:
    """ProvisionDut on ``ch``: the operation."""
    request = tls_pb2.ProvisionDutRequest(name=dut, image_path="img/9")
    return tls_pb2_grpc.CommonStub(ch).ProvisionDut(request, metadata=metadata, timeout=10)


def every_rpc(ch: grpc.Channel, name: str) -> dict[str, Callable[[Metadata], object]]:
    """The create RPC and the five Operations RPCs (on ``name``), each taking call metadata."""
    ops = operations_pb2_grpc.OperationsStub(ch)
    short = duration_pb2.Duration(nanos=10_000_000)
    return {
        "ProvisionDut": lambda md: create(ch, md),
        "GetOperation": lambda md: ops.GetOperation(
            operations_pb2.GetOperationRequest(name=name), metadata=md, timeout=10
        ),
        "ListOperations": lambda md: ops.ListOperations(
            operations_pb2.ListOperationsRequest(name="operations"), metadata=md, timeout=10
        ),
        "WaitOperation": lambda md: ops.WaitOperation(
            operations_pb2.WaitOperationRequest(name=name, timeout=short), metadata=md, timeout=10
        ),
        "CancelOperation": lambda md: ops.CancelOperation(
            operations_pb2.CancelOperationRequest(name=name), metadata=md, timeout=10
        ),
        "DeleteOperation": lambda md: ops.DeleteOperation(
            operations_pb2.DeleteOperationRequest(name=name), metadata=md, timeout=10
        ),
    }


def listed(ch: grpc.Channel, metadata: Metadata = ()) -> set[str]:
    """The names ListOperations shows the caller."""
    ops = operations_pb2_grpc.OperationsStub(ch)
    request = operations_pb2.ListOperationsRequest(name="operations")
    return {op.name for op in ops.ListOperations(request, metadata=metadata, timeout=10).operations}


# --- the token file and the hooks, in-process -----------------------------------------------------


def test_read_tokens_skips_comments_and_keeps_the_rest_of_the_line(tmp_path: Path) -> None:
    """Blank lines and # comments are skipped; the principal is the rest of the line."""
    path = tmp_path / "tokens.txt"
    path.write_text("# ops team\n\n  tok-1   alice  \ntok-2 CN=bob, O=lab\n")
    assert auth.read_tokens(path) == {"tok-1": "alice", "tok-2": "CN=bob, O=lab"}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("tok-1 alice\nlonely\n", "{path} line 2: expected 'TOKEN PRINCIPAL', got one word"),
        ("tok-1 alice\ntok-1 bob\n", "{path} line 2: this token is already on an earlier line"),
        ("t\u00f6k alice\n", "{path} line 1: a token must be printable ASCII"),
        ("# nobody\n\n", "{path} holds no 'TOKEN PRINCIPAL' line"),
    ],
    ids=["one word", "repeated", "not ascii", "empty"],
)
def test_read_tokens_names_the_bad_line(tmp_path: Path, text: str, error: str) -> None:
    """A malformed token file is refused with the file, the line and what is wrong."""
    path = tmp_path / "tokens.txt"
    path.write_text(text)
    with pytest.raises(auth.TokenFileError) as info:
        auth.read_tokens(path)
    assert str(info.value) == error.format(path=path)


class FakeContext:
    """What BearerTokens reads from a call: its metadata."""

    def __init__(self, *metadata: tuple[str, str]) -> None:
        self.metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata


@pytest.mark.parametrize(
    ("metadata", "principal"),
    [
        ((("authorization", "Bearer tok-2"),), "bob"),
        ((("authorization", "bearer   tok-1 "),), "alice"),
        ((), auth.MISSING_TOKEN),
        ((("authorization", "Basic dG9rLTE="),), auth.MISSING_TOKEN),
        ((("authorization", "Bearer "),), auth.MISSING_TOKEN),
        (
            (("authorization", "Bearer tok-1"), ("authorization", "Bearer tok-2")),
            auth.MISSING_TOKEN,
        ),
        ((("authorization", "Bearer tok-3"),), auth.UNKNOWN_TOKEN),
    ],
    ids=["bob", "scheme case", "none", "basic", "empty", "two", "unknown"],
)
def test_bearer_tokens_name_the_caller_or_refuse(
    metadata: tuple[tuple[str, str], ...], principal: str
) -> None:
    """The one Bearer token names its principal; anything else is UNAUTHENTICATED, never echoed."""
    import lrofw.errors

    identify = auth.BearerTokens({"tok-1": "alice", "tok-2": "bob"})
    if principal in (auth.MISSING_TOKEN, auth.UNKNOWN_TOKEN):
        with pytest.raises(lrofw.errors.Unauthenticated) as info:
            identify(FakeContext(*metadata))
        assert info.value.message == principal
    else:
        assert identify(FakeContext(*metadata)) == principal


def test_bearer_tokens_compare_with_every_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check compares with every known token in constant time, not stopping at a match."""
    compared: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return bool(real(a, b))

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    identify = auth.BearerTokens({f"tok-{i}": f"p{i}" for i in range(5)})
    assert identify(FakeContext(("authorization", "Bearer tok-0"))) == "p0"
    assert len(compared) == 5
    assert {len(a) for a, _ in compared} == {32}  # digests: the same length whatever the token


class FakeTlsContext:
    """What certificate_subject reads from a call: its auth context."""

    def __init__(self, **properties: list[bytes]) -> None:
        self.properties = properties

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.properties


def test_certificate_subject_is_the_whole_subject_dn() -> None:
    """The principal is gRPC's x509_subject (the whole DN), not just the common name."""
    import lrofw.errors

    context = FakeTlsContext(x509_subject=[ALICE.encode()], x509_common_name=[b"alice"])
    assert auth.certificate_subject(context) == ALICE
    with pytest.raises(lrofw.errors.Unauthenticated):
        auth.certificate_subject(FakeTlsContext(transport_security_type=[b"ssl"]))


# --- TLS and client certificates ------------------------------------------------------------------


@BOTH_SERVERS
def test_tls_serves_a_client_that_trusts_the_ca(tmp_path: Path, pki: Pki, aio: bool) -> None:
    """--tls-cert/--tls-key serve TLS: client.py --tls-ca provisions end to end; plaintext fails."""
    with server(tmp_path, *tls_flags(pki), aio=aio) as srv:
        result = run(
            "client.py", "--target", srv.target, "--dut", "some host", "--tls-ca", str(pki.ca)
        )
        with channel(srv.target) as plaintext:
            error = rpc_error(lambda: create(plaintext))
        assert srv.stop() == 0
    assert result.returncode == 0, result.stdout + result.stderr
    assert "progress: done 100%" in result.stdout
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "transport: TLS; callers: not identified" in srv.stderr.read_text()


def test_client_certificates_are_required_and_name_the_caller(tmp_path: Path, pki: Pki) -> None:
    """--tls-client-ca: a client without a certificate cannot connect; with one, it is its
    certificate's subject and sees only its own operations."""
    with server(tmp_path, *tls_flags(pki, client_ca=True), "--store", "memory:") as srv:
        alice = run(
            "client.py", "--target", srv.target, "--dut", "some host", "--tls-ca", str(pki.ca),
            "--tls-cert", str(pki.alice_cert), "--tls-key", str(pki.alice_key),
        )  # fmt: skip
        anonymous = run(
            "client.py", "--target", srv.target, "--dut", "some host", "--tls-ca", str(pki.ca),
            "--timeout", "1",
        )  # fmt: skip
        match = OPERATION_NAME.search(alice.stdout)
        assert match, alice.stdout + alice.stderr
        with channel(srv.target, pki, "alice") as as_alice, channel(srv.target, pki, "bob") as bob:
            assert listed(as_alice) == {match.group(1)}
            assert listed(bob) == set()
            error = rpc_error(lambda: every_rpc(bob, match.group(1))["GetOperation"](()))
            assert error.code() == grpc.StatusCode.NOT_FOUND
        assert srv.stop() == 0
    assert alice.returncode == 0, alice.stdout + alice.stderr
    assert anonymous.returncode == 1
    assert "cannot reach the server" in anonymous.stderr
    assert "check --tls-ca, and --tls-cert/--tls-key" in anonymous.stderr
    log = srv.stderr.read_text()
    assert "TLS, client certificates required; callers: client certificate subjects" in log


# --- bearer tokens --------------------------------------------------------------------------------


@BOTH_SERVERS
def test_tokens_refuse_every_rpc_without_a_known_token(tmp_path: Path, aio: bool) -> None:
    """--tokens: no token, or an unknown one, is UNAUTHENTICATED on the create RPC and on all five
    Operations RPCs, even for an operation that exists; the right token works."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKENS)
    with (
        server(tmp_path, "--tokens", str(tokens), "--store", "memory:", aio=aio) as srv,
        channel(srv.target) as ch,
    ):
        name = create(ch, bearer("tok-alice")).name
        for who, metadata in {"no token": (), "unknown token": bearer("tok-eve")}.items():
            for rpc, call in every_rpc(ch, name).items():
                error = rpc_error(lambda call=call, metadata=metadata: call(metadata))
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (who, rpc)
                assert "tok-eve" not in (error.details() or "")
        assert every_rpc(ch, name)["GetOperation"](bearer("tok-alice")).name == name
        assert srv.stop() == 0
    log = srv.stderr.read_text()
    assert "callers: bearer tokens (2 principal(s))" in log
    assert "tokens cross the network in plaintext" in log
    assert "Traceback" not in log


@BOTH_SERVERS
def test_two_tokens_are_two_principals(tmp_path: Path, aio: bool) -> None:
    """Two tokens' callers cannot see, wait on, cancel or delete each other's operations (NOT_FOUND
    as for a missing name), nor list them."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKENS)
    with (
        server(
            tmp_path,
            "--tokens",
            str(tokens),
            "--store",
            "memory:",
            "--grace-seconds",
            "0",
            step_seconds=30.0,
            aio=aio,
        ) as srv,  # fmt: skip
        channel(srv.target) as ch,
    ):
        alices = create(ch, bearer("tok-alice")).name
        bobs = create(ch, bearer("tok-bob")).name
        missing = "operations/00000000-0000-4000-8000-000000000000"
        assert listed(ch, bearer("tok-alice")) == {alices}
        assert listed(ch, bearer("tok-bob")) == {bobs}
        for rpc in ("GetOperation", "WaitOperation", "CancelOperation", "DeleteOperation"):
            hidden = rpc_error(lambda rpc=rpc: every_rpc(ch, alices)[rpc](bearer("tok-bob")))
            absent = rpc_error(lambda rpc=rpc: every_rpc(ch, missing)[rpc](bearer("tok-bob")))
            assert hidden.code() == absent.code() == grpc.StatusCode.NOT_FOUND, rpc
            assert hidden.details() == (absent.details() or "").replace(missing, alices), rpc
        still = every_rpc(ch, alices)["GetOperation"](bearer("tok-alice"))
        assert not still.done  # bob's cancel and delete did nothing
        assert srv.stop() == 0


def test_tokens_work_on_the_default_store(tmp_path: Path) -> None:
    """With --tokens on the default (SQLite) store, client.py --token provisions end to end."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKENS)
    with server(tmp_path, "--tokens", str(tokens)) as srv:
        result = run(
            "client.py", "--target", srv.target, "--dut", "some host", "--token", "tok-bob"
        )
        assert srv.stop() == 0
    assert result.returncode == 0, result.stdout + result.stderr
    assert "progress: done 100%" in result.stdout


def test_demo_runs_with_tls_and_tokens(tmp_path: Path, pki: Pki) -> None:
    """demo.py hands the credential flags on: TLS with tokens provisions, a tokenless call is
    UNAUTHENTICATED, and the demo exits 0 (the server's flags are the same with --aio)."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKENS)
    result = run(
        "demo.py", "--step-seconds", "0.05", "--store", "memory:",
        "--tokens", str(tokens), "--token", "tok-alice", *tls_flags(pki), "--tls-ca", str(pki.ca),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo: ok" in result.stdout
    assert "client| error: UNAUTHENTICATED " + auth.MISSING_TOKEN in result.stdout
    assert "--token ***" in result.stdout
    assert "tok-alice" not in result.stdout


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--tokens", "{tmp}/tokens.txt"], "argument --tokens: {tmp}/tokens.txt line 1: expected"),
        (["--tls-client-ca", "{pki}/ca.pem"], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", "{pki}/server.key"], "argument --tls-cert: {pki}/server.key holds no PEM"),
    ],
    ids=["malformed tokens", "client ca alone", "key as cert"],
)
def test_server_refuses_unusable_credentials_at_start(
    tmp_path: Path, pki: Pki, flags: list[str], error: str
) -> None:
    """A bad token file or TLS flags that do not go together: one error line, exit 2, at start."""
    (tmp_path / "tokens.txt").write_text("lonely\n")
    places = {"tmp": str(tmp_path), "pki": str(pki.ca.parent)}
    result = run("server.py", *(flag.format(**places) for flag in flags), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    last = result.stderr.splitlines()[-1]
    assert last.startswith("server.py: error: " + error.format(**places)), last
    assert "Traceback" not in result.stderr


# --- shutting down, whatever the handlers do ------------------------------------------------------

#: A server.py whose handlers misbehave as ``image_path`` says: "ignore-cancel" sleeps through
#: every stop (sync) or swallows CancelledError (aio); "raise-on-stop" and "block-on-stop" add a
#: stop callback that raises or never returns. Anything else provisions as the example does.
MISBEHAVING_SERVER = """
import asyncio, sys, threading, time
sys.path.insert(0, sys.argv.pop(1))
import server, servicer

def on_stop(kind):
    if kind == "raise-on-stop":
        def fail():
            raise RuntimeError("a stop callback that fails")
        return fail
    return threading.Event().wait if kind == "block-on-stop" else None

class Misbehaving(servicer.Common):
    @servicer.provision_dut
    def ProvisionDut(self, request, op):
        if on_stop(request.image_path):
            op.add_stop_callback(on_stop(request.image_path))
        run = self.provisioning(request, op)
        try:
            seconds = next(run)
            while True:
                if request.image_path == "ignore-cancel":
                    time.sleep(seconds)
                    seconds = run.send(False)
                else:
                    seconds = run.send(op.sleep(seconds))
        except StopIteration as done:
            return done.value

class AsyncMisbehaving(servicer.AsyncCommon):
    @servicer.provision_dut
    async def ProvisionDut(self, request, op):
        if on_stop(request.image_path):
            op.add_stop_callback(on_stop(request.image_path))
        run = self.provisioning(request, op)
        try:
            seconds = next(run)
            while True:
                if request.image_path == "ignore-cancel":
                    end = time.monotonic() + seconds
                    while time.monotonic() < end:
                        try:
                            await asyncio.sleep(end - time.monotonic())
                        except asyncio.CancelledError:
                            pass
                    seconds = run.send(False)
                else:
                    seconds = run.send(await op.sleep(seconds))
        except StopIteration as done:
            return done.value

sys.exit(server.main(sys.argv[1:], Misbehaving, AsyncMisbehaving))
"""

MISBEHAVIOURS = ("cooperative", "cooperative", "ignore-cancel", "raise-on-stop", "block-on-stop")


@contextlib.contextmanager
def misbehaving_server(
    tmp_path: Path, grace: float, aio: bool, kinds: tuple[str, ...] = MISBEHAVIOURS
) -> Iterator[Any]:
    """The misbehaving server (30 s stages) with one running operation of each of ``kinds``;
    no drain notice, so that shutting down is the grace and the margin alone."""
    program = ["-c", MISBEHAVING_SERVER, str(EXAMPLE)]
    flags = ["--grace-seconds", f"{grace:g}", "--notice-seconds", "0"]
    with (
        server(tmp_path, *flags, step_seconds=30.0, aio=aio, program=program) as srv,
        channel(srv.target) as ch,
    ):
        stub = tls_pb2_grpc.CommonStub(ch)
        names = [
            stub.ProvisionDut(
                tls_pb2.ProvisionDutRequest(name="some host", image_path=kind), timeout=10
            ).name
            for kind in kinds
        ]
        log = srv.stderr
        eventually(lambda: log.read_text().count(": downloading (0%)") == len(names), "all running")
        yield srv


def stop_within(srv: Any, sig: signal.Signals, seconds: float) -> float:
    """Sends ``sig``; asserts exit code 0 within ``seconds``; returns how long it took."""
    start = time.monotonic()
    srv.process.send_signal(sig)
    try:
        code = srv.process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server did not exit within {seconds:g}s of {sig.name}")
    assert code == 0, srv.stderr.read_text()
    return time.monotonic() - start


@BOTH_SERVERS
def test_sigterm_exits_zero_within_the_grace_whatever_handlers_do(
    tmp_path: Path, aio: bool
) -> None:
    """Under load, with handlers that ignore cancellation or swallow CancelledError and stop
    callbacks that raise or block, SIGTERM exits 0 within --grace-seconds + 5 s."""
    grace = 1.0
    with misbehaving_server(tmp_path, grace, aio) as srv:
        stop_within(srv, signal.SIGTERM, grace + 5.0)
    log = srv.stderr.read_text()
    assert "received SIGTERM, shutting down" in log


@BOTH_SERVERS
def test_a_shutdown_that_hangs_is_cut_off(tmp_path: Path, aio: bool) -> None:
    """When closing hangs (a stop callback that never returns), the process still exits 0 after
    --grace-seconds + SHUTDOWN_MARGIN, naming what it abandons."""
    with misbehaving_server(tmp_path, 0.0, aio, ("cooperative", "block-on-stop")) as srv:
        assert stop_within(srv, signal.SIGTERM, 5.0) >= 3.0  # SHUTDOWN_MARGIN
    log = srv.stderr.read_text()
    assert "shutting down took more than 3s; exiting now with code 0, abandoning" in log


@BOTH_SERVERS
def test_second_signal_during_shutdown_exits_at_once(tmp_path: Path, aio: bool) -> None:
    """A second SIGTERM or SIGINT while shutting down waits for nothing: exit 0 at once, and the
    log names the operations left running."""
    with misbehaving_server(tmp_path, grace=60.0, aio=aio) as srv:
        srv.process.send_signal(signal.SIGTERM)
        eventually(lambda: "shutting down" in srv.stderr.read_text(), "shutting down")
        assert stop_within(srv, signal.SIGINT, 5.0) < 5.0
    log = srv.stderr.read_text()
    assert "received SIGINT while shutting down; exiting now with code 0, abandoning" in log
    assert log.count("(downloading)") >= 2  # the cooperative ones, still within their grace
