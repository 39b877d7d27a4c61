"""The Store protocol: where operations live. Its contract is written here, once.

Stores know nothing of gRPC: they keep ``google.longrunning.Operation`` messages with a little
bookkeeping (the originating method, times, the owner that runs it) and answer the manager's
questions. ``tests/test_stores.py`` checks this contract for every store, unchanged.

The contract every store keeps:

* **Copies.** Every operation a store returns is the caller's own copy; changing it changes nothing
  stored, and nothing the store does later changes it.
* **Atomic finish.** :meth:`Store.finish` is compare-and-set: it finishes an operation only if it
  exists and is not done, and says whether it did. A done operation never changes again; the first
  writer wins, across threads and (for shared stores) across processes.
* **Metadata.** :meth:`Store.set_metadata` changes only an unfinished operation.
* **Fencing.** :meth:`Store.finish` and :meth:`Store.set_metadata` take an optional ``owner``:
  given, the write happens only while the operation's owner is still that owner (a manager that
  lost its claim, say cut off from a shared store while a peer took the operation over, cannot
  overwrite what the peer does). None (the default) writes whoever owns it: cancels, and
  completions made through the manager's API.
* **Atomic, idempotent create.** :meth:`Store.insert` either adds the operation or changes nothing.
  With a ``request_key`` (AIP-155 ``request_id``), a second insert with the same key adds nothing
  and raises :class:`DuplicateRequest` naming the existing operation and its request hash.
* **Idempotent removal.** :meth:`Store.delete` of a missing name returns False and changes nothing.
* **Methods** are kept as :func:`normalize_method` gives them (``pkg.S/M`` becomes ``/pkg.S/M``),
  so a filter on ``method`` matches with or without the slash.
* **Ordering.** Every inserted operation gets a position larger than every earlier one (positions
  are never reused); listing is newest first (descending position) and a cursor is the position to
  continue below, so pages stay stable while operations are created or deleted between them.
* **Filters.** :meth:`Store.list` takes the parsed filter of :mod:`lrofw.listing`; a store may
  evaluate it in Python (``node.matches``) or compile it to its query language, with the same
  result.
* **Expiry.** :meth:`Store.expire` removes finished operations whose finish time is at or before a
  cutoff, oldest first, at most ``limit`` at a time; its cost grows with the number removed, not
  with the number stored. Unfinished operations never expire.
* **Ownership.** Each unfinished operation may have an owner (a manager's id). An owner keeps its
  claim alive with :meth:`Store.renew`; :meth:`Store.orphans` lists unfinished operations whose
  owner's lease has lapsed (or that have no live owner), and :meth:`Store.claim` takes one over,
  compare-and-set on the old owner, so two live managers never take each other's operations.
  A claim from a lost owner (``old_owner`` not None) counts one more loss in the operation's
  ``lost`` count (shown by :class:`Orphan`); :meth:`Store.hand_over` is the graceful opposite:
  an owner that is stopping clears its own claim on a still-running operation, which is then an
  orphan at once for any manager and counts no loss.
* **Principals.** An operation may record the principal (the caller) that created it
  (:attr:`NewOperation.principal`, :attr:`Record.principal`); it never changes. :meth:`Store.list`
  with ``principal`` lists only that principal's operations.
* **Requests.** A stored request (:attr:`NewOperation.request`) is kept only while it can be
  needed: it is dropped when the operation finishes. The request hash of an idempotency key stays
  as long as the operation.
* **Bounded listing.** One :meth:`Store.list` call examines at most ``max_scan`` records and returns
  at most about ``max_bytes`` of serialized operations (always at least one matching record when
  there is one within the scan); when it stops early it returns the cursor to go on from, so a
  page may be short (even empty) with a cursor (AIP-158). No store-wide lock is held for a
  whole scan.
* **Change detection.** :meth:`Store.version` changes whenever another connection (another
  process) has changed the store: at once on a store in one file (SQLite); a moment later on a
  store shared across machines, which learns of changes by notification (PostgreSQL: within
  milliseconds for finishes, cancels, deletes and hand-overs, and at its slow tick for the rest
  and for notifications that were lost). It is cheap (no round trip to a server): the manager
  calls it every ``poll_interval``. A store that learns of changes by notification may also
  offer ``on_change(callback)`` (optional): it calls ``callback()`` (from any thread, quickly)
  each time its ``version()`` moves, so the manager looks at once instead of at its next poll.
  :meth:`Store.states` answers, for many names at once, which
  exist and which are done. A manager on a shared store polls them to wake its waiters and stop
  its handlers when another process finishes, cancels or deletes an operation.
* **Failures.** A store raises :class:`StoreUnavailable` when a call cannot be carried out now
  (disk full, read-only, locked too long) and leaves nothing half-written; it raises
  :class:`StoreOpenError` when it cannot be opened at all, with a message that says why.
  It raises :class:`StoreCorrupted` when a call finds its data damaged (never a backend's own
  error), with a message that names the store and says what to do.
* **Threads.** Every method is safe to call from any thread at any time.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from google.longrunning import operations_proto_pb2 as operations_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2

from .. import _core
from ..listing import Node

Operation = operations_pb2.Operation


class StoreError(Exception):
    """Base of the errors a store raises."""


class StoreOpenError(StoreError):
    """The store cannot be opened (bad path, not a database, a newer schema than this code)."""


class StoreUnavailable(StoreError):
    """This call cannot be carried out now; nothing was changed. Clients see UNAVAILABLE."""


class StoreCorrupted(StoreError):
    """The store's data is damaged (a SQLite file whose pages are malformed, say): this call
    cannot be answered, and retrying will not help. Clients see DATA_LOSS; the operator must
    restore the store from a backup.

    Example:
        >>> try:
        ...     store.get("operations/123")
        ... except StoreCorrupted as exc:
        ...     logger.error("restore the store: %s", exc)
    """


class DuplicateRequest(StoreError):
    """An insert repeated a ``request_key``: ``record`` is the operation that key created."""

    def __init__(self, record: Record, request_hash: bytes | None) -> None:
        super().__init__(f"request already seen: {record.operation.name}")
        self.record = record
        self.request_hash = request_hash


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
    #: The principal that created it, or None (created without one).
    principal: str | None = None

    def fields(self) -> dict[str, object]:
        """The values the listing filter sees for this operation."""
        return filter_fields(self.operation, self.method)


@dataclass(frozen=True)
class Orphan:
    """An unfinished operation whose owner's lease has lapsed (see :meth:`Store.orphans`)."""

    name: str
    method: str
    owner: str | None
    request: bytes | None
    #: How many times it lost its owner before (claims from a lost owner; hand-overs not counted).
    lost: int = 0


