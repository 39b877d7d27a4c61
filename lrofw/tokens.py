"""Opaque page tokens for ListOperations: signed (HMAC-SHA256), versioned, bound to the listing
they came from (AIP-158: a tampered, made-up or foreign token is refused).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import struct

__all__ = ["PageTokenError", "PageTokens"]


class PageTokenError(ValueError):
    """A page token that is malformed, tampered with, or from another listing or server.

    Example:
        >>> try:
        ...     PageTokens().decode("bogus", "operations")
        ... except PageTokenError as exc:
        ...     print(exc)
        invalid page_token: malformed
    """


_TOKEN_VERSION = 1
# Version (1 byte), cursor (8) and HMAC-SHA256 truncated to 192 bits: 33 bytes encode to 44
# base64 characters with no padding and no unused bits, so each token has one spelling.
_PAYLOAD = struct.Struct(">BQ24s")
_PAGE_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{44}")
_MAX_TOKEN_LENGTH = 1000


class PageTokens:
    """Signs and checks opaque page tokens (HMAC-SHA256 with a secret key), bound to the listing.

    Servers behind one load balancer must share ``key`` for tokens to work across them; with the
    default random key, tokens stop working when the process restarts.

    Args:
        key: Secret of at least 16 bytes; ``None`` draws 32 random bytes.

    Example:
        >>> tokens = PageTokens()
        >>> token = tokens.encode(100, "operations|done = true|50")
        >>> tokens.decode(token, "operations|done = true|50")
        100
    """

    def __init__(self, key: bytes | None = None) -> None:
        if key is not None and len(key) < 16:
            raise ValueError(f"page token key must have at least 16 bytes, got {len(key)}")
        self._key = os.urandom(32) if key is None else bytes(key)

    def _mac(self, version: int, cursor: int, binding: str) -> bytes:
        message = b"lrofw.page_token\x00%d\x00%d\x00" % (version, cursor)
        message += binding.encode("utf-8", "surrogatepass")
        return hmac.new(self._key, message, hashlib.sha256).digest()[:24]

    def encode(self, cursor: int, binding: str) -> str:
        """Returns the URL-safe token (base64url, no padding) to resume a listing at ``cursor``.

        Args:
            cursor: Non-negative position in the store's newest-first order, below 2**64.
            binding: What the token is valid for: collection, canonical filter, principal.

        Example:
            >>> len(PageTokens(b"0123456789abcdef").encode(7, "ops"))
            44
        """
        if not 0 <= cursor < 2**64:
            raise ValueError(f"cursor must be in [0, 2**64), got {cursor}")
        payload = _PAYLOAD.pack(_TOKEN_VERSION, cursor, self._mac(_TOKEN_VERSION, cursor, binding))
        return base64.urlsafe_b64encode(payload).decode("ascii")

    def decode(self, token: str, binding: str) -> int:
        """Returns the cursor that :meth:`encode` put in ``token``, after checking the token.

        Args:
            token: The request's ``page_token``; the caller handles the empty first-page token.
            binding: The binding the token must have been made with.

        Raises:
            PageTokenError: If the token is malformed, tampered with, signed with another key, or
                made for another binding (for example, the client changed the filter).

        Example:
            >>> tokens = PageTokens()
            >>> tokens.decode(tokens.encode(3, "a"), "a")
            3
        """
        if len(token) > _MAX_TOKEN_LENGTH:
            raise PageTokenError(f"invalid page_token: longer than {_MAX_TOKEN_LENGTH} characters")
        if not _PAGE_TOKEN_RE.fullmatch(token):
            raise PageTokenError("invalid page_token: malformed")
        version, cursor, mac = _PAYLOAD.unpack(base64.urlsafe_b64decode(token))
        if version != _TOKEN_VERSION:
            raise PageTokenError("invalid page_token: unsupported version")
        if not hmac.compare_digest(mac, self._mac(version, cursor, binding)):
            raise PageTokenError(
                "invalid page_token: not from this listing (filter or server changed)"
            )
        return int(cursor)
