"""Wake-ups between PostgreSQL store replicas: LISTEN on a dedicated connection, NOTIFY after
commit, coalesced, and only when another replica listens.

A NOTIFY inside a write transaction takes a cluster-wide lock at commit (it cut single-row update
throughput to about a third, measured here), so writes never notify: once a write has committed,
the store hands the operation's name to its :class:`Notifier`, whose thread sends what gathered
over a few milliseconds as one statement of its own. Each store's :class:`Listener` holds one
autocommit connection of its own (not from the pool: ``notifies`` holds the connection's lock, and
a pooled connection would lose the LISTEN) and counts what it receives; the store's ``version()``
is that count, so the manager's watcher learns of a change without a round trip.

A replica alone on its schema has no one to tell: its notifications would cost it a thread
hand-off, a statement and its own listener's wake-up per change, for nothing (a third of an
asyncio server's throughput, measured here). So each listener announces its store (a *hello*,
:func:`hello`) when it starts listening and at every slow tick, and a store notifies only while it
has heard another store within the last :data:`HEARD_FOR` of that store's ticks. A store that
hears one it did not know answers with a hello of its own (a *welcome*), and every welcome makes
its receiver re-read what it waits on: what the other store changed before it heard of this one
(and so did not notify) is read then. Without this, a replica that had just started could miss a
change made in the milliseconds before its hello arrived, until its next slow tick.

Notifications are lossy: not in the WAL, dropped while the listening connection is down. So the
count also moves on every (re)LISTEN and on a slow tick (``resync`` seconds), and each move makes
the watcher re-read what it waits on and what it runs.
"""

from __future__ import annotations

import logging
import math
import os
import select
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import psycopg
from psycopg import sql

logger = logging.getLogger("lrofw.stores.postgres")

#: At most one notification statement per this many seconds (the rest of the interval's names
#: share the next one); an idle store's first change is sent at once.
COALESCE = 0.003

#: Bytes of names in one notification's payload (PostgreSQL's limit is 8,000).
_PAYLOAD_BYTES = 7900

#: Seconds between attempts to reconnect the listener: doubling from the first up to ``resync``.
_RECONNECT_FIRST = 0.05

#: A store counts as listening for this many of its own slow ticks after it was last heard.
HEARD_FOR = 3

#: The kinds of :func:`hello`: an announcement (on LISTEN and at each slow tick) and the answer
#: to one from a store not heard before.
ANNOUNCE, WELCOME = "announce", "welcome"

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


def hello(sender: str, kind: str, every: float) -> str:
    """The payload that tells the other stores ``sender`` listens, and says so again every
    ``every`` seconds; ``kind`` is :data:`ANNOUNCE` or :data:`WELCOME`.

    Example:
        >>> hello("s1", ANNOUNCE, 1.0)
        's1 announce 1'
    """
    return f"{sender} {kind} {every:g}"


def parse(payload: str) -> tuple[str, str, float | None]:
    """A payload's sender, its hello kind ("" for names, of :func:`payloads`) and how often its
    sender says hello (None: it does not say).

    Example:
        >>> parse("s1\\noperations/a")
        ('s1', '', None)
        >>> parse(hello("s1", WELCOME, 2.0))
        ('s1', 'welcome', 2.0)
        >>> parse("s1 announce inf")  # not a usable interval: the listener's own is assumed
        ('s1', 'announce', None)
    """
    head = payload.partition("\n")[0]
    sender, _, rest = head.partition(" ")
    kind, _, every = rest.partition(" ")
    try:
        seconds = float(every) if every else None
    except ValueError:
        seconds = None
    usable = seconds is not None and math.isfinite(seconds) and seconds > 0
    return sender, kind, seconds if usable else None


