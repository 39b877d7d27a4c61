"""The RPC boundary, shared by every servicer path (decorated methods and the Operations service,
sync and asyncio): what an exception becomes on the wire, and request validation.

Expected failures (:class:`lrofw.OperationError`) keep their code and message; anything else is an
internal error whose text and traceback go to the log only, never to the client.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from . import errors
from ._access import Authorize, Caller
from .stores.base import StoreUnavailable

logger = logging.getLogger("lrofw")


def status_of(exc: BaseException, what: str) -> tuple[grpc.StatusCode, str]:
    """The (code, message) a client gets for ``exc`` raised while serving ``what``."""
    if isinstance(exc, errors.OperationError):
        return exc.code, exc.message
    if isinstance(exc, StoreUnavailable):
        logger.warning("%s: %s", what, exc)
        return grpc.StatusCode.UNAVAILABLE, f"{exc}; retry later"
    logger.error("internal error in %s", what, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error in {what}; details are in the server log"


def validate(check: Callable[[object], object] | None, request: object) -> None:
    """Run a method's ``validate`` hook: ValueError becomes INVALID_ARGUMENT with its message,
    an OperationError keeps its code, anything else is an internal error.

    Raises:
        errors.OperationError: the request is refused.
    """
    if check is None:
        return
    try:
        check(request)
    except errors.OperationError:
        raise
    except ValueError as exc:
        raise errors.InvalidArgument(str(exc) or "invalid request") from exc


#: How long before the caller's deadline a held call answers, so the answer arrives in time.
DEADLINE_MARGIN = 0.05


def deadline(context: Any) -> float | None:
    """Seconds left before the caller's deadline, or None when the call has none."""
    remaining = context.time_remaining()
    # grpc reports "no deadline" as a huge number (or None on some versions).
    return None if remaining is None or remaining > 10**8 else float(remaining)


#: ``identify(context) -> principal``: who makes a call (see ``lrofw.add_servicer_to_server``).
Identify = Callable[[Any], str]


@dataclass(frozen=True)
class Hooks:
    """A server's ``identify`` and ``authorize`` hooks (one pair per server)."""

    identify: Identify | None = None
    authorize: Authorize | None = None


def hooks(identify: Identify | None, authorize: Authorize | None) -> Hooks:
    """Check a registration's hooks and pair them.

    Raises:
        TypeError: a hook is not a plain callable.
        ValueError: ``authorize`` without ``identify`` (it would never be asked).
    """
    for what, hook in (("identify", identify), ("authorize", authorize)):
        if hook is None:
            continue
        if not callable(hook):
            raise TypeError(f"{what} must be callable, got {hook!r}")
        if inspect.iscoroutinefunction(hook):
            raise TypeError(f"{what} must be a plain function (def), not async def")
    if authorize is not None and identify is None:
        raise ValueError("authorize needs identify: without identify there are no principals")
    return Hooks(identify, authorize)


def caller_of(server_hooks: Hooks | None, context: Any) -> Caller | None:
    """Who makes this call: the one place every RPC lrofw serves (sync and asyncio) asks the
    server's ``identify`` hook. None when the server identifies nobody (one trusted caller).

    Raises:
        errors.OperationError: ``identify`` refused the call (UNAUTHENTICATED, say).
        TypeError: ``identify`` returned something other than a non-empty str.
        Exception: whatever else ``identify`` raised (an internal error for the client).
    """
    if server_hooks is None or server_hooks.identify is None:
        return None
    principal = server_hooks.identify(context)
    if not isinstance(principal, str) or not principal:
        # Only the type goes into the message (the log): the value may be a credential.
        got = "an empty str" if principal == "" else type(principal).__name__
        raise TypeError(f"identify must return a non-empty str principal, got {got}")
    return Caller(principal, server_hooks.authorize)
