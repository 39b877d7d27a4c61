"""Bad arguments to every public entry point: a TypeError (wrong type) or ValueError (out of range)
whose message names the parameter, raised at the call, never an AttributeError or a failure later.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import pathlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import tls_pb2_grpc
from factories import Response, create, finished, served
from google.longrunning import operations_pb2

import lrofw
from lrofw import aio as lrofw_aio
from lrofw.stores import MemoryStore, SQLiteStore, StoreUnavailable, open_store
from lrofw.testing import serve


class Servicer(tls_pb2_grpc.CommonServicer):
    """A servicer with one long-running method, never served."""

    @lrofw.long_running(Response)
    def ProvisionDut(self, request: Any, op: Any) -> Any:
        """Never called."""
        return Response()


def _server() -> Any:
    """A grpc server that is never started."""
    return grpc.server(ThreadPoolExecutor(1))


def manager_with(**options: Any) -> None:
    """Makes (and closes, should it be made) a Manager with ``options``."""
    lrofw.Manager(**options).close()


def register(**options: Any) -> None:
    """add_servicer_to_server with good arguments, overridden by ``options``."""
    with lrofw.Manager() as manager:
        arguments: dict[str, Any] = {
            "servicer": Servicer(),
            "server": _server(),
            "manager": manager,
            **options,
        }
        lrofw.add_servicer_to_server(
            arguments.pop("servicer"), arguments.pop("server"), **arguments
        )


def serving(**options: Any) -> None:
    """Enters (and leaves) lrofw.testing.serve with ``options``."""
    with serve(**options):
        pass  # pragma: no cover - the arguments are refused first


def with_manager(call: Callable[[lrofw.Manager], object]) -> None:
    """Calls ``call(manager)`` on a fresh manager, closed afterwards whatever happens."""
    manager = lrofw.Manager()
    try:
        call(manager)
    finally:
        manager.close()


def decorate(**options: Any) -> None:
    """Applies @long_running(Response, **options) to a handler."""

    def handler(request: Any, op: Any) -> Any:
        return Response()  # pragma: no cover - never called

    lrofw.long_running(**{"response_type": Response, **options})(handler)


def wait_on(channel: Any, **options: Any) -> None:
    """lrofw.wait on a channel to nowhere: the arguments are refused before any call."""
    lrofw.wait(channel, "operations/x", **options)


def aio_wait_on(channel: Any, **options: Any) -> None:
    """lrofw.aio.wait, as :func:`wait_on`."""

    async def go() -> None:
        await lrofw_aio.wait(channel, "operations/x", **options)

    asyncio.run(go())


_NOWHERE = "localhost:1"

#: (parameter the message names, expected exception, the call).
CASES: dict[str, tuple[str, type[Exception], Callable[[], object]]] = {
    # --- lrofw.Manager ---
    "Manager-store-int": ("store", TypeError, lambda: manager_with(store=3)),
    "Manager-store-path": ("store", TypeError, lambda: manager_with(store=pathlib.Path("a.db"))),
    "Manager-store-class": ("store", TypeError, lambda: manager_with(store=MemoryStore)),
    "Manager-store-bad-url": ("store", ValueError, lambda: manager_with(store="ops.db")),
    "Manager-max_workers-str": ("max_workers", TypeError, lambda: manager_with(max_workers="8")),
    "Manager-max_workers-float": ("max_workers", TypeError, lambda: manager_with(max_workers=1.5)),
    "Manager-max_workers-bool": ("max_workers", TypeError, lambda: manager_with(max_workers=True)),
    "Manager-max_workers-zero": ("max_workers", ValueError, lambda: manager_with(max_workers=0)),
    "Manager-max_queued-none": ("max_queued", TypeError, lambda: manager_with(max_queued=None)),
    "Manager-max_queued-negative": ("max_queued", ValueError, lambda: manager_with(max_queued=-1)),
    "Manager-ttl-str": ("ttl", TypeError, lambda: manager_with(ttl="30d")),
    "Manager-ttl-zero": ("ttl", ValueError, lambda: manager_with(ttl=0)),
    "Manager-ttl-nan": ("ttl", ValueError, lambda: manager_with(ttl=float("nan"))),
    "Manager-ttl-timedelta-zero": (
        "ttl",
        ValueError,
        lambda: manager_with(ttl=datetime.timedelta(0)),
    ),
    "Manager-max_wait-none": ("max_wait", TypeError, lambda: manager_with(max_wait=None)),
    "Manager-max_wait-inf": ("max_wait", ValueError, lambda: manager_with(max_wait=float("inf"))),
    "Manager-max_wait-timedelta": (
        "max_wait",
        TypeError,
        lambda: manager_with(max_wait=datetime.timedelta(seconds=5)),
    ),
    "Manager-name_prefix-bytes": (
        "name_prefix",
        TypeError,
        lambda: manager_with(name_prefix=b"operations"),
    ),
    "Manager-name_prefix-slash": (
        "name_prefix",
        ValueError,
        lambda: manager_with(name_prefix="/a"),
    ),
    "Manager-clock-float": ("clock", TypeError, lambda: manager_with(clock=1.0)),
    "Manager-expiry_interval-str": (
        "expiry_interval",
        TypeError,
        lambda: manager_with(expiry_interval="60"),
    ),
    "Manager-expiry_interval-zero": (
        "expiry_interval",
        ValueError,
        lambda: manager_with(expiry_interval=0),
    ),
    "Manager-page_token_key-str": (
        "page_token_key",
        TypeError,
        lambda: manager_with(page_token_key="0123456789abcdef0123"),
    ),
    "Manager-page_token_key-short": (
        "page_token_key",
        ValueError,
        lambda: manager_with(page_token_key=b"short"),
    ),
    "Manager-lease-none": ("lease", TypeError, lambda: manager_with(lease=None)),
    "Manager-lease-negative": ("lease", ValueError, lambda: manager_with(lease=-1)),
    "Manager-poll_interval-zero": (
        "poll_interval",
        ValueError,
        lambda: manager_with(poll_interval=0),
    ),
    "Manager-max_abandoned-str": (
        "max_abandoned",
        TypeError,
        lambda: manager_with(max_abandoned="1"),
    ),
    "Manager-max_abandoned-negative": (
        "max_abandoned",
        ValueError,
        lambda: manager_with(max_abandoned=-1),
    ),
    "Manager-max_attempts-float": (
        "max_attempts",
        TypeError,
        lambda: manager_with(max_attempts=2.0),
    ),
    "Manager-max_attempts-zero": ("max_attempts", ValueError, lambda: manager_with(max_attempts=0)),
    "Manager-max_list_scan-zero": (
        "max_list_scan",
        ValueError,
        lambda: manager_with(max_list_scan=0),
    ),
    "Manager-max_metadata_bytes-str": (
        "max_metadata_bytes",
        TypeError,
        lambda: manager_with(max_metadata_bytes="1"),
    ),
    "Manager-max_response_bytes-zero": (
        "max_response_bytes",
        ValueError,
        lambda: manager_with(max_response_bytes=0),
    ),
    # --- Manager methods ---
    "Manager.close-grace-str": ("grace", TypeError, lambda: with_manager(lambda m: m.close("1"))),
    "Manager.close-grace-negative": (
        "grace",
        ValueError,
        lambda: with_manager(lambda m: m.close(grace=-1)),
    ),
    "Manager.aclose-grace-str": (
        "grace",
        TypeError,
        lambda: with_manager(lambda m: asyncio.run(m.aclose(grace="1"))),  # type: ignore[arg-type]
    ),
    "Manager.wait-timeout-str": (
        "timeout",
        TypeError,
        lambda: with_manager(lambda m: m.wait(m.new_operation().name, "5")),  # type: ignore[arg-type]
    ),
    "Manager.wait-timeout-negative": (
        "timeout",
        ValueError,
        lambda: with_manager(lambda m: m.wait(m.new_operation().name, -1)),
    ),
    "Manager.wait_async-timeout-str": (
        "timeout",
        TypeError,
        lambda: with_manager(
            lambda m: asyncio.run(m.wait_async(m.new_operation().name, "5"))  # type: ignore[arg-type]
        ),
    ),
    "Manager.get-name-int": ("name", TypeError, lambda: with_manager(lambda m: m.get(3))),  # type: ignore[arg-type]
    # --- @lrofw.long_running ---
    "long_running-response_type-instance": (
        "response_type",
        TypeError,
        lambda: decorate(response_type=Response()),
    ),
    "long_running-metadata_type-str": (
        "metadata_type",
        TypeError,
        lambda: decorate(metadata_type="M"),
    ),
    "long_running-validate-int": ("validate", TypeError, lambda: decorate(validate=3)),
    "long_running-timeout-str": ("timeout", TypeError, lambda: decorate(timeout="5")),
    "long_running-timeout-zero": ("timeout", ValueError, lambda: decorate(timeout=0)),
    "long_running-request_id-str": ("request_id", TypeError, lambda: decorate(request_id="id")),
    "long_running-inline_timeout-negative": (
        "inline_timeout",
        ValueError,
        lambda: decorate(inline_timeout=-1),
    ),
    "long_running-resumable-str": ("resumable", TypeError, lambda: decorate(resumable="yes")),
    # --- lrofw.add_servicer_to_server ---
    "add_servicer-servicer-object": ("servicer", TypeError, lambda: register(servicer=object())),
    "add_servicer-servicer-class": ("servicer", TypeError, lambda: register(servicer=Servicer)),
    "add_servicer-server-object": ("server", TypeError, lambda: register(server=object())),
    "add_servicer-server-none": ("server", TypeError, lambda: register(server=None)),
    "add_servicer-manager-none": ("manager", TypeError, lambda: register(manager=None)),
    "add_servicer-manager-class": ("manager", TypeError, lambda: register(manager=lrofw.Manager)),
    "add_servicer-max_blocking_waits-str": (
        "max_blocking_waits",
        TypeError,
        lambda: register(max_blocking_waits="2"),
    ),
    "add_servicer-max_blocking_waits-negative": (
        "max_blocking_waits",
        ValueError,
        lambda: register(max_blocking_waits=-1),
    ),
    "add_servicer-identify-str": ("identify", TypeError, lambda: register(identify="peer")),
    "add_servicer-identify-async": ("identify", TypeError, lambda: register(identify=_async_hook)),
    "add_servicer-authorize-int": (
        "authorize",
        TypeError,
        lambda: register(identify=lambda c: "p", authorize=3),
    ),
    "add_servicer-authorize-alone": (
        "authorize",
        ValueError,
        lambda: register(authorize=lambda who, owner: True),
    ),
    # --- OperationsServicer / AsyncOperationsServicer ---
    "OperationsServicer-manager-str": ("manager", TypeError, lambda: lrofw.OperationsServicer("m")),  # type: ignore[arg-type]
    "AsyncOperationsServicer-manager-none": (
        "manager",
        TypeError,
        lambda: lrofw.AsyncOperationsServicer(None),  # type: ignore[arg-type]
    ),
    "OperationsServicer-max_blocking_waits-float": (
        "max_blocking_waits",
        TypeError,
        lambda: with_manager(lambda m: lrofw.OperationsServicer(m, max_blocking_waits=1.5)),  # type: ignore[arg-type]
    ),
    "OperationsServicer-max_blocking_waits-negative": (
        "max_blocking_waits",
        ValueError,
        lambda: with_manager(lambda m: lrofw.OperationsServicer(m, max_blocking_waits=-1)),
    ),
    "OperationsServicer-identify-int": (
        "identify",
        TypeError,
        lambda: with_manager(lambda m: lrofw.OperationsServicer(m, identify=3)),  # type: ignore[arg-type]
    ),
    # --- lrofw.testing.serve ---
    "serve-rpc_threads-zero": ("rpc_threads", ValueError, lambda: serving(rpc_threads=0)),
    "serve-rpc_threads-str": ("rpc_threads", TypeError, lambda: serving(rpc_threads="4")),
    "serve-grace-negative": ("grace", ValueError, lambda: serving(grace=-1)),
    "serve-grace-str": ("grace", TypeError, lambda: serving(grace="1")),
    "serve-manager-object": ("manager", TypeError, lambda: serving(manager=object())),
    "serve-aio-str": ("aio", TypeError, lambda: serving(aio="yes")),
    "serve-identify-str": ("identify", TypeError, lambda: serving(identify="peer")),
    "serve-authorize-alone": (
        "authorize",
        ValueError,
        lambda: serving(authorize=lambda w, o: True),
    ),
    # --- stores ---
    "open_store-url-int": ("url", TypeError, lambda: open_store(3)),  # type: ignore[arg-type]
    "open_store-url-path": ("url", TypeError, lambda: open_store(pathlib.Path("a.db"))),  # type: ignore[arg-type]
    "open_store-url-unknown": ("url", ValueError, lambda: open_store("postgres:")),
    "SQLiteStore-path-int": ("path", TypeError, lambda: SQLiteStore(3)),  # type: ignore[arg-type]
    "SQLiteStore-busy_timeout-str": (
        "busy_timeout",
        TypeError,
        lambda: SQLiteStore("never.db", busy_timeout="5"),  # type: ignore[arg-type]
    ),
    "SQLiteStore-busy_timeout-negative": (
        "busy_timeout",
        ValueError,
        lambda: SQLiteStore("never.db", busy_timeout=-1),
    ),
    "SQLiteStore-check-str": (
        "check",
        TypeError,
        lambda: SQLiteStore("never.db", check="yes"),  # type: ignore[arg-type]
    ),
    # --- clients ---
    "wait-channel-str": ("channel_or_stub", TypeError, lambda: wait_on(_NOWHERE)),
    "wait-timeout-str": (
        "timeout",
        TypeError,
        lambda: wait_on(grpc.insecure_channel(_NOWHERE), timeout="5"),
    ),
    "wait-timeout-negative": (
        "timeout",
        ValueError,
        lambda: wait_on(grpc.insecure_channel(_NOWHERE), timeout=-1),
    ),
    "aio.wait-channel-str": ("channel_or_stub", TypeError, lambda: aio_wait_on(_NOWHERE)),
    "OperationFuture-channel-str": (
        "channel",
        TypeError,
        lambda: lrofw.OperationFuture(_NOWHERE, operations_pb2.Operation(name="o/1"), Response),
    ),
}


async def _async_hook(context: Any) -> str:
    return "p"  # pragma: no cover - refused before it could be called


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run in a temporary directory: a store that should not be opened would leave a file."""
    monkeypatch.chdir(tmp_path)
    yield
    assert not (tmp_path / "never.db").exists(), "a refused SQLiteStore created its file"


