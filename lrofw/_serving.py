"""lrofw.testing.serve: a real gRPC server on ``localhost:0``, in process (re-exported by
:mod:`lrofw.testing`, which also offers the kit's parts that need more than this)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from . import _check, _rpc
from ._access import Authorize
from ._rpc import Identify
from .manager import Manager
from .registration import add_servicer_to_server
from .servicer import (
    SERVER_OPTIONS,
    AsyncOperationsServicer,
    OperationsServicer,
    add_operations,
)

T = TypeVar("T")


@dataclass
class Served:
    """A running test server: its channel, ``host:port`` target, manager and grpc server.

    ``loop`` is the event loop an aio server runs on (None for a ``grpc.server``); ``run(coro)``
    runs a coroutine there and returns its result.
    """

    channel: grpc.Channel
    target: str
    manager: Manager
    server: Any
    loop: asyncio.AbstractEventLoop | None = None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run ``coro`` on the aio server's loop (only for ``aio=True``) and return its result."""
        if self.loop is None:
            raise RuntimeError("run() needs serve(..., aio=True)")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


class _LoopThread:
    """An event loop running forever on a daemon thread, until :meth:`stop`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@dataclass(frozen=True)
class _Setup:
    """What every server of one ``serve(...)`` call is given."""

    servicers: tuple[object, ...]
    manager: Manager
    grace: float | None
    identify: Identify | None
    authorize: Authorize | None
    health: bool = False
    reflection: bool = False


def _register(setup: _Setup, server: Any, aio: bool) -> int:
    hooks: dict[str, Any] = {"identify": setup.identify, "authorize": setup.authorize}
    if setup.servicers:
        for servicer in setup.servicers:
            add_servicer_to_server(
                servicer,
                server,
                manager=setup.manager,
                health=setup.health,
                reflection=setup.reflection,
                **hooks,
            )
    else:
        kind = AsyncOperationsServicer if aio else OperationsServicer
        add_operations(kind(setup.manager, **hooks), server)
    return int(server.add_insecure_port("localhost:0"))


@contextlib.contextmanager
def serve(
    *servicers: object,
    manager: Manager | None = None,
    rpc_threads: int = 16,
    grace: float | None = 1.0,
    aio: bool = False,
    identify: Identify | None = None,
    authorize: Authorize | None = None,
    health: bool = False,
    reflection: bool = False,
) -> Iterator[Served]:
    """Serve ``servicers`` (and the Operations service) on ``localhost:0`` until the block ends.

    A manager is made (in memory) when none is given; either way it is closed at the end, with
    ``manager.close(grace=grace)`` (the handlers still running get ``grace`` seconds; None: as
    long as they take). ``aio=True`` serves them from a ``grpc.aio`` server instead of a
    ``grpc.server`` with ``rpc_threads`` threads for RPCs (the manager's ``max_workers`` is how
    many handlers run at once). ``identify``, ``authorize``, ``health`` and ``reflection`` are as
    for :func:`lrofw.add_servicer_to_server` (``health`` and ``reflection`` need a servicer).

    Raises:
        TypeError, ValueError: an argument of the wrong type or out of range (the message names
            it), or a servicer :func:`lrofw.add_servicer_to_server` refuses.

    Example:
        >>> with serve(Common(), manager=lrofw.Manager(max_workers=2), aio=True) as srv:
        ...     stub = tls_pb2_grpc.CommonStub(srv.channel)
        >>> with serve(Common(), identify=lambda context: context.peer(), grace=0.1) as srv:
        ...     pass  # each peer sees only its own operations
    """
    if manager is not None:
        _check.instance("manager", manager, Manager, "an lrofw.Manager or None")
    rpc_threads = _check.count("rpc_threads", rpc_threads, 1)
    grace = _check.optional(_check.non_negative_seconds, "grace", grace)
    _check.flag("aio", aio)
    _check.flag("health", health)
    _check.flag("reflection", reflection)
    _rpc.hooks(identify, authorize)  # checked before anything starts
    manager = Manager() if manager is None else manager
    setup = _Setup(servicers, manager, grace, identify, authorize, health, reflection)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(manager.close, grace)  # also when registration fails
        yield from _serve(setup, rpc_threads, aio)


def _serve(setup: _Setup, rpc_threads: int, aio: bool) -> Iterator[Served]:
    manager = setup.manager
    if aio:
        with contextlib.ExitStack() as stack:
            server, port, loop = stack.enter_context(_aio_server(setup))
            channel = stack.enter_context(grpc.insecure_channel(f"localhost:{port}"))
            yield Served(channel, f"localhost:{port}", manager, server, loop)
        return
    server = grpc.server(ThreadPoolExecutor(rpc_threads), options=SERVER_OPTIONS)
    port = _register(setup, server, aio=False)
    server.start()
    channel = grpc.insecure_channel(f"localhost:{port}")
    try:
        yield Served(channel, f"localhost:{port}", manager, server)
    finally:
        channel.close()
        manager.close(grace=setup.grace)
        server.stop(grace=None).wait()


@contextlib.contextmanager
def _aio_server(setup: _Setup) -> Iterator[tuple[Any, int, asyncio.AbstractEventLoop]]:
    looper = _LoopThread()

    async def start() -> tuple[Any, int]:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        port = _register(setup, server, aio=True)
        await server.start()
        return server, port

    try:
        server, port = looper.run(start())
        try:
            yield server, port, looper.loop
        finally:
            looper.run(setup.manager.aclose(grace=setup.grace))
            looper.run(server.stop(None))
    finally:
        looper.stop()
