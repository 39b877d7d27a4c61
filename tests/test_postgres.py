"""The PostgreSQL store beyond the common contract: opening and migrating, racing replicas,
rescue, fencing, outages, and wake-ups between replicas (LISTEN/NOTIFY).

Each test uses schemas of its own on the test server (tests/pgschemas.py); two store instances on
one schema stand for two replicas.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import grpc
import pgschemas
import pytest
import tls_pb2_grpc
from factories import Request, Response, eventually, in_thread, served
from google.longrunning import operations_proto_pb2

import lrofw
from lrofw.listing import MatchAll
from lrofw.manager import MethodRunner
from lrofw.stores import (
    DuplicateRequest,
    NewOperation,
    StoreOpenError,
    StoreUnavailable,
    open_store,
)

pytestmark = pytest.mark.usefixtures("postgres")

Operation = operations_proto_pb2.Operation
T = TypeVar("T")
LONG = 30.0  # seconds; reached only when a test fails
NOW = 1_700_000_000.0


@pytest.fixture
def postgres() -> None:
    """Skips the test without psycopg or the test server."""
    pgschemas.require()


@pytest.fixture
def replicas() -> Iterator[Callable[..., Any]]:
    """Opens PostgresStore instances on one fresh schema (each a replica; ``application_name``
    names its connections; ``dsn`` is the test server's unless given); closes them."""
    schema = pgschemas.schema()
    opened: list[Any] = []

    def open_(
        application_name: str = "lrofw-test", *, dsn: str = pgschemas.DSN, **options: Any
    ) -> Any:
        from psycopg.conninfo import make_conninfo

        from lrofw.stores import PostgresStore

        dsn = make_conninfo(dsn, application_name=application_name)
        store = PostgresStore(dsn, schema=schema, **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def add(store: Any, name: str | None = None, **new: Any) -> str:
    """Inserts an unfinished operation; returns its name."""
    name = name or f"operations/{uuid.uuid4()}"
    new.setdefault("method", "/t.S/M")
    store.insert(Operation(name=name), NOW, NewOperation(**new))
    return name


def backends(application_name: str) -> list[int]:
    """The server processes of connections with this application name."""
    with pgschemas.connect() as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name,)
        ).fetchall()
    return [r[0] for r in rows]


def terminate(application_name: str) -> int:
    """Ends every server process of connections with this name (as a server restart would)."""
    pids = backends(application_name)
    with pgschemas.connect() as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    return len(pids)


def manager(store: Any, **options: Any) -> lrofw.Manager:
    """A Manager on ``store`` (closed by the test)."""
    options.setdefault("lease", 5.0)
    return lrofw.Manager(store=store, **options)


# --- opening and migrating ------------------------------------------------------------------------


def test_replicas_starting_at_once_migrate_the_schema_once(replicas: Callable[..., Any]) -> None:
    """Six replicas open a missing schema at once: each opens it, all share one token key."""
    barrier = threading.Barrier(6)
    stores: list[Any] = []
    failures: list[BaseException] = []

    def open_() -> None:
        barrier.wait(LONG)
        stores.append(replicas())

    threads = [in_thread(open_, failures)[0] for _ in range(6)]
    for thread in threads:
        thread.join(LONG)
    assert not failures and len(stores) == 6
    assert len({s.token_key() for s in stores}) == 1
    name = add(stores[0])
    assert all(s.get(name) is not None for s in stores)


def test_a_schema_newer_than_this_lrofw_is_refused(replicas: Callable[..., Any]) -> None:
    """A schema whose version is newer than this code's is refused with StoreOpenError."""
    store = replicas()
    with pgschemas.connect() as conn:
        conn.execute(
            f"UPDATE \"{store.schema}\".meta SET value = '99' WHERE key = 'schema_version'"
        )
    with pytest.raises(StoreOpenError, match=r"version 99, newer than this lrofw knows \(1\)"):
        replicas()


@pytest.mark.parametrize(
    ("dsn", "says"),
    [
        ("postgresql://postgres@127.0.0.1:1/test", "is the server running"),
        ("postgresql://postgres@127.0.0.1:5432/lrofw_no_such_db", "create the database"),
        ("postgresql://lrofw_no_such_user@127.0.0.1:5432/test", "check the user name"),
    ],
)
def test_a_store_that_cannot_be_opened_says_why(dsn: str, says: str) -> None:
    """Unreachable server, missing database, unknown user: StoreOpenError that says what to do."""
    from lrofw.stores import PostgresStore

    with pytest.raises(StoreOpenError, match="cannot open PostgreSQL store") as caught:
        PostgresStore(dsn.replace("@", ":secret@"), schema=pgschemas.schema(), connect_timeout=2)
    assert says in str(caught.value)
    assert "secret" not in str(caught.value)  # the password is never shown


def test_open_store_takes_the_schema_out_of_the_url() -> None:
    """postgresql:// and postgres:// URLs: ?schema= is lrofw's; the rest goes to libpq."""
    schema = pgschemas.schema()
    for scheme in ("postgresql", "postgres"):
        url = pgschemas.DSN.replace("postgresql://", f"{scheme}://")
        store = open_store(f"{url}?application_name=lrofw-url-test&schema={schema}")
        try:
            assert store.schema == schema and store.shared
            assert backends("lrofw-url-test")  # libpq's own parameter was passed on
        finally:
            store.close()
    with pytest.raises(ValueError, match="more than one schema"):
        open_store(f"{pgschemas.DSN}?schema=a&schema=b")
    with pytest.raises(ValueError, match="plain identifier"):
        open_store(f"{pgschemas.DSN}?schema=no-dashes")