@pytest.mark.parametrize(("name", "error", "call"), CASES.values(), ids=CASES.keys())
def test_a_bad_argument_is_refused_naming_it(
    name: str, error: type[Exception], call: Callable[[], object]
) -> None:
    """The call raises TypeError/ValueError (never AttributeError) naming the parameter."""
    threads = threading.active_count()
    try:
        call()
    except Exception as exc:
        assert not isinstance(exc, AttributeError), f"AttributeError: {exc}"
        assert type(exc) is error, f"expected {error.__name__}, got {type(exc).__name__}: {exc}"
        assert name.lower() in str(exc).lower(), f"{name!r} is not named in {str(exc)!r}"
    else:
        pytest.fail(f"no error for a bad {name}")
    assert threading.active_count() <= threads, "a refused call left threads behind"


def test_the_cases_cover_every_public_entry_point() -> None:
    """Every entry point the issue names has at least one case here."""
    points = {case.split("-")[0].split(".")[0] for case in CASES}
    assert points >= {
        "Manager",
        "long_running",
        "add_servicer",
        "OperationsServicer",
        "AsyncOperationsServicer",
        "serve",
        "open_store",
        "SQLiteStore",
        "wait",
        "aio",
        "OperationFuture",
    }


# --- op.sleep, from inside a handler --------------------------------------------------------------


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_op_sleep_refuses_a_bad_duration_naming_it(aio: bool) -> None:
    """``op.sleep("1")`` raises TypeError naming ``seconds`` in the handler (sync and async)."""
    seen: list[BaseException] = []

    async def async_handler(request: Any, op: lrofw.AsyncOperationContext) -> Any:
        try:
            await op.sleep("1")  # type: ignore[arg-type]
        except Exception as exc:
            seen.append(exc)
        return Response()

    def handler(request: Any, op: lrofw.OperationContext) -> Any:
        try:
            op.sleep("1")  # type: ignore[arg-type]
        except Exception as exc:
            seen.append(exc)
        return Response()

    with served(async_handler if aio else handler, aio=aio, asynchronous=aio) as srv:
        assert finished(srv, create(srv).name).HasField("response")
    assert len(seen) == 1 and isinstance(seen[0], TypeError), seen
    assert "seconds" in str(seen[0])


