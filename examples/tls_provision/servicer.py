"""The ``Common`` service of the TLS example: ProvisionDut as a long-running operation.

A port of the example in ChromiumOS' Go ``infra/libs/lro``: one DUT, ``"some host"``, can be
provisioned; any other name fails with NOT_FOUND. Provisioning goes through three stages of
``step_seconds`` each and reports its progress as ``ProvisionDutMetadata`` before each stage.

It comes twice: :class:`Common`, a plain ``def`` handler for ``grpc.server``, and
:class:`AsyncCommon`, an ``async def`` handler for ``grpc.aio.server``. Both run the same
provisioning (:meth:`Provisioner.provisioning`, a generator that says how long to sleep before each
stage); the two handlers only differ in how they sleep.

Example::

    manager = lrofw.Manager(store=open_store("memory:"))
    server = grpc.server(ThreadPoolExecutor(max_workers=32), options=lrofw.SERVER_OPTIONS)
    lrofw.add_servicer_to_server(Common(step_seconds=0.5), server, manager=manager)

    server = grpc.aio.server(options=lrofw.SERVER_OPTIONS)   # in a coroutine
    lrofw.add_servicer_to_server(AsyncCommon(step_seconds=0.5), server, manager=manager)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Generator, Iterable

import grpc
import tls_pb2
import tls_pb2_grpc

import lrofw

logger = logging.getLogger("tls_provision.servicer")

#: The DUT the example knows how to provision (the name the Go original used).
KNOWN_DUT = "some host"

#: The stages of provisioning, in order; each takes ``step_seconds``.
STAGES = ("downloading", "flashing", "verifying")

#: A provisioning run: yields the seconds to sleep before the next stage, is sent whether that
#: sleep was cut short because the handler should stop, and returns the response.
Provisioning = Generator[float, bool, tls_pb2.ProvisionDutResponse]


def check_request(request: tls_pb2.ProvisionDutRequest) -> None:
    """Rejects a request before any operation exists (the RPC fails with INVALID_ARGUMENT).

    Raises:
        ValueError: ``name`` is empty.
    """
    if not request.name:
        raise ValueError("name must not be empty")


#: ``@long_running`` as both handlers declare it (applying it twice makes two independent methods).
#: No types: registration reads ProvisionDutResponse and ProvisionDutMetadata from tls.proto's
#: ``google.longrunning.operation_info`` (the same as ``long_running(tls_pb2.ProvisionDutResponse,
#: metadata_type=tls_pb2.ProvisionDutMetadata, ...)``, which it would check against the proto).
provision_dut = lrofw.long_running(
    validate=check_request,
    # Provisioning the same image again is harmless: if the server dies mid-run, a server
    # started on the same store runs it again instead of reporting ABORTED.
    resumable=True,
    # A client that retries a create with the same request_id gets the same operation.
    request_id=lambda request: request.request_id,
)


class Provisioner(tls_pb2_grpc.CommonServicer):
    """What :class:`Common` and :class:`AsyncCommon` share: the DUTs and the provisioning.

    Args:
        step_seconds: How long each of the three stages takes.
        duts: The DUT names that exist; any other name fails with NOT_FOUND.
    """

    def __init__(self, step_seconds: float = 1.0, duts: Iterable[str] = (KNOWN_DUT,)) -> None:
        if step_seconds < 0:
            raise ValueError(f"step_seconds must be >= 0, got {step_seconds}")
        self._step_seconds = step_seconds
        self._duts = frozenset(duts)
        self._lock = threading.Lock()
        self._running: dict[str, str] = {}

    def running(self) -> list[str]:
        """The operations being provisioned now, as ``NAME (STAGE)``: what the server names in
        its log when it exits without waiting for them."""
        with self._lock:
            return [f"{name} ({stage})" for name, stage in self._running.items()]

    def _at(self, name: str, stage: str | None) -> None:
        with self._lock:
            if stage is None:
                self._running.pop(name, None)
            else:
                self._running[name] = stage

    def provisioning(
        self, request: tls_pb2.ProvisionDutRequest, op: lrofw.OperationContext
    ) -> Provisioning:
        """Installs ``request.image_path`` on the DUT ``request.name``, stage by stage.

        Every decision and report is made here; the handler driving it only sleeps for what it
        yields and sends back whether the sleep was cut short.

        Raises:
            lrofw.OperationError: NOT_FOUND for a DUT that does not exist.
        """
        if request.name not in self._duts:
            raise lrofw.OperationError(grpc.StatusCode.NOT_FOUND, f"Unknown DUT {request.name}")
        try:
            for index, stage in enumerate(STAGES):
                percent = 100 * index // len(STAGES)
                self._at(op.name, stage)
                op.report(tls_pb2.ProvisionDutMetadata(stage=stage, percent=percent))
                logger.info("%s: provisioning %r: %s (%d%%)", op.name, request.name, stage, percent)
                if (yield self._step_seconds):
                    # Cancelled: the operation is already done with CANCELLED, and whatever is
                    # returned from here on is discarded. Stop at once.
                    logger.info(
                        "%s: provisioning %r: stopped during %s", op.name, request.name, stage
                    )
                    return tls_pb2.ProvisionDutResponse()
        finally:  # also when the handler drops the generator half-way
            self._at(op.name, None)
        op.report(tls_pb2.ProvisionDutMetadata(stage="done", percent=100))
        logger.info("%s: provisioning %r: installed %s", op.name, request.name, request.image_path)
        return tls_pb2.ProvisionDutResponse(installed_image=request.image_path)


class Common(Provisioner):
    """Provisions DUTs, each call a long-running operation run on the manager's threads."""

    @provision_dut
    def ProvisionDut(
        self, request: tls_pb2.ProvisionDutRequest, op: lrofw.OperationContext
    ) -> tls_pb2.ProvisionDutResponse:
        """Runs :meth:`provisioning`, sleeping with ``op.sleep``."""
        run = self.provisioning(request, op)
        try:
            seconds = next(run)
            while True:
                seconds = run.send(op.sleep(seconds))
        except StopIteration as done:
            response: tls_pb2.ProvisionDutResponse = done.value
            return response


class AsyncCommon(Provisioner):
    """Provisions DUTs, each call a long-running operation run as a task on the server's event
    loop (serve it with ``grpc.aio.server``)."""

    @provision_dut
    async def ProvisionDut(
        self, request: tls_pb2.ProvisionDutRequest, op: lrofw.AsyncOperationContext
    ) -> tls_pb2.ProvisionDutResponse:
        """Runs :meth:`provisioning`, sleeping with ``await op.sleep``."""
        run = self.provisioning(request, op)
        try:
            seconds = next(run)
            while True:
                try:
                    stopped = await op.sleep(seconds)
                except asyncio.CancelledError:
                    # Stopping the operation also cancels this task: let the provisioning see
                    # the stop (and log it) as the sync handler's does, then end as cancelled.
                    with contextlib.suppress(StopIteration):
                        run.send(True)
                    raise
                seconds = run.send(stopped)
        except StopIteration as done:
            response: tls_pb2.ProvisionDutResponse = done.value
            return response
