"""The in-memory store: fast, per process, gone when the process ends."""

from __future__ import annotations

import bisect
import builtins
import dataclasses
import heapq
import os
import sys
import threading
import time
from collections.abc import Container, Iterable

from google.protobuf import any_pb2
from google.rpc import status_pb2

from .. import _core
from ..listing import Node, compile_filter
from .base import (
    DuplicateRequest,
    NewOperation,
    Operation,
    Orphan,
    Record,
    fields_of,
    normalize_method,
)


class _Entry:
    """One stored operation, kept small: a million finished ones fit in well under 1 GB.

    The operation is kept serialized (about 150 bytes where a protobuf message costs about 900);
    a read parses a fresh copy, so nothing stored is ever handed out. What listing filters and
    ownership need is kept beside it, so they never parse. ``new`` holds the rarely used request
    fields (None for most operations); the method and owner strings are shared by every entry.
    """

    __slots__ = (
        "create_time", "data", "done", "done_time", "error_code", "lost", "method", "name", "new",
        "owner", "position", "principal",
    )  # fmt: skip

    def __init__(
        self, op: Operation, new: NewOperation, method: str, create_time: float, position: int
    ) -> None:
        self.name: str = op.name
        self.data = op.SerializeToString()
        self.done = op.done
        self.error_code = _core.error_code(op)
        self.method = method
        self.owner = new.owner
        self.principal = new.principal
        self.lost = 0
        keeps = new.request is not None or new.request_key is not None
        self.new = new if keeps else None
        self.create_time = create_time
        self.done_time: float | None = None
        self.position = position

    @property
    def request_key(self) -> str | None:
        return None if self.new is None else self.new.request_key

    def operation(self) -> Operation:
        return Operation.FromString(self.data)

    def store(self, op: Operation) -> None:
        self.data = op.SerializeToString()
        self.done = op.done
        self.error_code = _core.error_code(op)

    def fields(self) -> dict[str, object]:
        """What the listing filter sees, without parsing the operation."""
        return fields_of(self.done, self.error_code, self.method, self.name)

    def record(self) -> Record:
        return Record(
            self.operation(),
            self.method,
            self.create_time,
            self.done_time,
            self.position,
            self.principal,
        )

    def drop_request(self) -> None:
        """Forget the stored request (it is not needed once the operation is done); an
        idempotency key keeps its hash."""
        if self.new is not None and self.new.request is not None:
            keeps = self.new.request_key is not None
            self.new = dataclasses.replace(self.new, request=None) if keeps else None


#: What a listing reads of an entry under the lock (the rest never changes):
#: (entry, data, done, error_code, done_time).
_Seen = tuple[_Entry, bytes, bool, int, float | None]


class _Index:
    """Positions in ascending order, deleted ones (holes) included until compacted away."""

    __slots__ = ("live", "positions")

    def __init__(self) -> None:
        self.positions: builtins.list[int] = []
        self.live = 0

    def add(self, position: int) -> None:
        self.positions.append(position)
        self.live += 1

    def drop(self, alive: Container[int]) -> None:
        """One of its positions was removed: compact once holes outnumber the live ones (a new
        list, so a listing between chunks keeps a consistent one; it finds its place by bisect)."""
        self.live -= 1
        if len(self.positions) > 64 and len(self.positions) > 2 * self.live:
            self.positions = [p for p in self.positions if p in alive]


#: Positions one listing visits per hold of the store lock (and per turn among listings).
_LIST_CHUNK = 128
#: The longest pause between two chunks of a listing (see MemoryStore.list).
_MAX_PAUSE = 0.005