# --- Manager(store=URL): who closes the store --------------------------------------------------


def test_a_store_url_is_opened_and_closed_by_the_manager(tmp_path: pathlib.Path) -> None:
    """Manager(store="sqlite:PATH") opens the file through open_store and closes it on close()."""
    path = tmp_path / "ops.db"
    manager = lrofw.Manager(store=f"sqlite:{path}")
    assert isinstance(manager.store, SQLiteStore) and manager.store.path == str(path)
    name = manager.new_operation().name
    manager.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        manager.store.get(name)
    with contextlib.closing(SQLiteStore(path)) as store:
        assert store.get(name) is not None  # the operation is in the file


def test_a_store_passed_in_stays_open(tmp_path: pathlib.Path) -> None:
    """A Store object given to the manager is the caller's: close() leaves it open."""
    store = SQLiteStore(tmp_path / "ops.db")
    try:
        manager = lrofw.Manager(store=store)
        name = manager.new_operation().name
        manager.close()
        assert store.get(name) is not None  # still usable
    finally:
        store.close()


def test_memory_url_gives_a_memory_store() -> None:
    """Manager(store="memory:") is the same as the default store."""
    with lrofw.Manager(store="memory:") as manager:
        assert isinstance(manager.store, MemoryStore)


def test_an_unknown_store_url_lists_the_supported_forms() -> None:
    """A URL naming no store is a ValueError that tells which forms there are."""
    with pytest.raises(ValueError, match=r"unsupported store URL 'ops\.db'; supported: memory:"):
        lrofw.Manager(store="ops.db")
