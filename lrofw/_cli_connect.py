"""The ``lrofw`` command's connection: its options, the channel (TLS, bearer token, ready or a
one-line failure) and server reflection for message types the command has not imported."""

from __future__ import annotations

import argparse
import os
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc

from .channel import CHANNEL_OPTIONS

CONNECT_TIMEOUT = 10.0  # seconds to reach the target when no --timeout is given


class Failure(Exception):
    """Ends the command with ``exit_code`` after printing ``message`` on stderr."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Options:
    """The connection options, defaults filled in."""

    target: str
    tls_ca: str | None
    tls_cert: str | None
    tls_key: str | None
    token: str | None
    timeout: float | None
    json: bool

    @classmethod
    def of(cls, args: argparse.Namespace) -> Options:
        """From parsed arguments; Failure (2) for a missing target or half of a key pair."""
        get = vars(args).get
        if not get("target"):
            raise Failure("--target HOST:PORT is required", 2)
        if (get("tls_cert") is None) != (get("tls_key") is None):
            raise Failure("--tls-cert and --tls-key go together", 2)
        token = get("token") or os.environ.get("LROFW_TOKEN") or None
        return cls(str(get("target")), get("tls_ca"), get("tls_cert"), get("tls_key"), token,
                   get("timeout"), bool(get("json")))  # fmt: skip


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise Failure(f"cannot read {what} {path}: {exc.strerror}", 2) from None


def connect(options: Options) -> grpc.Channel:
    """A channel to the target, once it is ready; Failure (2) if it cannot be reached."""
    if options.tls_ca is None and options.tls_cert is None:
        channel = grpc.insecure_channel(options.target, options=CHANNEL_OPTIONS)
    else:
        credentials = grpc.ssl_channel_credentials(
            # Without --tls-ca, gRPC's default roots (a public server's certificate).
            root_certificates=None if options.tls_ca is None else _read(options.tls_ca, "--tls-ca"),
            private_key=None if options.tls_key is None else _read(options.tls_key, "--tls-key"),
            certificate_chain=(
                None if options.tls_cert is None else _read(options.tls_cert, "--tls-cert")
            ),
        )
        channel = grpc.secure_channel(options.target, credentials, options=CHANNEL_OPTIONS)
    limit = min(options.timeout or CONNECT_TIMEOUT, CONNECT_TIMEOUT)
    state = _first_answer(channel, limit)
    if state is grpc.ChannelConnectivity.READY:
        return channel
    channel.close()
    tls = " over TLS" if options.tls_ca or options.tls_cert else ""
    if state is None:
        raise Failure(f"cannot connect to {options.target}{tls} within {limit:g} s", 2)
    raise Failure(f"cannot connect to {options.target}{tls}: connection failed", 2)


def _first_answer(channel: grpc.Channel, limit: float) -> grpc.ChannelConnectivity | None:
    """READY, or TRANSIENT_FAILURE (refused, unreachable, a failed TLS handshake: a command
    should say so at once, not retry for ``limit``), or None when neither came in time."""
    seen: list[grpc.ChannelConnectivity] = []
    settled = threading.Event()
    ends = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE)

    def watch(state: grpc.ChannelConnectivity) -> None:
        if state in ends:
            seen.append(state)
            settled.set()

    channel.subscribe(watch, try_to_connect=True)
    try:
        settled.wait(limit)
    finally:
        channel.unsubscribe(watch)
    return seen[0] if seen else None


def reflection(channel: grpc.Channel) -> Any:
    """A lookup of message types by server reflection, or None without grpcio-reflection."""
    try:
        from google.protobuf import descriptor_pool
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
            ProtoReflectionDescriptorDatabase,
        )
    except ImportError:
        return None
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))

    def find(full_name: str) -> Any:
        try:
            return pool.FindMessageTypeByName(full_name)
        except Exception:  # no reflection, not allowed, not known: show the Any as it is
            return None

    return find


class _CallDetails(NamedTuple):
    """A call's details with metadata added (grpc.ClientCallDetails has no public copy)."""

    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class Bearer(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds ``authorization: Bearer TOKEN`` to every call, server reflection's too.

    Example:
        >>> channel = grpc.intercept_channel(channel, Bearer("tok-alice"))
    """

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        return _CallDetails(
            details.method,
            details.timeout,
            (*(details.metadata or ()), self._entry),
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)
