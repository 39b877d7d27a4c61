"""lrofw: long-running gRPC operations (google.longrunning, AIP-151) for Python services.

Example:
    >>> import lrofw
    >>> class Common(tls_pb2_grpc.CommonServicer):
    ...     @lrofw.long_running(tls_pb2.ProvisionDutResponse,
    ...                         metadata_type=tls_pb2.ProvisionDutMetadata)
    ...     def ProvisionDut(self, request, op):
    ...         return tls_pb2.ProvisionDutResponse()
    >>> lrofw.add_servicer_to_server(Common(), server, manager=lrofw.Manager())
"""

from . import aio
from ._access import Caller
from .channel import CHANNEL_OPTIONS, channel_options
from .client import OperationFuture, WaitPolicy, wait
from .context import AsyncOperationContext, OperationContext
from .decorator import long_running
from .errors import OperationCancelled, OperationError, OperationTimeout
from .manager import Manager
from .registration import add_servicer_to_server
from .servicer import (
    SERVER_OPTIONS,
    AsyncOperationsServicer,
    OperationsServicer,
)

__all__ = [
    "CHANNEL_OPTIONS",
    "SERVER_OPTIONS",
    "AsyncOperationContext",
    "AsyncOperationsServicer",
    "Caller",
    "Manager",
    "OperationCancelled",
    "OperationContext",
    "OperationError",
    "OperationFuture",
    "OperationTimeout",
    "OperationsServicer",
    "WaitPolicy",
    "add_servicer_to_server",
    "aio",
    "channel_options",
    "long_running",
    "wait",
]

__version__ = "0.1.0"