def test_tables_are_in_the_schema_named(replicas: Callable[..., Any]) -> None:
    """The store creates its tables in its own schema, nowhere else."""
    store = replicas()
    with pgschemas.connect() as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (store.schema,),
        ).fetchall()
    assert sorted(r[0] for r in rows) == ["meta", "ops", "owners"]


# --- racing replicas ------------------------------------------------------------------------------


def test_racing_creates_with_one_request_id_make_one_operation(
    replicas: Callable[..., Any],
) -> None:
    """Eight replicas insert the same request key at once: one op; the others are told its name."""
    stores = [replicas() for _ in range(8)]
    barrier = threading.Barrier(len(stores))
    created: list[str] = []
    told: list[str] = []
    failures: list[BaseException] = []

    def create(store: Any) -> None:
        barrier.wait(LONG)
        try:
            created.append(add(store, request_key="m\nrequest-1", request_hash=b"h"))
        except DuplicateRequest as dup:
            assert dup.request_hash == b"h"
            told.append(dup.record.operation.name)

    threads = [in_thread(lambda s=s: create(s), failures)[0] for s in stores]
    for thread in threads:
        thread.join(LONG)
    assert not failures
    assert len(created) == 1 and told == created * 7
    assert [r.operation.name for r in stores[0].list(MatchAll(), None, 10)[0]] == created


def test_two_rescuers_never_take_one_operation(replicas: Callable[..., Any]) -> None:
    """Two replicas rescue 300 orphans of a dead owner at once: each is claimed exactly once."""
    first, second = replicas(), replicas()
    names = [add(first, owner="dead", request=b"r") for _ in range(300)]
    claims: dict[str, list[str]] = {"a": [], "b": []}
    failures: list[BaseException] = []
    barrier = threading.Barrier(2)

    def rescue(store: Any, me: str) -> None:
        store.renew(me, NOW + 60)  # alive: what it claims is no orphan for the other
        barrier.wait(LONG)
        while orphans := store.orphans(NOW, 50):
            for orphan in orphans:
                if store.claim(orphan.name, orphan.owner, me):
                    claims[me].append(orphan.name)

    threads = [in_thread(lambda s=s, m=m: rescue(s, m), failures)[0] for s, m in
               ((first, "a"), (second, "b"))]  # fmt: skip
    for thread in threads:
        thread.join(LONG)
    assert not failures
    assert collections.Counter(claims["a"] + claims["b"]) == collections.Counter(names)


def test_two_managers_resolve_a_dead_replicas_operations(replicas: Callable[..., Any]) -> None:
    """A replica died with 100 running ops; two managers start and recover at once: every op
    ends ABORTED (once: finishing is compare-and-set)."""
    dead = replicas()
    names = [add(dead, owner="dead-replica") for _ in range(100)]
    dead.renew("dead-replica", time.time() - 1)  # its heartbeat lapsed
    stores = [replicas(), replicas()]
    barrier = threading.Barrier(2)
    managers: list[lrofw.Manager] = []

    def start(store: Any) -> None:
        barrier.wait(LONG)
        managers.append(manager(store))  # a manager recovers as it starts...
        managers[-1].recover()  # ... and again, racing the other

    try:
        threads = [in_thread(lambda s=s: start(s))[0] for s in stores]
        for thread in threads:
            thread.join(LONG)
        assert len(managers) == 2
        assert stores[0].states(names) == dict.fromkeys(names, True)
        for name in names:
            assert stores[1].get(name).operation.error.code == 10  # ABORTED
    finally:
        for m in managers:
            m.close()


# --- fencing --------------------------------------------------------------------------------------