class MemoryStore:
    """Keeps operations in a dict guarded by one lock; the default store of :class:`lrofw.Manager`.

    Listing walks a sorted list of positions from the cursor down (each principal has one of its
    own), so a page costs what it returns (plus deleted holes, compacted away once they outnumber
    the live entries). It holds the lock only to copy references, at most 128 positions at a time.
    Listings take turns, one chunk at a time, and pause after each chunk as long as it took, so
    that listing never takes more than about half the process from other requests. Expiry pops
    a queue kept in finish order. Not shared: it lives and dies with its process.

    Example:
        >>> manager = lrofw.Manager(store=MemoryStore())
    """

    shared = False
    blocking = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scanning = threading.Lock()
        self._ops: dict[str, _Entry] = {}
        self._by_position: dict[int, str] = {}
        self._all = _Index()
        self._by_principal: dict[str, _Index] = {}
        self._next_position = 1
        self._finished: builtins.list[tuple[float, int]] = []  # heap by finish time
        self._by_request: dict[str, str] = {}
        self._leases: dict[str, float] = {}
        self._key = os.urandom(32)

    def insert(self, operation: Operation, now: float, new: NewOperation) -> Record:
        with self._lock:
            if operation.name in self._ops:
                raise KeyError(operation.name)
            if new.request_key is not None:
                seen = self._ops.get(self._by_request.get(new.request_key, ""))
                if seen is not None:
                    raise DuplicateRequest(
                        seen.record(), None if seen.new is None else seen.new.request_hash
                    )
                self._by_request[new.request_key] = operation.name
            position = self._next_position
            self._next_position += 1
            method = sys.intern(normalize_method(new.method))
            entry = _Entry(operation, new, method, now, position)
            self._ops[entry.name] = entry
            self._by_position[position] = operation.name
            self._all.add(position)
            if new.principal is not None:
                self._by_principal.setdefault(new.principal, _Index()).add(position)
            # The caller's own message back: the store keeps its copy, hands out none.
            return Record(operation, method, now, None, position, new.principal)

    def get(self, name: str) -> Record | None:
        with self._lock:
            entry = self._ops.get(name)
            return None if entry is None else entry.record()

    def set_metadata(self, name: str, metadata: any_pb2.Any, *, owner: str | None = None) -> bool:
        with self._lock:
            entry = self._ops.get(name)
            if entry is None or entry.done or (owner is not None and entry.owner != owner):
                return False
            entry.store(_core.with_metadata(entry.operation(), metadata))
            return True

    def finish(
        self,
        name: str,
        now: float,
        *,
        response: any_pb2.Any | None = None,
        error: status_pb2.Status | None = None,
        owner: str | None = None,
    ) -> Record | None:
        with self._lock:
            entry = self._ops.get(name)
            if entry is None or entry.done or (owner is not None and entry.owner != owner):
                return None
            op = _core.finished(entry.operation(), response=response, error=error)
            entry.store(op)
            entry.done_time = now
            entry.drop_request()
            # (time, position): the name is found through the position when it expires.
            heapq.heappush(self._finished, (now, entry.position))
            return Record(op, entry.method, entry.create_time, now, entry.position, entry.principal)

    def _remove(self, entry: _Entry) -> None:
        del self._ops[entry.name]
        del self._by_position[entry.position]
        if entry.request_key is not None:
            self._by_request.pop(entry.request_key, None)
        self._all.drop(self._by_position)
        if entry.principal is not None:
            index = self._by_principal[entry.principal]
            index.drop(self._by_position)
            if index.live == 0:
                del self._by_principal[entry.principal]

    def delete(self, name: str) -> bool:
        with self._lock:
            entry = self._ops.get(name)
            if entry is None:
                return False
            self._remove(entry)
            return True

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
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if max_scan is not None and max_scan < 1:
            raise ValueError(f"max_scan must be at least 1, got {max_scan}")
        page: builtins.list[_Seen] = []
        size = 0
        scanned = 0
        bound = before
        cursor: int | None = None
        more = True
        match = compile_filter(where)
        while more:
            want = _LIST_CHUNK if max_scan is None else min(_LIST_CHUNK, max_scan - scanned)
            with self._scanning:  # one chunk at a time over all listings; never the data lock
                started = time.perf_counter()
                chunk, bound, more = self._chunk(principal, bound, want)
                for seen in chunk:
                    entry, data, done, error_code, _ = seen
                    if not match((done, error_code, entry.method, entry.name)):
                        continue
                    if len(page) == limit or (
                        max_bytes is not None and page and size + len(data) > max_bytes
                    ):
                        return self._records(page), page[-1][0].position
                    page.append(seen)
                    size += len(data)
                # A scan is pure Python: it would keep the GIL for the whole switch interval
                # (5 ms) at a time, so every other request waits. Pausing as long as the chunk
                # took hands the GIL to them and keeps listing to half the process at most.
                if more:
                    time.sleep(min(_MAX_PAUSE, time.perf_counter() - started))
            scanned += len(chunk)
            if scanned == max_scan:
                cursor = bound if more else None
                break
        return self._records(page), cursor

    def _chunk(
        self, principal: str | None, before: int | None, want: int
    ) -> tuple[builtins.list[_Seen], int | None, bool]:
        """Under the lock: up to ``want`` live entries below ``before``, newest first, visiting at
        most ``_LIST_CHUNK`` positions; the last position visited (the next bound) and whether
        any position below it remains."""
        out: builtins.list[_Seen] = []
        with self._lock:
            index = self._all if principal is None else self._by_principal.get(principal)
            if index is None:
                return out, before, False
            # The list may have been compacted or grown since the last chunk: find our place.
            positions = index.positions
            i = len(positions) if before is None else bisect.bisect_left(positions, before)
            stop = max(0, i - _LIST_CHUNK)
            while i > stop and len(out) < want:
                i -= 1
                before = positions[i]
                name = self._by_position.get(before)
                if name is not None:
                    e = self._ops[name]
                    out.append((e, e.data, e.done, e.error_code, e.done_time))
        return out, before, i > 0

    @staticmethod
    def _records(page: builtins.list[_Seen]) -> builtins.list[Record]:
        """The records of a page, parsed outside the lock, as they were when listed."""
        return [
            Record(
                Operation.FromString(data),
                e.method,
                e.create_time,
                done_time,
                e.position,
                e.principal,
            )
            for e, data, _, _, done_time in page
        ]

    def expire(self, cutoff: float, limit: int) -> builtins.list[str]:
        removed: builtins.list[str] = []
        with self._lock:
            while self._finished and len(removed) < limit:
                done_time, position = self._finished[0]
                if done_time > cutoff:
                    break
                heapq.heappop(self._finished)
                name = self._by_position.get(position)
                if name is None:
                    continue  # deleted since it finished
                entry = self._ops[name]
                self._remove(entry)
                removed.append(name)
        return removed

    def renew(self, owner: str, lease_until: float) -> None:
        with self._lock:
            self._leases[owner] = lease_until

    def release(self, owner: str) -> None:
        with self._lock:
            self._leases.pop(owner, None)

    def orphans(self, now: float, limit: int) -> builtins.list[Orphan]:
        out: builtins.list[Orphan] = []
        with self._lock:
            for entry in self._ops.values():
                if len(out) == limit:
                    break
                owner = entry.owner
                if entry.done or (owner is not None and self._leases.get(owner, 0.0) > now):
                    continue
                request = None if entry.new is None else entry.new.request
                out.append(Orphan(entry.name, entry.method, owner, request, entry.lost))
        return out

    def claim(self, name: str, old_owner: str | None, new_owner: str) -> bool:
        with self._lock:
            entry = self._ops.get(name)
            if entry is None or entry.done or entry.owner != old_owner:
                return False
            if old_owner is not None:
                entry.lost += 1
            entry.owner = new_owner
            return True

    def hand_over(self, name: str, owner: str) -> bool:
        with self._lock:
            entry = self._ops.get(name)
            if entry is None or entry.done or entry.owner != owner:
                return False
            entry.owner = None
            return True

    def version(self) -> int:
        return 0  # nobody else can change it

    def states(self, names: Iterable[str]) -> dict[str, bool]:
        with self._lock:
            return {n: e.done for n in names if (e := self._ops.get(n)) is not None}

    def token_key(self) -> bytes:
        return self._key

    def close(self) -> None:
        pass
