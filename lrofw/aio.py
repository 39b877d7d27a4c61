"""asyncio clients: :func:`wait` and :class:`OperationFuture` over ``grpc.aio`` channels.

They are the twins of :func:`lrofw.wait` and :class:`lrofw.OperationFuture`: every decision
(holds, pauses, retries, giving up, results and errors) is made by the same code in
:mod:`lrofw.client`; only the waiting here awaits.

Example:
    >>> async with grpc.aio.insecure_channel(target) as channel:
    ...     op = await tls_pb2_grpc.CommonStub(channel).ProvisionDut(request)
    ...     done = await lrofw.aio.wait(channel, op.name, timeout=600)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from typing import Any

import grpc

from . import _check, errors
from ._client_args import CallMetadata, call_metadata, check_name
from .client import (
    DEFAULT_POLICY,
    Action,
    FutureState,
    Operation,
    ResponseT,
    Sleep,
    WaitPolicy,
    _stub,
    advance,
    request_for,
    rpc_of,
    wait_plan,
)

__all__ = ["OperationFuture", "WaitPolicy", "wait"]


async def wait(
    channel_or_stub: Any,
    name: str,
    *,
    timeout: float | None = None,
    policy: WaitPolicy = DEFAULT_POLICY,
    metadata: CallMetadata | None = None,
) -> Operation:
    """Await the operation until it is done and return it; :func:`lrofw.wait` for asyncio, with
    the same arguments (``metadata`` goes with every call) and the same timeout rule.

    Raises:
        OperationTimeout: not done within ``timeout``; ``.operation`` holds the latest state.
        OperationError: the subclass for a failed call's code (e.g. ``NotFound``).

    Example:
        >>> op = await lrofw.aio.wait(channel, name, timeout=60, metadata=[("x-user", "alice")])
    """
    stub = _stub(channel_or_stub)
    name, sent = check_name(name), call_metadata(metadata)
    plan = wait_plan(name, timeout, policy=policy)
    step = advance(plan, None)
    while not isinstance(step, Operation):
        step = advance(plan, await _carry_out(stub, name, step, sent))
    return step


async def _carry_out(stub: Any, name: str, step: Action, metadata: CallMetadata | None) -> object:
    if isinstance(step, Sleep):
        await asyncio.sleep(step.seconds)
        return None
    try:
        return await rpc_of(stub, step)(
            request_for(step, name), timeout=step.deadline, metadata=metadata
        )
    except grpc.RpcError as exc:
        return exc


class OperationFuture(FutureState[ResponseT]):
    """An awaitable future for one operation: ``await fut`` is ``await fut.result()``; generic
    in the response type as :class:`lrofw.OperationFuture` is, with the same constructor.

    Args:
        channel: a ``grpc.aio`` channel (or an ``OperationsStub`` made on one).
        operation: the Operation the creating RPC returned, or an operation's name (str).
        response_type: the message class of the result.
        metadata_type: the message class of progress metadata, if any.
        metadata: gRPC metadata sent with every call the future makes.

    Example:
        >>> fut = lrofw.aio.OperationFuture(channel, op, tls_pb2.ProvisionDutResponse)
        >>> fut.add_done_callback(lambda f: print("done", f.name))
        >>> response = await fut
        >>> same = lrofw.aio.OperationFuture(channel, op.name, tls_pb2.ProvisionDutResponse)
    """

    def __await__(self) -> Generator[Any, None, ResponseT]:
        return self.result().__await__()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds; True if the operation is done, False if ``timeout``
        passed first (0: ask once; None: no limit)."""
        timeout = _check.timeout(timeout)
        if not self._op.done:
            try:
                self._seen(
                    await wait(self._stub, self.name, timeout=timeout, metadata=self._sent)
                )
            except errors.OperationTimeout as exc:
                self._seen(exc.operation)
            if self._op.done:
                self._run_callbacks()
        return self._op.done

    async def done(self) -> bool:
        """True if the operation is done (asks the server once if not known yet)."""
        return await self.wait(timeout=0)

    async def running(self) -> bool:
        """True while the operation is not done: ``not await done()``; as
        :meth:`lrofw.OperationFuture.running`."""
        return not await self.done()

    async def result(self, timeout: float | None = None) -> ResponseT:
        """The response; raises the operation's error as an OperationError subclass."""
        return self._result(await self.wait(timeout), timeout)

    async def exception(self, timeout: float | None = None) -> errors.OperationError | None:
        """The operation's error as an OperationError, or None if it succeeded."""
        return self._error(await self.wait(timeout), timeout)

    async def cancel(self) -> bool:
        """Ask the server to cancel; True if the operation ended cancelled."""
        if not self._op.done:
            try:
                await self._stub.CancelOperation(
                    self._cancel_request(self.name), metadata=self._sent
                )
            except grpc.RpcError as exc:
                raise errors.from_rpc_error(exc) from exc
            await self.done()
        return self.cancelled()

    def add_done_callback(self, fn: Callable[[OperationFuture[ResponseT]], object]) -> None:
        """Call ``fn(self)`` on the event loop once the operation is done (at once if it is), as
        :meth:`lrofw.OperationFuture.add_done_callback` does from a thread."""
        if self._settled():
            fn(self)
            return
        self._callbacks.append(fn)
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())  # kept alive

    async def _watch(self) -> None:
        try:
            await self.wait()
        except Exception as exc:
            self._failure = exc  # cannot finish any more: callbacks run all the same
        self._run_callbacks()

    def _run_callbacks(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)