class Notifier:
    """Sends the names it is given, a few milliseconds' worth at a time, on its own thread.

    Args:
        send: sends a list of payloads (one statement); may raise (the batch is then dropped:
            the peers' slow tick finds what it would have told them).
        sender: the name the payloads carry first (see :func:`payloads`).
        audience: whether anyone would receive a notification now (:meth:`Listener.audience`);
            names posted while no one would are dropped at once.

    Example:
        >>> notifier = Notifier(send, "s1", listener.audience)
        >>> notifier.post(["operations/123"])  # after the write committed
        >>> notifier.close()  # sends what is pending, then stops
    """

    def __init__(
        self,
        send: Callable[[list[str]], None],
        sender: str = "",
        audience: Callable[[], bool] = lambda: True,
    ) -> None:
        self._send = send
        self._sender = sender
        self._audience = audience
        self._pending: list[str] = []
        self._wake = threading.Condition(threading.Lock())
        self._closed = False
        self._last = 0.0  # when the last notification went out (time.monotonic)
        self._thread = threading.Thread(target=self._run, name="lrofw-pg-notify", daemon=True)
        self._thread.start()

    def post(self, names: Iterable[str]) -> None:
        """Have ``names`` notified soon (call it after their write committed), if another store
        listens."""
        if not self._audience():
            return
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
    """Counts the notifications on ``channel`` received by a dedicated connection, and knows
    whether another store listens on it.

    Args:
        connect: opens a new autocommit connection (called again after one is lost).
        channel: the channel's name.
        resync: seconds between ticks that move the count anyway (and announce this store to
            the others), and at most between attempts to reconnect.
        me: the sender name of this store's own notifications (:func:`payloads`): they are
            not counted (the store's manager knows of its own changes).

    Example:
        >>> listener = Listener(connect, "lrofw_lrofw", resync=1.0, me="s1")
        >>> before = listener.version
        >>> # ... another replica finishes an operation; soon after:
        >>> listener.version != before
        True
        >>> listener.audience()  # that replica listens too
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
        # The other stores heard: until when (time.monotonic()) each counts as listening, and the
        # latest of those (read by audience(), from any thread).
        self._heard: dict[str, float] = {}
        self._heard_until = 0.0
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

    def audience(self) -> bool:
        """Whether another store listens on the channel: one was heard within the last
        :data:`HEARD_FOR` of its slow ticks."""
        return time.monotonic() < self._heard_until

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

    def _hello(self, conn: Connection, kind: str) -> None:
        """Tell the other stores this one listens (a round trip: a dead connection raises)."""
        conn.execute(
            "SELECT pg_notify(%s, %s)", (self._channel, hello(self._me, kind, self._resync))
        )

    def _run(self) -> None:
        pause = _RECONNECT_FIRST
        failing = False
        listen = sql.SQL("LISTEN {}").format(sql.Identifier(self._channel))
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
                    conn.execute(listen)
                    # Notifications sent while no LISTEN was in place are lost: the count moves,
                    # so the watcher re-reads everything it waits on and runs.
                    self._bump()
                    self._hello(conn, ANNOUNCE)
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

    def _heard_from(self, sender: str, every: float | None) -> bool:
        """Note that ``sender`` (another store) listens; whether it is one not heard before (or
        not for so long that it no longer counted)."""
        now = time.monotonic()
        known = self._heard.get(sender, 0.0) > now
        if not known:  # now and then, forget the stores gone
            self._heard = {k: v for k, v in self._heard.items() if v > now}
        until = now + HEARD_FOR * (self._resync if every is None else every)
        self._heard[sender] = until
        self._heard_until = max(self._heard_until, until)
        return not known

    def _listen(self, conn: Connection) -> None:
        """Receive notifications until closed; raises when the connection breaks.

        A round trip of the listener's own (the LISTEN, a hello) reads whatever notifications
        arrive meanwhile into psycopg's backlog, where the socket no longer shows them: after
        each, the listener looks at once rather than waiting for the socket."""
        tick = time.monotonic() + self._resync
        look = True  # the LISTEN and the first hello were round trips
        while True:
            wait = 0.0 if look else max(0.0, tick - time.monotonic())
            ready, _, _ = select.select([conn.pgconn.socket, self._stop_r], [], [], wait)
            if self._stop_r in ready:
                return
            received = changes = 0
            welcome = reread = False
            if ready or look:
                look = False
                for notification in conn.notifies(timeout=0):
                    received += 1
                    sender, kind, every = parse(notification.payload)
                    if sender == self._me:
                        continue  # its own: the store's manager knows of its own changes
                    if self._heard_from(sender, every):
                        # A store that may not have known of this one until now: it answers,
                        # and this one re-reads (what it changed meanwhile went untold).
                        welcome = reread = True
                    if kind == WELCOME:
                        reread = True  # that store knows of this one from now on
                    elif not kind:
                        changes += 1  # another store's change
            if welcome:
                self._hello(conn, WELCOME)
                look = True
            if changes or reread:
                self._bump(max(changes, 1))
            if (ready and not received) or time.monotonic() >= tick:
                # The slow tick (or a readable socket with no notification: the server may have
                # hung up): a round trip (the announcement) proves the connection alive (a dead
                # one raises, and the loop reconnects); the count moves either way.
                self._hello(conn, ANNOUNCE)
                look = True
                self._bump()
                tick = time.monotonic() + self._resync
