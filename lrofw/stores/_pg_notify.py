"""Wake-ups between PostgreSQL store replicas: LISTEN on a dedicated connection, NOTIFY after
commit, coalesced.

A NOTIFY inside a write transaction takes a cluster-wide lock at commit (it cut single-row update
throughput to about a third, measured here), so writes never notify: once a write has committed,
the store hands the operation's name to its :class:`Notifier`, whose thread sends what gathered
over a few milliseconds as one statement of its own. Each store's :class:`Listener` holds one
autocommit connection of its own (not from the pool: ``notifies`` holds the connection's lock, and
a pooled connection would lose the LISTEN) and counts what it receives; the store's ``version()``
is that count, so the manager's watcher learns of a change without a round trip.

Notifications are lossy: not in the WAL, dropped while the listening connection is down. So the
count also moves on every (re)LISTEN and on a slow tick (``resync`` seconds), and each move makes
the watcher re-read what it waits on and what it runs.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import psycopg

logger = logging.getLogger("lrofw.stores.postgres")

#: At most one notification statement per this many seconds (the rest of the interval's names
#: share the next one); an idle store's first change is sent at once.
COALESCE = 0.003

#: Bytes of names in one notification's payload (PostgreSQL's limit is 8,000).
_PAYLOAD_BYTES = 7900

#: Seconds between attempts to reconnect the listener: doubling from the first up to ``resync``.
_RECONNECT_FIRST = 0.05

Connection = psycopg.Connection[tuple[Any, ...]]


def payloads(names: Iterable[str], sender: str = "") -> list[str]:
    """``names`` (each once) joined by newlines into payloads under 8,000 bytes each, each after
    a first line naming the ``sender`` (so a store ignores its own notifications).

    Example:
        >>> payloads(["operations/a", "operations/b", "operations/a"], "s1")
        ['s1\\noperations/a\\noperations/b']
    """
    head = len(sender.encode("utf-8")) + 1
    out: list[str] = []
    chunk: list[str] = [sender]
    size = head
    for name in dict.fromkeys(names):
        length = len(name.encode("utf-8", "surrogatepass")) + 1
        if len(chunk) > 1 and size + length > _PAYLOAD_BYTES:
            out.append("\n".join(chunk))
            chunk, size = [sender], head
        if head + length <= _PAYLOAD_BYTES:  # a name that long is woken by the slow tick instead
            chunk.append(name)
            size += length
    if len(chunk) > 1 or not out:
        out.append("\n".join(chunk))
    return out


def sender_of(payload: str) -> str:
    """The sender a payload of :func:`payloads` names.

    Example:
        >>> sender_of("s1\\noperations/a")
        's1'
    """
    return payload.partition("\n")[0]


class Notifier:
    """Sends the names it is given, a few milliseconds' worth at a time, on its own thread.

    Args:
        send: sends a list of payloads (one statement); may raise (the batch is then dropped:
            the peers' slow tick finds what it would have told them).

    Example:
        >>> notifier = Notifier(send)
        >>> notifier.post(["operations/123"])  # after the write committed
        >>> notifier.close()  # sends what is pending, then stops
    """

    def __init__(self, send: Callable[[list[str]], None], sender: str = "") -> None:
        self._send = send
        self._sender = sender
        self._pending: list[str] = []
        self._wake = threading.Condition(threading.Lock())
        self._closed = False
        self._last = 0.0  # when the last notification went out (time.monotonic)
        self._thread = threading.Thread(target=self._run, name="lrofw-pg-notify", daemon=True)
        self._thread.start()

    def post(self, names: Iterable[str]) -> None:
        """Have ``names`` notified soon (call it after their write committed)."""
        with self._wake:
            idle = not self._pending
            self._pending.extend(names)
            if idle:  # else the thread is awake already, or gathering the interval's names
                self._wake.notify()

    def close(self) -> None:
        """Send what is pending, then stop the thread (idempotent)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if not self._pending:
                    return  # closed, nothing left
                # At most one notification every COALESCE seconds: when the last went out less
                # than that ago, the writes of the rest of the interval share the next one; an
                # idle store's first change goes out at once.
                due = self._last + COALESCE
                while not self._closed and (delay := due - time.monotonic()) > 0:
                    self._wake.wait(delay)
                batch, self._pending = self._pending, []
                self._last = time.monotonic()
            try:
                self._send(payloads(batch, self._sender))
            except Exception as exc:
                logger.debug("a notification of %d names was not sent: %s", len(batch), exc)


class Listener:
    """Counts the notifications on ``channel`` received by a dedicated connection.

    Args:
        connect: opens a new autocommit connection (called again after one is lost).
        channel: the channel, quoted for LISTEN.
        resync: seconds between ticks that move the count anyway, and at most between
            attempts to reconnect.
        me: the sender name of this store's own notifications (:func:`payloads`): they are
            not counted (the store's manager knows of its own changes).

    Example:
        >>> listener = Listener(connect, '"lrofw_lrofw"', resync=1.0)
        >>> before = listener.version
        >>> # ... another replica finishes an operation; soon after:
        >>> listener.version != before
        True
    """

    def __init__(
        self, connect: Callable[[], Connection], channel: str, *, resync: float, me: str = ""
    ) -> None:
        self._connect = connect
        self._me = me  # notifications this store sent itself are not counted
        self._channel = channel
        self._resync = resync
        self._count = 0  # written by the listener thread only
        self._callbacks: list[Callable[[], object]] = []
        self._closed = threading.Event()
        self._stop_r, self._stop_w = os.pipe()
        #: Set once the first LISTEN is in place (and after every reconnect).
        self.listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lrofw-pg-listen", daemon=True)
        self._thread.start()

    @property
    def version(self) -> int:
        """The count: moves on each notification, each (re)LISTEN and each slow tick."""
        return self._count

    def close(self) -> None:
        """Stop listening and close the connection (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        os.write(self._stop_w, b"x")
        self._thread.join()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def on_change(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` (on the listener's thread: it must be quick) whenever the count
        moves."""
        self._callbacks = [*self._callbacks, callback]

    def _bump(self, by: int = 1) -> None:
        self._count += by
        for callback in self._callbacks:
            try:
                callback()
            except Exception:
                logger.exception("a change callback of the PostgreSQL store failed")

    def _run(self) -> None:
        pause = _RECONNECT_FIRST
        failing = False
        while not self._closed.is_set():
            try:
                conn = self._connect()
            except Exception as exc:
                if not failing:
                    failing = True
                    logger.warning("the PostgreSQL store cannot listen for changes: %s", exc)
                self._closed.wait(pause)
                pause = min(pause * 2, self._resync)
                continue
            try:
                with conn:
                    conn.execute(f"LISTEN {self._channel}")
                    # Notifications sent while no LISTEN was in place are lost: the count moves,
                    # so the watcher re-reads everything it waits on and runs.
                    self._bump()
                    self.listening.set()
                    if failing:
                        failing = False
                        logger.warning("the PostgreSQL store listens for changes again")
                    pause = _RECONNECT_FIRST
                    self._listen(conn)
            except Exception as exc:
                self.listening.clear()
                if not failing:
                    failing = True
                    logger.warning("the PostgreSQL store's listening connection broke: %s", exc)
                self._closed.wait(pause)

    def _listen(self, conn: Connection) -> None:
        """Receive notifications until closed; raises when the connection breaks."""
        tick = time.monotonic() + self._resync
        while True:
            wait = max(0.0, tick - time.monotonic())
            ready, _, _ = select.select([conn.pgconn.socket, self._stop_r], [], [], wait)
            if self._stop_r in ready:
                return
            received = mine = 0
            if ready:
                for notification in conn.notifies(timeout=0):
                    received += 1
                    mine += sender_of(notification.payload) == self._me
                if received > mine:  # another store's change (its own it knows of already)
                    self._bump(received - mine)
            if (ready and not received) or time.monotonic() >= tick:
                # The slow tick (or a readable socket with no notification: the server may have
                # hung up): a round trip proves the connection alive (a dead one raises, and the
                # loop reconnects); the count moves either way.
                conn.execute("SELECT 1")
                self._bump()
                tick = time.monotonic() + self._resync