@dataclass(frozen=True)
class NewOperation:
    """What :meth:`Store.insert` stores besides the operation itself.

    Attributes:
        method: the originating RPC's full name (``/pkg.Service/Method``), or "".
        owner: the id of the manager that runs it, or None.
        request: the serialized request, kept only for resumable methods.
        request_key: the idempotency key (method and AIP-155 request_id), or None.
        request_hash: a digest of the request, to tell a true repeat from a reused id.
        principal: the caller that created it (None: no identity in use).
    """

    method: str = ""
    owner: str | None = None
    request: bytes | None = None
    request_key: str | None = None
    request_hash: bytes | None = None
    principal: str | None = None


def normalize_method(method: str) -> str:
    """A method's full name as stores keep it: with its leading ``/`` (or empty)."""
    return method if not method or method.startswith("/") else "/" + method


def filter_fields(op: Operation, method: str) -> dict[str, object]:
    """The values the listing filter (``lrofw.listing``) sees for an operation."""
    return fields_of(op.done, _core.error_code(op), method, op.name)


def fields_of(done: bool, error_code: int, method: str, name: str) -> dict[str, object]:
    """:func:`filter_fields` from the values themselves (a store that keeps them beside the
    operation need not parse it)."""
    return {"done": done, "error.code": error_code, "method": method, "name": name}


