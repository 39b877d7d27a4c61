"""The ``Common`` service of the TLS example: ProvisionDut as a long-running operation.

A port of the example in ChromiumOS' Go ``infra/libs/lro``: one DUT, ``"some host"``, can be
provisioned; any other name fails with NOT_FOUND. Provisioning goes through three stages of
``step_seconds`` each and reports its progress as ``ProvisionDutMetadata`` before each stage.

Example::

    manager = lrofw.Manager(store=open_store("memory:"))
    server = grpc.server(ThreadPoolExecutor(max_workers=32), options=lrofw.SERVER_OPTIONS)
    lrofw.add_servicer_to_server(Common(step_seconds=0.5), server, manager=manager)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import grpc
import tls_pb2
import tls_pb2_grpc

import lrofw

logger = logging.getLogger("tls_provision.servicer")

#: The DUT the example knows how to provision (the name the Go original used).
KNOWN_DUT = "some host"

#: The stages of provisioning, in order; each takes ``step_seconds``.
STAGES = ("downloading", "flashing", "verifying")


def check_request(request: tls_pb2.ProvisionDutRequest) -> None:
    """Rejects a request before any operation exists (the RPC fails with INVALID_ARGUMENT).

    Raises:
        ValueError: ``name`` is empty.
    """
    if not request.name:
        raise ValueError("name must not be empty")


class Common(tls_pb2_grpc.CommonServicer):
    """Provisions DUTs, each call a long-running operation.

    Args:
        step_seconds: How long each of the three stages takes.
        duts: The DUT names that exist; any other name fails with NOT_FOUND.
    """

    def __init__(self, step_seconds: float = 1.0, duts: Iterable[str] = (KNOWN_DUT,)) -> None:
        if step_seconds < 0:
            raise ValueError(f"step_seconds must be >= 0, got {step_seconds}")
        self._step_seconds = step_seconds
        self._duts = frozenset(duts)

    @lrofw.long_running(
        tls_pb2.ProvisionDutResponse,
        metadata_type=tls_pb2.ProvisionDutMetadata,
        validate=check_request,
        # Provisioning the same image again is harmless: if the server dies mid-run, a server
        # started on the same store runs it again instead of reporting ABORTED.
        resumable=True,
        # A client that retries a create with the same request_id gets the same operation.
        request_id=lambda request: request.request_id,
    )
    def ProvisionDut(
        self, request: tls_pb2.ProvisionDutRequest, op: lrofw.OperationContext
    ) -> tls_pb2.ProvisionDutResponse:
        """Installs ``request.image_path`` on the DUT ``request.name``, stage by stage."""
        if request.name not in self._duts:
            raise lrofw.OperationError(grpc.StatusCode.NOT_FOUND, f"Unknown DUT {request.name}")
        for index, stage in enumerate(STAGES):
            percent = 100 * index // len(STAGES)
            op.report(tls_pb2.ProvisionDutMetadata(stage=stage, percent=percent))
            logger.info("%s: provisioning %r: %s (%d%%)", op.name, request.name, stage, percent)
            if op.sleep(self._step_seconds):
                # Cancelled: the operation is already done with CANCELLED, and whatever is
                # returned from here on is discarded. Stop at once.
                logger.info("%s: provisioning %r: stopped during %s", op.name, request.name, stage)
                return tls_pb2.ProvisionDutResponse()
        op.report(tls_pb2.ProvisionDutMetadata(stage="done", percent=100))
        logger.info("%s: provisioning %r: installed %s", op.name, request.name, request.image_path)
        return tls_pb2.ProvisionDutResponse(installed_image=request.image_path)
