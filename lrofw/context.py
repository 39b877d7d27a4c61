"""OperationContext: what a running handler sees of its operation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

import grpc
from google.protobuf.message import Message

from . import _check, _core

logger = logging.getLogger("lrofw.manager")

#: Invocation metadata of the call that created the operation, as gRPC gives it.
Metadata = tuple[tuple[str, str | bytes], ...]

#: How a context publishes progress: ``report(name, metadata)`` -> stored (see ``report``).
Reporter = Callable[[str, Message], bool]


class StopSignal:
    """Tells a handler to stop: set once (by a cancel, a timeout or a closing manager), it wakes
    ``op.sleep`` and runs the stop callbacks. The manager's parts hold it; the handler sees it
    through its :class:`OperationContext`.

    Example:
        >>> signal = StopSignal("operations/1")
        >>> signal.set()
        >>> signal.is_set()
        True
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._reason: grpc.StatusCode | None = None

    @property
    def reason(self) -> grpc.StatusCode | None:
        """The code the operation was ended with by whoever set the signal (None: not said)."""
        return self._reason

    def is_set(self) -> bool:
        """True once the handler should stop."""
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for the signal; True if it is set."""
        return self._event.wait(max(0.0, timeout))

    def add(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` once set (at once if it is); returns what removes it again."""
        with self._lock:
            if not self._event.is_set():
                self._listeners.append(callback)
                return lambda: self._remove(callback)
        callback()
        return lambda: None

    def _remove(self, callback: Callable[[], None]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    def set(self, reason: grpc.StatusCode | None = None) -> None:
        """Signal the handler to stop (idempotent); ``reason``: the code its operation was
        ended with (for its trace). A stop callback that raises is logged: it neither keeps the
        others from running nor reaches whoever stopped the handler."""
        with self._lock:
            if self._event.is_set():
                return
            self._reason = reason
            self._event.set()
            listeners, self._listeners = self._listeners, []
        for callback in listeners:
            try:
                callback()
            except Exception:
                logger.exception(
                    "%s: a stop callback failed", self._name, extra=_core.about(self._name)
                )


class OperationContext:
    """Handed to a ``@long_running`` handler as its ``op`` argument.

    The handler runs on lrofw's own executor, not on the RPC that created the operation (that RPC
    has returned by then); what it may still want of the call is copied here.

    Attributes:
        name: the operation's name, e.g. ``operations/6f1c...``.
        method: the originating RPC's full name, e.g. ``/pkg.Service/Method``.
        invocation_metadata: the creating call's metadata (key, value) pairs.
        peer: the creating call's peer, e.g. ``ipv4:127.0.0.1:50412``.

    Example:
        >>> @lrofw.long_running(MyResponse, metadata_type=MyProgress)
        ... def Build(self, request, op: lrofw.OperationContext):
        ...     for step in range(10):
        ...         op.report(MyProgress(percent=step * 10))
        ...         if op.sleep(1.0):  # True: cancelled, stop now
        ...             break
        ...     return MyResponse()
    """

    def __init__(
        self,
        reporter: Reporter,
        stop: StopSignal,
        name: str,
        method: str,
        metadata_type: type[Message] | None,
        invocation_metadata: Metadata = (),
        peer: str = "",
    ) -> None:
        self._reporter = reporter
        self._signal = stop
        self._metadata_type = metadata_type
        self.name = name
        self.method = method
        self.invocation_metadata = invocation_metadata
        self.peer = peer

    @property
    def cancelled(self) -> bool:
        """True once the handler should stop: the operation was cancelled, ran past its timeout,
        or the server is closing. The operation is already done; what the handler returns from
        now on is discarded."""
        return self._signal.is_set()

    def report(self, metadata: Message) -> bool:
        """Publish progress: ``metadata`` becomes the operation's ``metadata`` at once, for
        GetOperation, ListOperations and waiting clients alike.

        It never raises a store's failure into handler code: when the store cannot take the
        report now, it is logged and dropped (the next report carries the newer state).

        Returns:
            False when the report was dropped: the operation is already done or was deleted, or
            the store could not be written; else True.

        Raises:
            TypeError: ``metadata`` is not of the method's ``metadata_type`` (or not a message).

        Example:
            >>> op.report(ProvisionDutMetadata(stage="flashing", percent=40))
            True
        """
        expected = self._metadata_type
        if expected is not None and not isinstance(metadata, expected):
            raise TypeError(
                f"report() expects {expected.DESCRIPTOR.full_name}, "
                f"got {type(metadata).__qualname__}"
            )
        if not isinstance(metadata, Message):
            raise TypeError(f"report() expects a protobuf message, got {type(metadata).__name__}")
        return self._reporter(self.name, metadata)

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking early when the handler should stop.

        Returns:
            True if it woke because the operation was cancelled (or timed out, or the server is
            closing), False if the full time passed.

        Example:
            >>> if op.sleep(5.0):
            ...     return MyResponse()  # discarded: the op is already CANCELLED
        """
        return self._signal.wait(_check.seconds("seconds", seconds))

    def add_stop_callback(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from any thread) once the handler should stop; at once if it
        already should. Returns a function that removes the callback again.

        Example:
            >>> remove = op.add_stop_callback(lambda: process.terminate())
        """
        return self._signal.add(callback)


class AsyncOperationContext(OperationContext):
    """The ``op`` of an ``async def`` handler: the same, with an awaitable :meth:`sleep`.

    Cancelling the operation also cancels the handler's task: it sees ``CancelledError`` at its
    next ``await`` (and the operation is already CANCELLED).

    On a store whose calls block (SQLite), :meth:`report` hands the write to a thread and
    returns True at once, so the event loop never waits for the file; reports that come while
    one waits replace it (the latest wins). On the memory store it is stored at once, as for a
    ``def`` handler.

    Example:
        >>> @lrofw.long_running(MyResponse)
        ... async def Build(self, request, op: lrofw.AsyncOperationContext):
        ...     op.report(MyProgress(percent=50))
        ...     await op.sleep(1.0)
        ...     return MyResponse()
    """

    async def sleep(self, seconds: float) -> bool:  # type: ignore[override]
        """Sleep up to ``seconds`` without blocking the event loop; True if the handler should
        stop (the task is usually cancelled first, raising ``CancelledError`` here).

        Example:
            >>> if await op.sleep(5.0):
            ...     return MyResponse()
        """
        seconds = _check.seconds("seconds", seconds)
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not woken.done():
                woken.set_result(None)

        def wake() -> None:
            _core.call_on_loop(loop, settle, direct=True)

        remove = self.add_stop_callback(wake)
        try:
            await asyncio.wait({woken}, timeout=max(0.0, seconds))
        finally:
            remove()
        return self.cancelled
