"""The standard health service (``grpc.health.v1.Health``, from grpcio-health-checking) for a
server that serves operations: SERVING while it serves, NOT_SERVING from the moment its manager
begins to close (:meth:`lrofw.Manager.on_close`), so load balancers and clients with health
checks move to other servers before new operations are refused.

Registered by ``lrofw.add_servicer_to_server(..., health=True)``, once per server; the overall
server (``""``) and every service lrofw registers on it are reported.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import weakref
from collections.abc import Iterable
from typing import Any

import grpc

from .manager import Manager

logger = logging.getLogger("lrofw")

#: The health service's full name (as reflection lists it).
HEALTH_SERVICE = "grpc.health.v1.Health"

#: What to install when grpcio-health-checking is missing.
_INSTALL = "health=True needs grpcio-health-checking: pip install 'lrofw[health]'"


class Health:
    """The health service of one server, following one manager.

    Args:
        server: the ``grpc.server`` or ``grpc.aio.server`` to register it on.
        manager: the manager whose closing turns every service NOT_SERVING.
        aio: ``server`` is a ``grpc.aio`` server (then this must be made on its event loop).

    Raises:
        ImportError: grpcio-health-checking is not installed.
        RuntimeError: an aio server, but no event loop is running here.

    Example:
        >>> health = Health(server, manager, aio=False)
        >>> health.serving(["chromiumos.config.api.test.tls.Common"])
    """

    def __init__(self, server: Any, manager: Manager, *, aio: bool) -> None:
        try:
            from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        except ImportError as exc:
            raise ImportError(_INSTALL) from exc
        self._statuses = health_pb2.HealthCheckResponse
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servicer: Any
        if aio:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(
                    "add_servicer_to_server(..., health=True) on a grpc.aio server must be "
                    "called from a coroutine on the server's event loop"
                ) from None
            # health.py re-exports _async as aio (its stubs do not say so).
            self._servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        else:
            self._servicer = health.HealthServicer()
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future[None]] = set()
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)
        manager.on_close(self._not_serving)

    def serving(self, services: Iterable[str]) -> None:
        """Report ``services`` SERVING (ignored once the manager began to close: the health
        service's own rule after its graceful shutdown)."""
        for service in services:
            self._apply("set", service, self._statuses.SERVING)

    def _not_serving(self) -> None:
        """Every service NOT_SERVING, for good (the manager began to close)."""
        self._apply("enter_graceful_shutdown")

    def _apply(self, what: str, *args: Any) -> None:
        method = getattr(self._servicer, what)
        if self._loop is None:
            method(*args)
            return
        # The aio servicer's methods are coroutines of the server's loop; this may be called
        # from any thread (a manager closes from a thread). They run in the order asked.
        try:
            future = asyncio.run_coroutine_threadsafe(method(*args), self._loop)
        except RuntimeError:  # the loop is closed: nobody is left to ask
            logger.debug("health: the event loop is closed; %s not applied", what)
            return
        with self._lock:
            self._pending.add(future)  # kept until it ran
        future.add_done_callback(self._ran)

    def _ran(self, future: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._pending.discard(future)
        if not future.cancelled() and future.exception() is not None:
            logger.error("health: a status change failed", exc_info=future.exception())


_served: weakref.WeakKeyDictionary[Any, Health] = weakref.WeakKeyDictionary()


def add_health(server: Any, manager: Manager, services: Iterable[str]) -> None:
    """Register the health service on ``server`` (once) and report ``services`` and the
    overall server (``""``) SERVING until ``manager`` begins to close.

    Example:
        >>> add_health(server, manager, ["google.longrunning.Operations"])
    """
    health = _served.get(server)
    if health is None:
        health = Health(server, manager, aio=isinstance(server, grpc.aio.Server))
        _served[server] = health
    health.serving(["", *services])
