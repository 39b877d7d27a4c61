"""The Store protocol: where operations live. Its contract is written here, once.

Stores know nothing of gRPC: they keep ``google.longrunning.Operation`` messages with a little
bookkeeping (the originating method, creation and finish times) and answer the manager's questions.

Contract every store keeps:

* **Copies.** Every operation a store returns is the caller's own copy; changing it changes nothing
  stored, and nothing the store does later changes it.
* **Atomic finish.** :meth:`Store.finish` is compare-and-set: it finishes an operation only if it
  exists and is not done, and says whether it did. A done operation never changes again; the first
  writer wins.
* **Metadata.** :meth:`Store.set_metadata` changes only an unfinished operation.
* **Idempotent removal.** :meth:`Store.delete` of a missing name returns False and changes nothing.
* **Ordering.** Every inserted operation gets a position, larger than every earlier one; listing is
  newest first (descending position) and a cursor is the position to continue below, so pages stay
  stable while operations are created or deleted between them.
* **Expiry.** :meth:`Store.expire` removes finished operations whose finish time is at or before a
  cutoff, in finish order, at most ``limit`` at a time; its cost grows with the number removed, not
  with the number stored. Unfinished operations never expire.
* **Threads.** Every method is safe to call from any thread at any time.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from google.longrunning import operations_proto_pb2 as operations_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2

Operation = operations_pb2.Operation

#: A predicate on a record's filter fields (see :func:`lrofw.listing.parse_filter`).
Predicate = Callable[[Mapping[str, object]], bool]


@dataclass(frozen=True)
class Record:
    """One stored operation as a store hands it out (the operation is the caller's copy).

    Example:
        >>> rec = store.get("operations/123")
        >>> rec.operation.done, rec.method
        (False, '/pkg.Service/Method')
    """

    operation: Operation
    method: str
    create_time: float
    done_time: float | None
    position: int

    def fields(self) -> dict[str, object]:
        """The values the listing filter sees for this operation."""
        return filter_fields(self.operation, self.method)


def filter_fields(op: Operation, method: str) -> dict[str, object]:
    """The values the listing filter (``lrofw.listing``) sees for an operation."""
    return {
        "done": op.done,
        "error.code": op.error.code if op.HasField("error") else 0,
        "method": method,
        "name": op.name,
    }


@runtime_checkable
class Store(Protocol):
    """Where a :class:`lrofw.Manager` keeps its operations. See the module docstring for the
    contract; the conformance tests in ``tests/test_stores.py`` check it for every store.

    Example:
        >>> from lrofw.stores import MemoryStore
        >>> manager = lrofw.Manager(store=MemoryStore())
    """

    def insert(self, operation: Operation, method: str, now: float) -> Record:
        """Add a new, unfinished operation. Raises KeyError if the name exists."""
        ...

    def get(self, name: str) -> Record | None:
        """The operation called ``name``, or None."""
        ...

    def set_metadata(self, name: str, metadata: any_pb2.Any) -> bool:
        """Replace an unfinished operation's metadata; False if missing or done."""
        ...

    def finish(
        self,
        name: str,
        now: float,
        *,
        response: any_pb2.Any | None = None,
        error: status_pb2.Status | None = None,
    ) -> Record | None:
        """Compare-and-set: finish ``name`` with exactly one of response/error if it exists and is
        not done, returning the finished record; otherwise None and nothing changes."""
        ...

    def delete(self, name: str) -> bool:
        """Remove ``name``; False if it was not there."""
        ...

    def list(
        self, predicate: Predicate, before: int | None, limit: int
    ) -> tuple[builtins.list[Record], int | None]:
        """Up to ``limit`` records matching ``predicate``, newest first, with positions below
        ``before`` (all when None); and the cursor for the next page, or None at the end."""
        ...

    def expire(self, cutoff: float, limit: int) -> builtins.list[str]:
        """Remove up to ``limit`` finished operations whose finish time is at or before ``cutoff``,
        oldest first; return their names."""
        ...

    def close(self) -> None:
        """Release resources; idempotent."""
        ...
