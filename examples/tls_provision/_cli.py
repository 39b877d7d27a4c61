"""argparse value types shared by the example's scripts.

Each raises ``argparse.ArgumentTypeError``, so a bad flag ends in argparse's usage message and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math


def _split_host_port(value: str) -> tuple[str, int]:
    """Splits ``HOST:PORT`` (``[v6addr]:PORT`` for IPv6) into its parts, checking both."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise argparse.ArgumentTypeError(f"write an IPv6 host in brackets ([::1]:0), got {value!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be a number, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {port}")
    return host, port


def listen_address(value: str) -> str:
    """An address to serve on, ``HOST:PORT``; port 0 picks a free port."""
    _split_host_port(value)
    return value


def target_address(value: str) -> str:
    """An address to connect to, ``HOST:PORT`` with a real port (1..65535)."""
    _, port = _split_host_port(value)
    if port == 0:
        raise argparse.ArgumentTypeError("port 0 is only meaningful for a server")
    return value


def non_negative_seconds(value: str) -> float:
    """A finite number of seconds, zero or more."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return seconds


def positive_seconds(value: str) -> float:
    """A finite number of seconds, more than zero."""
    seconds = non_negative_seconds(value)
    if seconds == 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return seconds


def positive_int(value: str) -> int:
    """A whole number, 1 or more."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {number}")
    return number


def host_of(address: str) -> str:
    """Returns the HOST part of a ``HOST:PORT`` address already checked by these types."""
    return address.rpartition(":")[0]


def _pem(value: str, kind: str) -> bytes:
    """The bytes of the PEM file ``value``, which must hold a ``kind`` block."""
    try:
        with open(value, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {value}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data or f"{kind}-----".encode() not in data:
        raise argparse.ArgumentTypeError(f"{value} holds no PEM {kind}")
    return data


def pem_certificates(value: str) -> bytes:
    """A PEM file of one or more certificates (a certificate chain, or CAs to trust)."""
    return _pem(value, "CERTIFICATE")


def pem_private_key(value: str) -> bytes:
    """A PEM file holding an unencrypted private key."""
    return _pem(value, "PRIVATE KEY")
