"""Testing kit: a real gRPC server on ``localhost:0``, in process, for your tests and ours.

``serve(..., aio=True)`` runs a ``grpc.aio`` server on an event loop of its own (in a background
thread), so one synchronous test can exercise both kinds of server through the same channel.
``call_handler(servicer.Method, request)`` runs one handler's body without a server and returns
how its operation would end (:class:`HandlerResult`).

Example:
    >>> from lrofw.testing import serve
    >>> with serve(Common()) as srv:
    ...     stub = tls_pb2_grpc.CommonStub(srv.channel)
    ...     op = stub.ProvisionDut(tls_pb2.ProvisionDutRequest(name="some host"))
    ...     lrofw.wait(srv.channel, op.name, timeout=10)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._handler_call import HandlerResult as HandlerResult
from ._handler_call import call_handler as call_handler
from ._serving import Served as Served
from ._serving import serve as serve

#: ``OperationMachine`` is left out: it needs Hypothesis, and ``import *`` must work without it.
__all__ = ["HandlerResult", "Served", "call_handler", "serve"]

if TYPE_CHECKING:  # at run time it comes from __getattr__, only when asked for (hypothesis)
    from ._machine import OperationMachine as OperationMachine


def __getattr__(name: str) -> Any:
    """``OperationMachine`` (lrofw._machine), imported when first asked for: it needs hypothesis,
    which plain ``lrofw.testing`` does not."""
    if name == "OperationMachine":
        try:
            from ._machine import OperationMachine
        except ModuleNotFoundError as exc:
            if exc.name != "hypothesis" and not str(exc.name).startswith("hypothesis."):
                raise
            raise ImportError(
                "lrofw.testing.OperationMachine needs Hypothesis: pip install 'lrofw[testing]'"
            ) from exc
        return OperationMachine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