@runtime_checkable
class Store(Protocol):
    """Where a :class:`lrofw.Manager` keeps its operations. The module docstring is the contract.

    Example:
        >>> from lrofw.stores import SQLiteStore
        >>> manager = lrofw.Manager(store=SQLiteStore("ops.db"))
    """

    #: True when other processes may change the store (the manager then watches it).
    shared: bool
    #: True when calls may wait for I/O (a file, a database): an asyncio server then makes them
    #: from threads, never from its event loop. Optional; a store without it counts as blocking.
    #: A blocking store may also have coroutines ``insert_async(operation, now, new)`` and
    #: ``finish_async(name, now, *, response, error, owner)``, the same calls made without
    #: blocking an event loop: an asyncio server then awaits them on its loop instead of handing
    #: the create and an async handler's outcome to a thread (the SQLite and PostgreSQL stores
    #: have them).
    blocking: bool

    def insert(self, operation: Operation, now: float, new: NewOperation) -> Record:
        """Add a new, unfinished operation.

        Raises:
            KeyError: the name exists.
            DuplicateRequest: ``new.request_key`` was used before.
        """
        ...

    def get(self, name: str) -> Record | None:
        """The operation called ``name``, or None."""
        ...

    def set_metadata(self, name: str, metadata: any_pb2.Any, *, owner: str | None = None) -> bool:
        """Replace an unfinished operation's metadata; False if missing or done (or, with
        ``owner``, owned by another owner or none)."""
        ...

    def finish(
        self,
        name: str,
        now: float,
        *,
        response: any_pb2.Any | None = None,
        error: status_pb2.Status | None = None,
        owner: str | None = None,
    ) -> Record | None:
        """Compare-and-set: finish ``name`` with exactly one of response/error if it exists and is
        not done (and, with ``owner``, is still owned by ``owner``), returning the finished
        record; otherwise None and nothing changes."""
        ...

    def delete(self, name: str) -> bool:
        """Remove ``name``; False if it was not there."""
        ...

    def list(
        self,
        where: Node,
        before: int | None,
        limit: int,
        *,
        principal: str | None = None,
        max_scan: int | None = None,
        max_bytes: int | None = None,
    ) -> tuple[builtins.list[Record], int | None]:
        """Up to ``limit`` records matching ``where`` (and created by ``principal``, when given),
        newest first, with positions below ``before`` (all when None); and the cursor for the
        next page, or None at the end. At most ``max_scan`` records are examined and about
        ``max_bytes`` returned (None: no bound); a page cut short by either has a cursor."""
        ...

    def expire(self, cutoff: float, limit: int) -> builtins.list[str]:
        """Remove up to ``limit`` finished operations whose finish time is at or before ``cutoff``,
        oldest first; return their names."""
        ...

    def renew(self, owner: str, lease_until: float) -> None:
        """Record that ``owner`` is alive until ``lease_until`` (wall-clock seconds). A store may
        forget owners whose lease lapsed long ago (their operations are orphans either way)."""
        ...

    def release(self, owner: str) -> None:
        """Forget ``owner``'s lease (it stopped); its unfinished operations become orphans."""
        ...

    def orphans(self, now: float, limit: int) -> builtins.list[Orphan]:
        """Up to ``limit`` unfinished operations whose owner has no lease valid at ``now``."""
        ...

    def claim(self, name: str, old_owner: str | None, new_owner: str) -> bool:
        """Make ``new_owner`` the owner of unfinished ``name`` if its owner is still
        ``old_owner``; False (and no change) otherwise. A claim with ``old_owner`` not None
        counts one more loss (:attr:`Orphan.lost`)."""
        ...

    def hand_over(self, name: str, owner: str) -> bool:
        """Clear ``owner``'s claim on unfinished ``name`` (it is stopping and hands the
        operation on): it is an orphan at once, and no loss is counted. False (and no change)
        when ``name`` is missing, done, or not owned by ``owner``."""
        ...

    def version(self) -> int:
        """A number that changes when another connection has changed the store."""
        ...

    def states(self, names: Iterable[str]) -> dict[str, bool]:
        """For each name that exists, whether it is done; missing names are left out."""
        ...

    def token_key(self) -> bytes:
        """The secret that signs page tokens, the same for every process sharing the store."""
        ...

    def close(self) -> None:
        """Release resources; idempotent."""
        ...
