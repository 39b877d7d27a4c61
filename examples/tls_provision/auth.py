"""Who is calling: the example's ``identify=`` hooks, and the client side of the same choices.

The server (``server.py``) names its callers in one of two ways, and lrofw then shows each caller
only the operations it created (see ``docs/security.md``):

- ``--tokens PATH``: a file of ``TOKEN PRINCIPAL`` lines (:func:`read_tokens`); a caller sends
  the metadata ``authorization: Bearer TOKEN`` and is the principal on that token's line
  (:class:`BearerTokens`).
- ``--tls-client-ca PATH`` without ``--tokens``: TLS requires a client certificate signed by that
  CA, and the caller is the certificate's subject distinguished name, as gRPC reports it under
  ``x509_subject`` in the call's auth context, e.g. ``CN=alice,O=lab``
  (:func:`certificate_subject`). The whole subject, not just its common name: two organisations'
  ``alice`` differ.

The client (``client.py``) sends the token with :class:`BearerToken` and builds its TLS channel
with :func:`open_channel`.

Example::

    identify = BearerTokens(read_tokens("tokens.txt"))
    lrofw.add_servicer_to_server(Common(), server, manager=manager, identify=identify)

    channel = open_channel("127.0.0.1:50051", token="s3cret", tls_ca=Path("ca.pem").read_bytes())
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

import lrofw.errors

logger = logging.getLogger("tls_provision.auth")

#: The metadata key a client's token travels in (gRPC metadata keys are lower case).
AUTHORIZATION = "authorization"
#: The scheme in front of the token, as in HTTP (RFC 6750); matched without regard to case.
BEARER = "bearer"

#: What a caller without (usable) credentials is told.
MISSING_TOKEN = "missing credentials: send the metadata 'authorization: Bearer TOKEN'"
#: What a caller whose token is not in the file is told (the token itself is never echoed).
UNKNOWN_TOKEN = "unknown token"
#: What a caller without a client certificate is told (TLS normally refuses it before this).
NO_CERTIFICATE = "no client certificate: connect with one signed by the server's client CA"

#: An ``identify=`` hook: the call's context in, the caller's principal out.
Identify = Callable[[Any], str]


class TokenFileError(ValueError):
    """A token file that cannot be used; the message names the file and the line."""


def read_tokens(path: str | Path) -> dict[str, str]:
    """Reads a token file: one ``TOKEN PRINCIPAL`` per line.

    The token is the line's first word, the principal the rest of the line (it may hold spaces,
    e.g. a certificate subject). Blank lines and lines starting with ``#`` are skipped. A token is
    printable ASCII (it travels in gRPC metadata), and appears once.

    Returns:
        Each token's principal.

    Raises:
        TokenFileError: the file cannot be read, a line is malformed, a token repeats, or the
            file holds no token at all.

    Example:
        >>> read_tokens("tokens.txt")   # "s3cret alice" and "0therkey bob"
        {'s3cret': 'alice', '0therkey': 'bob'}
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read {path}: {exc}") from None
    tokens: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path} line {number}"
        fields = line.split(None, 1)
        if len(fields) != 2:
            raise TokenFileError(f"{where}: expected 'TOKEN PRINCIPAL', got one word")
        token, principal = fields[0], fields[1].strip()
        if not (token.isascii() and token.isprintable()):
            raise TokenFileError(f"{where}: a token must be printable ASCII")
        if token in tokens:
            raise TokenFileError(f"{where}: this token is already on an earlier line")
        tokens[token] = principal
    if not tokens:
        raise TokenFileError(f"{path} holds no 'TOKEN PRINCIPAL' line")
    return tokens


def _digest(token: str) -> bytes:
    # Comparing fixed-length digests makes the comparison's time independent of the token's
    # length as well as of its content.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def bearer_token(metadata: Any) -> str:
    """Returns the token of the one ``authorization: Bearer TOKEN`` entry in a call's metadata.

    Raises:
        lrofw.errors.Unauthenticated: no such entry, more than one, or another scheme.

    Example:
        >>> bearer_token([("authorization", "Bearer s3cret")])
        's3cret'
    """
    values = [value for key, value in metadata or () if key == AUTHORIZATION]
    if len(values) != 1 or not isinstance(values[0], str):
        raise lrofw.errors.Unauthenticated(MISSING_TOKEN)
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != BEARER or not token:
        raise lrofw.errors.Unauthenticated(MISSING_TOKEN)
    return token