def test_a_replica_that_lost_its_claim_cannot_overwrite_the_result(
    replicas: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Replica A runs a handler; while it is cut off, replica B claims the op. A's progress report
    and result are refused (fenced); B's result is the one kept."""
    store_a, store_b = replicas(), replicas()
    a = manager(store_a)
    try:
        report, release = threading.Event(), threading.Event()
        reported: list[bool] = []

        def handler(request: Any, op: lrofw.OperationContext) -> Any:
            report.wait(LONG)
            reported.append(op.report(Response(installed_image="progress")))  # type: ignore[arg-type]
            release.wait(LONG)
            return Response(installed_image="from A")

        name = a.launch(MethodRunner("/t.S/M", handler, Response), Request()).name
        store_b.renew("replica-b", time.time() + LONG)
        assert store_b.claim(name, a.owner, "replica-b")  # A's lease lapsed; B took it over
        report.set()
        eventually(lambda: bool(reported), "A's progress report")
        assert reported == [False]
        release.set()
        eventually(lambda: "another server took it over" in caplog.text, "A's refused result")
        assert not store_b.get(name).operation.done
        packed = lrofw._core.pack(Response(installed_image="from B"))
        assert store_b.finish(name, NOW, response=packed, owner="replica-b") is not None
        assert a.wait(name, timeout=LONG).response == packed
    finally:
        release.set()
        a.close()


# --- outages --------------------------------------------------------------------------------------


def test_connections_the_server_dropped_cost_at_most_one_failed_call(
    replicas: Callable[..., Any],
) -> None:
    """pg_terminate_backend on every pooled connection (as a restart would): the next call
    succeeds, or fails once with StoreUnavailable; the calls after it succeed."""
    app = f"lrofw-outage-{uuid.uuid4().hex[:8]}"
    store = replicas(application_name=app, min_connections=3)
    name = add(store)
    for _ in range(3):
        assert terminate(app) >= 1
        failures = 0
        for _ in range(5):
            try:
                assert store.get(name) is not None
            except StoreUnavailable:
                failures += 1
        assert failures <= 1


def test_backends_killed_under_load_cost_no_failed_call(replicas: Callable[..., Any]) -> None:
    """Four threads create, read and finish operations while every pooled connection's backend
    is ended (pg_terminate_backend) ten times, busy or idle: no call fails (reads and the idempotent
    writes run again on a fresh connection), and every operation is stored once, done."""
    app = f"lrofw-kill-{uuid.uuid4().hex[:8]}"
    store = replicas(application_name=app, min_connections=4)
    progress = threading.Condition()
    done: list[str] = []
    stop = threading.Event()
    packed = lrofw._core.pack(Response(installed_image="done"))

    def work() -> None:
        while not stop.is_set():
            name = add(store, owner="me")
            assert store.get(name) is not None
            assert store.finish(name, NOW, response=packed, owner="me") is not None
            with progress:
                done.append(name)
                progress.notify_all()

    workers = [in_thread(work) for _ in range(4)]

    def progressed(target: int) -> bool:
        return len(done) >= target or any(failures for _, failures in workers)

    try:
        for _ in range(10):
            with progress:  # some calls between kills: each kill meets busy connections
                target = len(done) + 10
                assert progress.wait_for(functools.partial(progressed, target), LONG)
            assert terminate(app) >= 1
    finally:
        stop.set()
        for thread, _ in workers:
            thread.join(LONG)
    assert [f for _, failures in workers for f in failures] == []
    assert store.states(done) == dict.fromkeys(done, True)


#: The client's Sync and Flush messages, and the error a backend sends when an administrator
#: ends it (``pg_terminate_backend``), before it closes the connection.
SYNC, FLUSH = b"S\x00\x00\x00\x04", b"H\x00\x00\x00\x04"
_FATAL = b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0"
TERMINATED = b"E" + (4 + len(_FATAL)).to_bytes(4, "big") + _FATAL


def message_kinds(data: bytes) -> list[bytes]:
    """The types of the whole PostgreSQL protocol messages ``data`` starts with (each a type
    byte, then a length that counts itself, then the rest)."""
    kinds, at = [], 0
    while at + 5 <= len(data):
        end = at + 1 + int.from_bytes(data[at + 1 : at + 5], "big")
        if end > len(data):
            break
        kinds.append(data[at : at + 1])
        at = end
    return kinds


class CuttingProxy:
    """A TCP proxy to the test server that can cut a connection the moment the server has
    answered a statement (it ran, and committed), before the answer reaches the client: the
    client sees its connection drop with its write done. Or (``arm(before_commit=True)``) once
    the statement ran but before it committed, the client seeing its result and then the end.
    Closing it stands for the server going away (every connection cut, new ones refused); a new
    proxy on its ``port``, for its return. ``latency``: seconds each new connection takes to
    reach the server (a distant one)."""

    def __init__(self, port: int = 0, latency: float = 0.0) -> None:
        import psycopg

        params = psycopg.conninfo.conninfo_to_dict(pgschemas.DSN)
        self._server = (str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = port = self._listener.getsockname()[1]
        self.dsn = psycopg.conninfo.make_conninfo(
            pgschemas.DSN, host="127.0.0.1", port=port, sslmode="disable", gssencmode="disable"
        )
        self._lock = threading.Lock()
        self._armed = 0  # connections still to cut
        self._before_commit = False
        self.cut = threading.Event()
        self._cutting = False  # a connection is to be cut (the next arming waits for it)
        self.cuts = 0  # connections cut so far
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._latency = latency
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def arm(self, *, before_commit: bool = False, cuts: int = 1) -> None:
        """Cut the connection that runs the store's next prepared statement (its hot path:
        insert, get, finish...), once it has been answered; with ``cuts``, that many
        connections, each at the next such statement after the last cut.

        ``before_commit``: once it has run but before its implicit transaction commits (at the
        Sync after it, which the server then never receives): the client gets the statement's
        result, then the error a backend ended by an administrator sends, then the end of the
        connection; the write is not committed."""
        with self._lock:
            self._armed = cuts
            self._before_commit = before_commit

    def close(self) -> None:
        """Refuse new connections and cut every open one."""
        with self._lock:
            self._closed = True
        # shutdown: close alone leaves the accepting thread blocked, and the port listening.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._accepting.join(LONG)
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Event().wait(self._latency)
            server = socket.create_connection(self._server)
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
            target = threading.Event()  # this connection sent the armed statement
            threading.Thread(target=self._up, args=(client, server, target), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, target), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, target: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                with self._lock:
                    # One of the store's prepared statements run (a Bind of "lrofw_N", then
                    # Execute): not a statement that prepares it, nor one of psycopg's own.
                    runs = b"E" in message_kinds(data) and b"\x00lrofw_" in data
                    if self._armed and runs and not self._cutting:
                        self._armed -= 1
                        self._cutting = True
                        target.set()
                        if self._before_commit and data.endswith(SYNC):
                            # Flush instead: the server sends the result, and commits nothing.
                            data = data[: -len(SYNC)] + FLUSH
                server.sendall(data)

    def _down(self, server: socket.socket, client: socket.socket, target: threading.Event) -> None:
        held = b""
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if not target.is_set():
                    client.sendall(data)
                    continue
                held += data
                kinds = message_kinds(held)
                if self._before_commit and b"C" in kinds:  # it ran; its commit is yet to come
                    client.sendall(held + TERMINATED)
                    self._cut(client, server, target)
                    return
                # Up to ReadyForQuery: after CommandComplete, the statement ran and committed.
                if b"Z" not in kinds:
                    continue
                if b"C" not in kinds:  # a statement being prepared: pass it on, wait for the next
                    client.sendall(held)
                    held = b""
                    continue
                self._cut(client, server, target)
                return

    def _cut(self, client: socket.socket, server: socket.socket, target: threading.Event) -> None:
        target.clear()
        with self._lock:
            self.cuts += 1
            self._cutting = False
        self.cut.set()
        for sock in (client, server):  # shutdown: close alone leaves a recv blocked
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.mark.parametrize("before_commit", [False, True], ids=["after commit", "before commit"])
@pytest.mark.parametrize("call", ["insert", "finish", "insert_async", "finish_async"])
def test_a_write_whose_answer_was_lost_is_not_reported_failed(
    replicas: Callable[..., Any], call: str, before_commit: bool
) -> None:
    """The connection drops after the server committed a create (or a finish) but before its
    answer arrived: the store asks again on a fresh connection, finds its own write, and
    returns it as done; not a failure, nor a "name exists" or "already finished". The same from
    an event loop (``insert_async``, ``finish_async``: asked again from a thread).

    Before commit: the statement's result arrived, then the backend was ended before its
    transaction committed. The write is not done: the store must not take the result for its
    answer, but write again (else an acknowledged create, or finish, is lost)."""
    write_through_cuts(replicas, call, before_commit=before_commit, cuts=1)


@pytest.mark.parametrize("before_commit", [False, True], ids=["after commit", "before commit"])
@pytest.mark.parametrize("call", ["insert", "finish_async"])
def test_a_write_whose_retries_broke_too_is_not_reported_failed(
    replicas: Callable[..., Any], call: str, before_commit: bool
) -> None:
    """The server ends this service's backends one after another (a restart, an administrator):
    the connection a write is asked again on breaks too, and so does the next. The store asks
    again on a newer one each time (within ``connect_timeout``), and the write is done once."""
    write_through_cuts(replicas, call, before_commit=before_commit, cuts=3)


def write_through_cuts(
    replicas: Callable[..., Any], call: str, *, before_commit: bool, cuts: int
) -> None:
    """``call`` (a store's insert, finish, or their ``_async`` twins) made while the proxy cuts
    ``cuts`` connections in turn under its statements; it must return the write, done once."""
    proxy = CuttingProxy()
    try:
        store = replicas(dsn=proxy.dsn, resync_interval=60.0)  # no listener tick during the test
        eventually(lambda: store.version() > 0, "the listener's LISTEN")
        name = f"operations/{uuid.uuid4()}"
        packed = lrofw._core.pack(Response(installed_image="done"))
        if call.startswith("finish"):
            add(store, name, owner="me")
        proxy.arm(before_commit=before_commit, cuts=cuts)
        if call.startswith("insert"):
            args = (Operation(name=name), NOW, NewOperation(method="/t.S/M"))
            record = (
                store.insert(*args) if call == "insert" else asyncio.run(store.insert_async(*args))
            )
            assert (record.operation.name, record.method, record.create_time) == (
                name, "/t.S/M", NOW)  # fmt: skip
        else:
            record = (
                store.finish(name, NOW + 1, response=packed, owner="me")
                if call == "finish"
                else asyncio.run(store.finish_async(name, NOW + 1, response=packed, owner="me"))
            )
            assert record is not None and record.operation.response == packed
            assert record.done_time == NOW + 1
        assert proxy.cuts == cuts
        stored = store.get(name)
        assert stored is not None and stored.position == record.position
        assert stored.operation.done == call.startswith("finish")
        store.close()
    finally:
        proxy.close()


# --- an asyncio server's creates and finishes, on its event loop ---------------------------------


@contextlib.contextmanager
def ops_locked(store: Any) -> Iterator[Callable[[], int]]:
    """Holds an exclusive lock on the store's table (another session's open transaction), so
    that writes wait for it; yields a function that counts the statements waiting."""
    with pgschemas.connect() as conn, conn.transaction():
        conn.execute(f'LOCK TABLE "{store.schema}".ops IN ACCESS EXCLUSIVE MODE')

        def waiting() -> int:
            with pgschemas.connect() as peek:
                row = peek.execute(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass",
                    (f'"{store.schema}".ops',),
                ).fetchone()
            return int(row[0]) if row else 0

        yield waiting  # the transaction ends: the lock goes


def on_a_watched_loop(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Runs ``scenario()`` on an event loop in asyncio's debug mode, which logs any callback or
    task step that held the loop for longer than ``slow_callback_duration``; fails the test if
    one held it for a second or more (the store waited for the server on the loop)."""
    slow: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Executing"):
                slow.append(record.getMessage())

    async def watched() -> T:
        asyncio.get_running_loop().slow_callback_duration = 1.0
        return await scenario()

    catch = Catch(logging.WARNING)
    logging.getLogger("asyncio").addHandler(catch)
    try:
        result = asyncio.run(watched(), debug=True)
    finally:
        logging.getLogger("asyncio").removeHandler(catch)
    assert not slow, slow
    return result


def test_an_async_write_leaves_the_event_loop_free_and_a_cancelled_one_its_connection(
    replicas: Callable[..., Any],
) -> None:
    """insert_async waits for the server on the event loop without blocking it (a thread's
    answer reaches the loop meanwhile); cancelled while the server has not answered, its
    connection does not go back to the pool mid-statement: with a pool of one, the next calls
    (from the loop and from a thread) work."""
    store = replicas(min_connections=1, max_connections=1)
    names = [f"operations/{uuid.uuid4()}" for _ in range(2)]

    async def scenario() -> None:
        with ops_locked(store) as waiting:
            task = asyncio.create_task(
                store.insert_async(Operation(name=names[0]), NOW, NewOperation(method="/t.S/M"))
            )
            # The loop stays free: thread calls complete while the insert waits for its lock.
            while await asyncio.to_thread(waiting) == 0:
                pass
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        record = await store.insert_async(
            Operation(name=names[1]), NOW, NewOperation(method="/t.S/M")
        )
        assert record.operation.name == names[1]

    on_a_watched_loop(scenario)
    assert store.get(names[1]) is not None
    assert add(store)  # the sync path too


def test_an_async_write_with_no_free_connection_is_taken_over_by_a_thread(
    replicas: Callable[..., Any],
) -> None:
    """With the pool's one connection busy (a blocking insert waiting for a lock), insert_async
    does not wait for it on the event loop: a thread does, and both creates are stored once
    the lock is gone."""
    store = replicas(min_connections=1, max_connections=1)
    first, second = (f"operations/{uuid.uuid4()}" for _ in range(2))

    async def scenario() -> None:
        with ops_locked(store) as waiting:
            blocked, raised = in_thread(lambda: add(store, first))
            while await asyncio.to_thread(waiting) == 0:
                pass
            task = asyncio.create_task(
                store.insert_async(Operation(name=second), NOW, NewOperation(method="/t.S/M"))
            )
            ticks = 0
            while ticks < 100:  # the loop runs on while the insert waits (not on the loop)
                await asyncio.sleep(0)
                ticks += 1
            assert not task.done()
        assert (await task).operation.name == second
        await asyncio.to_thread(blocked.join, LONG)
        assert not raised

    on_a_watched_loop(scenario)
    assert store.get(first) is not None and store.get(second) is not None


@pytest.mark.parametrize("call", ["insert_async", "finish_async"])
def test_an_async_write_whose_backend_ended_in_flight_is_done_once(
    replicas: Callable[..., Any], call: str
) -> None:
    """The server process ends while insert_async (finish_async) waits for its answer: the write
    runs again on a fresh connection from a thread, and is done exactly once."""
    app = f"lrofw-async-{uuid.uuid4().hex[:8]}"
    store = replicas(application_name=app, min_connections=1)
    name = f"operations/{uuid.uuid4()}"
    packed = lrofw._core.pack(Response(installed_image="done"))
    if call == "finish_async":
        add(store, name, owner="me")

    async def scenario() -> Any:
        with ops_locked(store) as waiting:
            if call == "insert_async":
                write = store.insert_async(Operation(name=name), NOW, NewOperation(method="/t.S/M"))
            else:
                write = store.finish_async(name, NOW + 1, response=packed, owner="me")
            task = asyncio.create_task(write)
            while await asyncio.to_thread(waiting) == 0:
                pass
            assert await asyncio.to_thread(terminate, app) >= 1
        return await task

    record = on_a_watched_loop(scenario)
    assert record is not None and record.operation.name == name
    stored = store.get(name)
    assert stored is not None and stored.position == record.position
    assert stored.operation.done == (call == "finish_async")
    assert len(store.list(MatchAll(), None, 10)[0]) == 1


def test_a_create_whose_caller_left_while_it_was_stored_still_runs(
    replicas: Callable[..., Any],
) -> None:
    """On an asyncio server, a create RPC that passes its deadline while its insert waits for the
    server: the operation stored once the lock is gone still runs to its end (not left
    unfinished with nothing running it)."""
    store = replicas()
    ran = threading.Event()

    def handler(request: Any, op: Any) -> Response:
        ran.set()
        return Response(installed_image="done")

    with served(handler, manager=manager(store), aio=True) as srv:
        with ops_locked(store) as waiting:
            stub = tls_pb2_grpc.CommonStub(srv.channel)
            call = stub.ProvisionDut.future(Request(name="dut"), timeout=LONG)
            eventually(lambda: waiting() > 0, "the create's insert waiting for the lock")
            call.cancel()  # the caller goes away; the server's RPC task is cancelled
            with pytest.raises(grpc.FutureCancelledError):
                call.result()
        assert ran.wait(LONG)
        eventually(
            lambda: [r.operation.done for r in store.list(MatchAll(), None, 10)[0]] == [True],
            "the one operation done",
        )


def test_while_the_server_is_down_calls_fail_at_once_and_the_store_recovers(
    replicas: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server goes away (its connections cut, new ones refused): each call fails with
    StoreUnavailable in well under a second, not after connect_timeout. Once the server is back,
    calls succeed again within a few seconds; and after an outage long enough for the pool to
    give up connecting, with no call meanwhile, the first call once it is back succeeds (though
    connecting takes longer than the store's glance at the pool's last failure)."""
    from lrofw.stores import _pg_pool

    monkeypatch.setattr(_pg_pool, "RECONNECT", 0.3)  # the pool gives up on a connection sooner
    pause = threading.Event()  # never set: what is waited for is time itself
    proxy = CuttingProxy()
    try:
        store = replicas(dsn=proxy.dsn, min_connections=2, connect_timeout=20.0)
        name = add(store)
        for outage in ("with calls", "without calls"):
            proxy.close()
            for _ in range(5 if outage == "with calls" else 1):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match=r"cannot be read: .*refused"):
                    store.get(name)
                assert time.monotonic() - started < 1.0
            if outage == "with calls":
                proxy = CuttingProxy(proxy.port)
                returned = time.monotonic()

                def answered() -> bool:
                    with contextlib.suppress(StoreUnavailable):
                        return store.get(name) is not None
                    return False

                eventually(answered, "a call that succeeds once the server is back")
                assert time.monotonic() - returned < 5.0
            else:
                # The pool gives up connecting; its last failure grows older than RECONNECT, so
                # it no longer stands for the server's state.
                pause.wait(3 * _pg_pool.RECONNECT)
                proxy = CuttingProxy(proxy.port, latency=4 * _pg_pool.GLANCE)
                assert store.get(name) is not None
    finally:
        proxy.close()


def test_an_async_write_while_the_server_is_down_fails_at_once_and_recovers(
    replicas: Callable[..., Any],
) -> None:
    """insert_async during an outage (connections cut, new ones refused) fails with
    StoreUnavailable within a second, as a thread's call does; it succeeds again once the server
    is back."""
    proxy = CuttingProxy()
    try:
        store = replicas(dsn=proxy.dsn, min_connections=2, connect_timeout=20.0)

        def insert() -> Any:
            new = NewOperation(method="/t.S/M")
            return asyncio.run(
                store.insert_async(Operation(name=f"operations/{uuid.uuid4()}"), NOW, new)
            )

        assert insert() is not None
        proxy.close()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"cannot be written: .*refused"):
            insert()
        assert time.monotonic() - started < 1.0
        proxy = CuttingProxy(proxy.port)

        def inserted() -> bool:
            with contextlib.suppress(StoreUnavailable):
                return insert() is not None
            return False

        eventually(inserted, "an async write that succeeds once the server is back")
    finally:
        proxy.close()


def test_pooled_connections_carry_the_timeouts_and_keepalives(
    replicas: Callable[..., Any],
) -> None:
    """Each pooled connection has the store's statement and idle-in-transaction timeouts and
    TCP keepalives; a statement that runs past its timeout fails with StoreUnavailable."""
    store = replicas(statement_timeout=0.5, idle_in_transaction_timeout=2.0)
    shown = store._db.read(  # white box: the settings as the pooled connection sees them
        lambda conn: (
            conn.execute(
                "SELECT current_setting('statement_timeout'),"
                " current_setting('idle_in_transaction_session_timeout')"
            ).fetchone(),
            conn.info.get_parameters().get("keepalives_idle"),
        )
    )
    assert shown == (("500ms", "2s"), "5")
    with pytest.raises(StoreUnavailable, match="statement timeout"):
        store._db.read(lambda conn: conn.execute("SELECT pg_sleep(5)"))
    assert add(store)  # the connection is still good


def test_statements_deallocated_under_the_store_are_prepared_again(
    replicas: Callable[..., Any],
) -> None:
    """DEALLOCATE ALL on the pooled connection (as a pooler's reset would do): the next calls
    prepare their statements again and succeed."""
    store = replicas(max_connections=1)  # one connection: the one deallocated is the next used
    name = add(store)
    assert store.get(name) is not None
    store._db.run(lambda conn: conn.execute("DEALLOCATE ALL"), "written")  # white box
    assert store.get(name) is not None
    packed = lrofw._core.pack(Response(installed_image="done"))
    assert store.finish(name, NOW, response=packed) is not None


def test_a_store_without_its_server_answers_unavailable(replicas: Callable[..., Any]) -> None:
    """A closed store (as one whose server is gone) raises StoreUnavailable, never a backend
    error; so the manager answers UNAVAILABLE."""
    store = replicas()
    store.close()
    with pytest.raises(StoreUnavailable):
        store.get("operations/x")


# --- wake-ups between replicas --------------------------------------------------------------------


def test_a_waiter_on_one_replica_wakes_when_another_finishes(
    replicas: Callable[..., Any],
) -> None:
    """Manager B waits on an op that manager A finishes: B's wait returns it done."""
    a, b = manager(replicas()), manager(replicas())
    try:
        for _ in range(5):
            name = a.new_operation("/t.S/M").name
            got: list[Operation] = []
            thread, failures = in_thread(lambda n=name, g=got: g.append(b.wait(n, timeout=LONG)))
            eventually(lambda n=name: b.registry.is_waited(n), "B's waiter")
            a.set_result(name, Response(installed_image="done on A"))
            thread.join(LONG)
            assert not failures and got and got[0].done
    finally:
        a.close()
        b.close()


def test_a_notification_wakes_the_watcher_without_waiting_for_its_poll(
    replicas: Callable[..., Any],
) -> None:
    """B polls only once a minute: its subscriber still hears of A's finish as soon as it is
    notified (the store's on_change pokes B's watcher), long before B's next poll."""
    a, b = manager(replicas()), manager(replicas(), poll_interval=60.0)
    try:
        name = a.new_operation("/t.S/M").name
        woken = threading.Event()
        unsubscribe = b.subscribe(name, woken.set)
        a.set_result(name, Response(installed_image="done on A"))
        assert woken.wait(LONG), "B heard of the finish only at its poll"
        unsubscribe()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("lose_notification", [False, True])
def test_a_cancel_through_one_replica_reaches_the_handler_on_another(
    replicas: Callable[..., Any], lose_notification: bool
) -> None:
    """CancelOperation through B stops the handler running under A, also when A's listening
    connection is dropped (the notification lost): reconnect and resync still deliver it."""
    app = f"lrofw-cancel-{uuid.uuid4().hex[:8]}"
    a, b = manager(replicas(application_name=app)), manager(replicas())
    try:
        seen = threading.Event()
        started = threading.Event()

        def handler(request: Any, op: lrofw.OperationContext) -> Any:
            started.set()
            if op.sleep(LONG):  # woken by the cancel
                seen.set()
            return Response()

        name = a.launch(MethodRunner("/t.S/M", handler, Response), Request()).name
        assert started.wait(LONG)
        if lose_notification:
            assert terminate(f"{app}-listen") == 1
        assert b.cancel(name).error.code == 1
        assert seen.wait(LONG)
    finally:
        a.close()
        b.close()


def test_changes_made_while_a_notification_waits_share_the_next_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first change is notified at once; the changes of the next COALESCE seconds wait and
    go out together in one statement (none of them cuts the wait short; closing sends them)."""
    from lrofw.stores import _pg_notify

    monkeypatch.setattr(_pg_notify, "COALESCE", 1.0)
    sent: list[list[str]] = []
    first = threading.Event()

    def send(payloads: list[str]) -> None:
        sent.append(payloads)
        first.set()

    notifier = _pg_notify.Notifier(send, "me")
    try:
        notifier.post(["operations/a"])
        assert first.wait(LONG)
        pause = threading.Event()  # never set
        for i in range(5):
            pause.wait(0.01)  # each post comes while the notifier waits out the interval
            notifier.post([f"operations/b{i}"])
    finally:
        notifier.close()  # sends what is pending
    assert sent == [
        ["me\noperations/a"],
        ["me\n" + "\n".join(f"operations/b{i}" for i in range(5))],
    ]


@contextlib.contextmanager
def overheard(schema: str) -> Iterator[Callable[[], list[str]]]:
    """A connection of the test's own listening on the store's channel (it never says hello, so
    no store counts it); yields ``heard()``: every payload sent on the channel so far (each call
    makes a round trip first: a notification of its own, and what came before it)."""
    from lrofw.stores import _pg_schema

    channel = _pg_schema.channel(schema)
    payloads: list[str] = []
    with pgschemas.connect() as conn:
        conn.execute(f'LISTEN "{channel}"')

        def heard() -> list[str]:
            mark = f"mark-{uuid.uuid4()}"
            conn.execute("SELECT pg_notify(%s, %s)", (channel, mark))
            for notification in conn.notifies(timeout=LONG):
                if notification.payload == mark:
                    break
                payloads.append(notification.payload)
            return list(payloads)

        yield heard


def test_a_replica_alone_notifies_no_one_until_another_listens(
    replicas: Callable[..., Any],
) -> None:
    """A store that has heard no other store sends no notifications (no one would receive
    them), only its hello; once a second replica listens, its finishes are notified again."""
    from lrofw.stores import _pg_notify

    probe = replicas()  # makes the fixture's schema, and is gone before A listens
    probe.close()
    schema = probe.schema
    with overheard(schema) as heard:
        a = replicas(resync_interval=60.0)  # no slow tick: its one hello is the one on LISTEN
        eventually(lambda: a.version() > 0, "A's LISTEN")
        alone = add(a)
        assert a.finish(alone, NOW, response=lrofw._core.pack(Response()), owner=None)
        a.close()  # sends whatever it had pending
        sent = heard()
        assert sent and all(_pg_notify.parse(p)[1] == _pg_notify.ANNOUNCE for p in sent), sent

        a, b = replicas(resync_interval=60.0), replicas(resync_interval=60.0)
        done: list[str] = []

        def notified() -> bool:
            # A notifies once it has heard B's hello (a moment after both listen): finishes
            # before that are not notified, and B reads them when it hears A's welcome.
            done.append(add(a))
            assert a.finish(done[-1], NOW, response=lrofw._core.pack(Response()), owner=None)
            names = {n for p in heard() for n in p.split("\n")[1:]}
            return bool(names & set(done))

        eventually(notified, "A's notification")
        assert b.version() > 0


@pytest.mark.parametrize(
    ("payload", "parsed"),
    [
        ("s1\noperations/a\noperations/b", ("s1", "", None)),
        ("s1 announce 1", ("s1", "announce", 1.0)),
        ("s1 welcome 0.5", ("s1", "welcome", 0.5)),
        ("s1 announce inf", ("s1", "announce", None)),
        ("s1 announce nan", ("s1", "announce", None)),
        ("s1 announce -3", ("s1", "announce", None)),
        ("s1 announce soon", ("s1", "announce", None)),
    ],
)
def test_a_peer_payload_gives_its_sender_kind_and_a_usable_interval(
    payload: str, parsed: tuple[str, str, float | None]
) -> None:
    """An interval a peer announces that is not a positive finite number is not taken (the
    listener's own is assumed), so no payload keeps a replica counting a peer forever."""
    from lrofw.stores import _pg_notify

    assert _pg_notify.parse(payload) == parsed


def test_a_notification_read_during_a_listeners_own_round_trip_is_counted_at_once() -> None:
    """Found as the test below failing on a loaded machine: psycopg reads the notifications that
    arrive while the listener makes a round trip of its own (a hello) into its backlog, where
    the socket no longer shows them; the listener waited on the socket and counted them only at
    its next slow tick (here a minute). Here another store's change arrives within the
    listener's first hello's round trip: it is counted at once."""
    from lrofw.stores import _pg_notify

    channel = f"lrofw_backlog_{uuid.uuid4().hex}"
    change = _pg_notify.payloads(["operations/x"], "another")[0]

    class Chatty(_pg_notify.Listener):
        def _hello(self, conn: Any, kind: str) -> None:
            # One statement: the hello and another store's change, both delivered to this
            # session before the statement's own answer.
            conn.execute(
                "SELECT pg_notify(%s, %s), pg_notify(%s, %s)",
                (channel, _pg_notify.hello(self._me, kind, 60.0), channel, change),
            )

    listener = Chatty(pgschemas.connect, channel, resync=60.0, me="me")
    try:
        assert listener.listening.wait(LONG)
        # 1 for the LISTEN; the change makes it 2 at once (the slow tick is a minute away).
        eventually(lambda: listener.version >= 2, "the change counted")
    finally:
        listener.close()


def test_replicas_that_meet_reread_after_each_knows_the_other() -> None:
    """Two listeners greet each other: each one's count moves (its manager re-reads what it
    waits on) at a moment when the other already counts it as listening, so a change the other
    made before it knew, and did not notify, is read then, not at the next slow tick."""
    from lrofw.stores import _pg_notify

    # A channel of its own: a store of another test still listening on the run's schema would
    # greet both, and count as their audience.
    channel = f"lrofw_meet_{uuid.uuid4().hex}"
    listeners: dict[str, _pg_notify.Listener] = {}
    seen: dict[str, list[bool]] = {"a": [], "b": []}

    class Seen(_pg_notify.Listener):
        """Notes, at each move of its count, whether the other listener counts it as listening.
        From its thread's first move on: a callback registered once the constructor returned
        could miss the moves of a quick meeting (found as a flaky test)."""

        def __init__(self, me: str, other: str) -> None:
            self.other = other
            listeners[me] = self
            super().__init__(pgschemas.connect, channel, resync=60.0, me=me)

        def _bump(self, by: int = 1) -> None:
            peer = listeners.get(self.other)
            try:
                seen[self._me].append(peer is not None and peer.audience())
            except AttributeError:  # the other one is still being made
                seen[self._me].append(False)
            super()._bump(by)

    Seen("a", "b")
    try:
        assert listeners["a"].listening.wait(LONG)
        assert not listeners["a"].audience()  # no one else yet
        Seen("b", "a")
        eventually(lambda: True in seen["a"] and True in seen["b"], "a re-read after each met")
        assert listeners["a"].audience() and listeners["b"].audience()
    finally:
        for listener in listeners.values():
            listener.close()


def test_names_and_filters_with_nul_characters_match_nothing(replicas: Callable[..., Any]) -> None:
    """PostgreSQL text holds no NUL: a name or filter value with one is simply never found, as in
    every other store; storing one is a ValueError that says why."""
    from lrofw.listing import parse_filter

    store = replicas()
    name = add(store)
    assert store.get("operations/\x00") is None
    assert not store.delete("operations/\x00")
    assert store.states([name, "operations/\x00"]) == {name: False}
    assert store.list(parse_filter('name = "a\x00"'), None, 10)[0] == []
    assert [r.operation.name for r in store.list(parse_filter('name != "a\x00"'), None, 10)[0]] == [
        name
    ]
    assert store.list(MatchAll(), None, 10, principal="a\x00") == ([], None)
    with pytest.raises(ValueError, match="NUL character"):
        add(store, "operations/\x00")
