"""gRPC server reflection (grpcio-reflection) for a server that serves operations, so tools
such as ``grpcurl -plaintext HOST:PORT list`` find its services.

Registered by ``lrofw.add_servicer_to_server(..., reflection=True)``, once per server; each
servicer added later with ``reflection=True`` adds its service to the list.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any

import grpc

#: What to install when grpcio-reflection is missing.
_INSTALL = "reflection=True needs grpcio-reflection: pip install 'lrofw[reflection]'"

_served: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def add_reflection(server: Any, services: Iterable[str]) -> None:
    """Serve reflection on ``server`` (once) and list ``services`` in it, with the reflection
    service itself.

    Raises:
        ImportError: grpcio-reflection is not installed.

    Example:
        >>> add_reflection(server, ["google.longrunning.Operations"])
    """
    try:
        from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
    except ImportError as exc:
        raise ImportError(_INSTALL) from exc
    with _lock:
        servicer = _served.get(server)
        if servicer is None:
            aio = isinstance(server, grpc.aio.Server)
            # What reflection.enable_server_reflection registers, kept to add names later: it
            # takes the names once (grpc routes a service to the first handler registered).
            # reflection re-exports _async as aio (its stubs do not say so).
            aio_kind = reflection.aio.ReflectionServicer  # type: ignore[attr-defined]
            kind = aio_kind if aio else reflection.ReflectionServicer
            servicer = kind([reflection.SERVICE_NAME])
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
            _served[server] = servicer
        # The servicer lists the tuple of names it was made with (grpcio-reflection's
        # BaseReflectionServicer._service_names), sorted: the one field to widen.
        names = set(servicer._service_names) | set(services)
        servicer._service_names = tuple(sorted(names))
