"""Who may see an operation: the one place that decides.

With an ``identify`` hook on the server, every RPC has a :class:`Caller`; without one there is no
caller (``None``): one trusted client that sees everything, as before identity existed. An
operation the caller may not see does not exist for it: the manager answers NOT_FOUND with the
same message as for a missing name (:func:`not_found_message`), so nothing tells the two apart.

Knows no gRPC: the servicer builds the caller from the call, the manager asks :func:`may_see`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

#: ``authorize(principal, owner)``: may ``principal`` see and act on an operation created by
#: ``owner`` (None: created without a principal)?
Authorize = Callable[[str, "str | None"], bool]


@dataclass(frozen=True)
class Caller:
    """The principal an RPC comes from, and the policy that widens what it may see.

    Servers build one per RPC from their ``identify`` hook (see
    :func:`lrofw.add_servicer_to_server`); code driving a :class:`lrofw.Manager` by hand passes
    one to its ``get``, ``list``, ``cancel``, ``delete`` and ``wait`` to act for that principal.

    Attributes:
        principal: who is calling (non-empty).
        authorize: ``authorize(principal, owner)`` decides; None: only the operations the
            principal created itself.

    Example:
        >>> alice = lrofw.Caller("alice")
        >>> manager.get(name, caller=alice)  # NOT_FOUND unless alice created it
        >>> admin = lrofw.Caller("root", authorize=lambda who, owner: who == "root" or who == owner)
        >>> ops, token = manager.list(caller=admin)  # everything
    """

    principal: str
    authorize: Authorize | None = None


def may_see(caller: Caller | None, owner: str | None) -> bool:
    """Whether ``caller`` may see and act on an operation created by ``owner``.

    No caller (no identity in use) sees everything; without an ``authorize`` hook a caller sees
    exactly what it created (an operation created without a principal is nobody's).

    Example:
        >>> may_see(Caller("alice"), "alice"), may_see(Caller("alice"), "bob")
        (True, False)
    """
    if caller is None:
        return True
    if caller.authorize is None:
        return caller.principal == owner
    return bool(caller.authorize(caller.principal, owner))


def not_found_message(name: str) -> str:
    """What NOT_FOUND says for ``name``, whether it is missing or only hidden from the caller.

    Example:
        >>> not_found_message("operations/1")
        'operation operations/1 not found'
    """
    return f"operation {name} not found"
