"""The clients' argument checks, shared by :mod:`lrofw.client` and :mod:`lrofw.aio`: a wrong
argument is a TypeError or ValueError that says what was expected, before any call is made."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from google.protobuf.message import Message

#: gRPC metadata sent with every call a client makes, as a stub's ``metadata=`` (google-api-core
#: calls it ``grpc_metadata``): ``(key, value)`` pairs; keys lowercase, values str, or bytes for
#: keys ending in ``-bin``.
CallMetadata = Sequence[tuple[str, "str | bytes"]]

_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")


def check_name(name: object) -> str:
    """``name`` if it can name an operation: a non-empty str (TypeError, ValueError if not).

    Example:
        >>> check_name("operations/abc")
        'operations/abc'
    """
    if not isinstance(name, str):
        raise TypeError(f"an operation name must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError("an operation name must not be empty")
    return name


def call_metadata(metadata: object) -> tuple[tuple[str, str | bytes], ...] | None:
    """``metadata`` checked and frozen for every call of a wait or a future (None: none).

    Raises:
        TypeError: not a sequence of ``(key, value)`` pairs, or a value of the wrong type
            (``-bin`` keys take bytes, other keys str).
        ValueError: a key gRPC refuses (keys are lowercase letters, digits, ``-``, ``_``, ``.``).

    Example:
        >>> call_metadata([("x-user", "alice")])
        (('x-user', 'alice'),)
    """
    if metadata is None:
        return None
    if isinstance(metadata, (str, bytes, Mapping)) or not isinstance(metadata, Sequence):
        raise TypeError(
            "metadata must be a sequence of (key, value) pairs, e.g. [('x-user', 'alice')], "
            f"got {type(metadata).__name__}"
        )
    pairs: list[tuple[str, str | bytes]] = []
    for pair in metadata:
        if not isinstance(pair, tuple) or len(pair) != 2 or not isinstance(pair[0], str):
            raise TypeError(f"metadata must be (key, value) pairs with str keys, got {pair!r}")
        key, value = pair
        if not _METADATA_KEY.fullmatch(key):
            raise ValueError(
                f"metadata key {key!r} is not valid: use lowercase letters, digits, '-', '_', '.'"
            )
        wanted = bytes if key.endswith("-bin") else str
        if not isinstance(value, wanted):
            raise TypeError(
                f"metadata {key!r} must have a {wanted.__name__} value, got {type(value).__name__}"
            )
        pairs.append((key, value))
    return tuple(pairs)


def check_message_class(value: object, what: str) -> None:
    """Nothing if ``value`` is a protobuf message class; TypeError naming ``what`` if not.

    Example:
        >>> check_message_class(dict, "response_type")
        Traceback (most recent call last):
        TypeError: response_type must be a protobuf message class, got <class 'dict'>
    """
    if not (isinstance(value, type) and issubclass(value, Message)):
        raise TypeError(f"{what} must be a protobuf message class, got {value!r}")