class BearerTokens:
    """An ``identify=`` hook: the caller is the principal of the bearer token it sends.

    The token is compared with every known token, each in constant time
    (``hmac.compare_digest``) and without stopping at a match, so how long the check takes says
    nothing about which tokens exist.

    Args:
        tokens: each token's principal, e.g. from :func:`read_tokens`.

    Example:
        >>> identify = BearerTokens({"s3cret": "alice"})
        >>> lrofw.add_servicer_to_server(Common(), server, manager=manager, identify=identify)
    """

    def __init__(self, tokens: Mapping[str, str]) -> None:
        if not tokens:
            raise ValueError("no tokens: every call would be refused")
        self._known = [(_digest(token), principal) for token, principal in tokens.items()]

    def __call__(self, context: Any) -> str:
        """Returns the caller's principal, or raises UNAUTHENTICATED."""
        sent = _digest(bearer_token(context.invocation_metadata()))
        found: str | None = None
        for digest, principal in self._known:
            if hmac.compare_digest(sent, digest):
                found = principal
        if found is None:
            raise lrofw.errors.Unauthenticated(UNKNOWN_TOKEN)
        return found


def certificate_subject(context: Any) -> str:
    """An ``identify=`` hook: the caller is the subject DN of its TLS client certificate.

    gRPC verified the certificate against the server's client CA during the handshake and
    reports its subject in the auth context as ``x509_subject`` (RFC 2253 order, e.g.
    ``CN=alice,O=lab``).

    Raises:
        lrofw.errors.Unauthenticated: the connection has no client certificate.

    Example:
        >>> lrofw.add_servicer_to_server(
        ...     Common(), server, manager=manager, identify=certificate_subject)
    """
    subjects = context.auth_context().get("x509_subject") or []
    if not subjects or not subjects[0]:
        raise lrofw.errors.Unauthenticated(NO_CERTIFICATE)
    subject: bytes = subjects[0]
    return subject.decode("utf-8", "replace")


def choose_identify(tokens: Mapping[str, str] | None, client_certificates: bool) -> Identify | None:
    """The hook for the server's flags: tokens when given (they decide even when a client
    certificate is required too), else the certificate subject, else none (one trusted caller).

    Example:
        >>> choose_identify(None, client_certificates=True) is certificate_subject
        True
    """
    if tokens:
        return BearerTokens(tokens)
    if client_certificates:
        return certificate_subject
    return None


# The client side.


class BearerToken(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg,unused-ignore]
    """Adds ``authorization: Bearer TOKEN`` to every unary call on a channel, the create RPC and
    the Operations RPCs that ``lrofw.OperationFuture`` makes alike.

    Example:
        >>> channel = grpc.intercept_channel(grpc.insecure_channel(target), BearerToken("s3cret"))
    """

    def __init__(self, token: str) -> None:
        self._entry = (AUTHORIZATION, f"Bearer {token}")

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        """Calls on with the token added to the call's metadata."""
        metadata = [*(details.metadata or ()), self._entry]
        return continuation(details._replace(metadata=metadata), request)


def open_channel(
    target: str,
    *,
    token: str | None = None,
    tls_ca: bytes | None = None,
    tls_cert: bytes | None = None,
    tls_key: bytes | None = None,
) -> grpc.Channel:
    """Opens a channel to ``target``: TLS trusting ``tls_ca`` when given (presenting the client
    certificate ``tls_cert``/``tls_key`` when given), plaintext otherwise; with ``token``, every
    call carries it as a bearer token.

    Example:
        >>> ca = Path("ca.pem").read_bytes()
        >>> channel = open_channel("127.0.0.1:50051", token="s3cret", tls_ca=ca)
    """
    if tls_ca is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls_ca, private_key=tls_key, certificate_chain=tls_cert
        )
        channel = grpc.secure_channel(target, credentials)
    else:
        channel = grpc.insecure_channel(target)
    if token is not None:
        channel = grpc.intercept_channel(channel, BearerToken(token))
    return channel
