"""The in-memory store: fast, per process, gone when the process ends."""

from __future__ import annotations

import bisect
import builtins
import collections
import threading

from google.protobuf import any_pb2
from google.rpc import status_pb2

from .. import _core
from .base import Operation, Predicate, Record, filter_fields


class _Entry:
    __slots__ = ("create_time", "done_time", "method", "op", "position")

    def __init__(self, op: Operation, method: str, create_time: float, position: int) -> None:
        self.op = op
        self.method = method
        self.create_time = create_time
        self.done_time: float | None = None
        self.position = position

    def record(self) -> Record:
        return Record(
            _core.copy(self.op), self.method, self.create_time, self.done_time, self.position
        )


class MemoryStore:
    """Keeps operations in a dict guarded by one lock; the default store of :class:`lrofw.Manager`.

    Listing walks a sorted list of positions from the cursor down, so a page costs what it
    returns (plus deleted holes, compacted away once they outnumber the live entries); expiry pops
    a queue kept in finish order.

    Example:
        >>> manager = lrofw.Manager(store=MemoryStore())
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: dict[str, _Entry] = {}
        self._by_position: dict[int, str] = {}
        self._positions: list[int] = []  # ascending; may hold deleted positions
        self._next_position = 1
        self._finished: collections.deque[tuple[float, str, int]] = collections.deque()

    def insert(self, operation: Operation, method: str, now: float) -> Record:
        with self._lock:
            if operation.name in self._ops:
                raise KeyError(operation.name)
            position = self._next_position
            self._next_position += 1
            entry = _Entry(_core.copy(operation), method, now, position)
            self._ops[operation.name] = entry
            self._by_position[position] = operation.name
            self._positions.append(position)
            return entry.record()

    def get(self, name: str) -> Record | None:
        with self._lock:
            entry = self._ops.get(name)
            return None if entry is None else entry.record()

    def set_metadata(self, name: str, metadata: any_pb2.Any) -> bool:
        with self._lock:
            entry = self._ops.get(name)
            if entry is None or entry.op.done:
                return False
            entry.op.metadata.CopyFrom(metadata)
            return True

    def finish(
        self,
        name: str,
        now: float,
        *,
        response: any_pb2.Any | None = None,
        error: status_pb2.Status | None = None,
    ) -> Record | None:
        with self._lock:
            entry = self._ops.get(name)
            if entry is None or entry.op.done:
                return None
            entry.op = _core.finished(entry.op, response=response, error=error)
            entry.done_time = now
            self._finished.append((now, name, entry.position))
            return entry.record()

    def delete(self, name: str) -> bool:
        with self._lock:
            entry = self._ops.pop(name, None)
            if entry is None:
                return False
            del self._by_position[entry.position]
            if len(self._positions) > 64 and len(self._positions) > 2 * len(self._ops):
                self._positions = sorted(self._by_position)
            return True

    def list(
        self, predicate: Predicate, before: int | None, limit: int
    ) -> tuple[builtins.list[Record], int | None]:
        out: builtins.list[Record] = []
        with self._lock:
            i = (
                len(self._positions)
                if before is None
                else bisect.bisect_left(self._positions, before)
            )
            while i > 0:
                i -= 1
                name = self._by_position.get(self._positions[i])
                if name is None:
                    continue
                entry = self._ops[name]
                if not predicate(filter_fields(entry.op, entry.method)):
                    continue
                if len(out) == limit:
                    return out, out[-1].position
                out.append(entry.record())
        return out, None

    def expire(self, cutoff: float, limit: int) -> builtins.list[str]:
        removed: builtins.list[str] = []
        with self._lock:
            while self._finished and len(removed) < limit:
                done_time, name, position = self._finished[0]
                if done_time > cutoff:
                    break
                self._finished.popleft()
                entry = self._ops.get(name)
                if entry is None or entry.position != position:
                    continue  # deleted (or deleted and re-created) since it finished
                del self._ops[name]
                del self._by_position[position]
                removed.append(name)
            if len(self._positions) > 64 and len(self._positions) > 2 * len(self._ops):
                self._positions = sorted(self._by_position)
        return removed

    def close(self) -> None:
        pass
