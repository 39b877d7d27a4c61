"""Channel options for clients of lrofw servers: retries that carry a call through a server's
drain, restart or crash, client-side health checks, and keepalive within the server's limits.

:data:`CHANNEL_OPTIONS` retries the five ``google.longrunning.Operations`` RPCs, which are
idempotent; :func:`channel_options` adds create methods whose requests carry a request id
(AIP-155), the only creates a retry cannot run twice. See docs/clients.md#retries and
docs/deploying.md.
"""

from __future__ import annotations

import json
import re

__all__ = ["CHANNEL_OPTIONS", "KEEPALIVE_TIME_MS", "RETRY_POLICY", "channel_options"]

#: The retry policy of every retried method (gRPC's service config ``retryPolicy``).
#: UNAVAILABLE is what a server that stops, drains or cannot be reached answers; CANCELLED too
#: while grpc/grpc#41785 is open (calls that reached a stopping server but were not yet
#: dispatched come back CANCELLED). gRPC caps ``maxAttempts`` at 5; a pause is random up to the
#: backoff, which doubles from 0.2 s: at most 3 s of pauses, 1.5 s on average.
RETRY_POLICY: dict[str, object] = {
    "maxAttempts": 5,
    "initialBackoff": "0.2s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
}

#: How often a client pings a connection that has calls in flight (a held WaitOperation, say)
#: to find a dead server or network path: 30 s. lrofw.SERVER_OPTIONS lets pings come every
#: 20 s; a server with grpc's defaults (one ping per 5 minutes without data) answers a long
#: hold with data before it would count three pings too many and send GOAWAY too_many_pings.
KEEPALIVE_TIME_MS = 30_000

_OPERATIONS = "google.longrunning.Operations"
_METHOD = re.compile(r"/?([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)/([A-Za-z_]\w*)")


def _method_name(method: object) -> dict[str, str]:
    """The service config ``name`` entry of ``"pkg.Service/Method"``."""
    if not isinstance(method, str):
        raise TypeError(
            "a create method must be a str like 'chromiumos.config.api.test.tls.Common/"
            f"ProvisionDut', got {type(method).__name__}"
        )
    match = _METHOD.fullmatch(method)
    if match is None:
        raise ValueError(
            "a create method must be a full method name like "
            f"'chromiumos.config.api.test.tls.Common/ProvisionDut', got {method[:200]!r}"
        )
    return {"service": match.group(1), "method": match.group(2)}


def channel_options(*create_methods: str) -> tuple[tuple[str, str | int], ...]:
    """Channel options for ``grpc.insecure_channel(target, options=...)`` (and
    ``grpc.secure_channel``, ``grpc.aio`` channels): :data:`CHANNEL_OPTIONS`, whose retries
    also cover ``create_methods``.

    Name only create methods whose requests carry a request id (``@long_running(...,
    request_id=...)``, AIP-155) and clients that set one: a retried create with the same id
    returns the operation the first attempt made, while a create without one may run twice.

    The options set ``grpc.service_config`` (retries, and a health check that round-robin
    load balancing uses to skip a draining server) and ``grpc.enable_retries``; a channel
    takes one service config, so merge yours into this one rather than passing two.

    Args:
        create_methods: full method names, ``"package.Service/Method"`` (a leading ``/``, as
            in ``"/package.Service/Method"``, is accepted too).

    Raises:
        TypeError: a method name is not a str.
        ValueError: a method name is not ``package.Service/Method``.

    Example:
        >>> options = lrofw.channel_options("chromiumos.config.api.test.tls.Common/ProvisionDut")
        >>> channel = grpc.insecure_channel("localhost:50051", options=options)
    """
    names = [{"service": _OPERATIONS}] + [_method_name(m) for m in create_methods]
    config = {
        "methodConfig": [{"name": names, "retryPolicy": RETRY_POLICY}],
        # Used by round_robin (not by the default pick_first): a server whose health turns
        # NOT_SERVING gets no new calls. A server without the health service counts as healthy.
        "healthCheckConfig": {"serviceName": ""},
    }
    return (
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(config, separators=(",", ":"))),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", 10_000),
    )


CHANNEL_OPTIONS: tuple[tuple[str, str | int], ...] = channel_options()
"""Channel options for clients of lrofw servers: the five Operations RPCs (Get, List, Wait,
Cancel, Delete; all idempotent) are retried on UNAVAILABLE (and CANCELLED, grpc/grpc#41785) with
backoff, round-robin channels skip servers whose health is NOT_SERVING, and keepalive pings stay
within lrofw.SERVER_OPTIONS. Creates are not retried: see :func:`channel_options`.

Example:
    >>> channel = grpc.insecure_channel("localhost:50051", options=lrofw.CHANNEL_OPTIONS)
    >>> channel = grpc.insecure_channel(
    ...     "ipv4:10.0.0.1:50051,10.0.0.2:50051",
    ...     options=[*lrofw.CHANNEL_OPTIONS, ("grpc.lb_policy_name", "round_robin")])
"""
