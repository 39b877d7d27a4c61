"""Prometheus metrics (lrofw.metrics) of real servers, scraped over HTTP from ``/metrics``:
counts and labels against the operations each test ran, on sync and aio servers and in the
example process with ``--metrics-address``."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import grpc
import prometheus_client
import pytest
import tls_pb2
import tls_pb2_grpc
from factories import (
    LONG,
    METHOD,
    RESPONSE,
    cancel,
    common,
    create,
    eventually,
    finished,
    get,
    on_both_servers,
    rpc_error,
    waiting,
)
from faulty import Faulty
from google.longrunning import operations_pb2, operations_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import lrofw
import lrofw.metrics
from lrofw.stores.base import StoreCorrupted, StoreUnavailable
from lrofw.stores.memory import MemoryStore
from lrofw.testing import Served, serve

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "examples" / "tls_provision" / "server.py"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    "PYTHONUNBUFFERED": "1",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample ``url`` serves, by name and labels, read with prometheus_client's parser."""
    with urllib.request.urlopen(url, timeout=LONG) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample ``name{labels}``, or None when it is not there."""
    return samples.get((name, frozenset(labels.items())))


@contextlib.contextmanager
def metrics_http(registry: prometheus_client.CollectorRegistry) -> Iterator[str]:
    """``registry`` served over HTTP on a free port: its ``/metrics`` URL."""
    httpd, thread = prometheus_client.start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/metrics"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(LONG)


def steered(gate: threading.Event) -> Any:
    """A handler whose outcome the request name picks: ``ok``, ``bad`` (FAILED_PRECONDITION),
    ``boom`` (a bug: INTERNAL) or ``hold`` (blocks until ``gate``, then OK unless cancelled)."""

    def handler(request: Any, op: lrofw.OperationContext) -> object:
        if request.name == "bad":
            raise lrofw.errors.FailedPrecondition("the DUT is not ready")
        if request.name == "boom":
            raise RuntimeError("a bug")
        if request.name == "hold":
            gate.wait(LONG)
        return RESPONSE

    return handler


def held(srv: Served, gate: threading.Event) -> str:
    """Creates a ``hold`` operation and returns its name once its handler runs."""
    name = create(srv, "hold").name
    eventually(lambda: srv.manager.registry.load()[0].get(METHOD) == 1, "the handler running")
    return name


@on_both_servers
def test_counts_and_labels_match_the_operations_run(aio: bool) -> None:
    """3 OK, 2 FAILED_PRECONDITION, 1 INTERNAL, 1 CANCELLED: started, finished{code}, the
    duration histogram's counts, running while one holds, waiters while a wait holds."""
    registry = prometheus_client.CollectorRegistry()
    manager = lrofw.Manager()
    lrofw.metrics.enable(manager, registry)
    lrofw.metrics.enable(manager, registry)  # again: counted once
    gate = threading.Event()
    with (
        serve(common(steered(gate)), manager=manager, aio=aio) as srv,
        metrics_http(registry) as url,
    ):
        names = [create(srv, name).name for name in ["ok", "ok", "ok", "bad", "bad", "boom"]]
        for name in names:
            finished(srv, name)
        holding = held(srv, gate)
        waiter = operations_pb2_grpc.OperationsStub(srv.channel).WaitOperation.future(
            operations_pb2.WaitOperationRequest(name=holding), timeout=LONG
        )
        waiting(srv, holding)
        during = scrape(url)
        cancel(srv, holding)
        waiter.result(LONG)
        gate.set()
        eventually(lambda: not srv.manager.registry.load()[0], "the handler to return")
        after = scrape(url)
    assert value(during, "lrofw_operations_running", method=METHOD) == 1
    assert value(during, "lrofw_waiters") == 1
    assert value(during, "lrofw_operations_queued") == 0
    assert value(after, "lrofw_operations_running", method=METHOD) is None
    assert value(after, "lrofw_waiters") == 0
    assert value(after, "lrofw_operations_started_total", method=METHOD) == 7
    codes = {"OK": 3, "FAILED_PRECONDITION": 2, "INTERNAL": 1, "CANCELLED": 1}
    for code, count in codes.items():
        assert value(after, "lrofw_operations_finished_total", method=METHOD, code=code) == count
        duration = "lrofw_operation_duration_seconds_count"
        assert value(after, duration, method=METHOD, code=code) == count
    assert value(after, "lrofw_operations_rescued_total") == 0
    assert value(after, "lrofw_store_errors_total", kind="unavailable") == 0


def test_expired_and_several_managers_add_up() -> None:
    """Operations removed by expiry are counted; two managers on one registry add up."""
    registry = prometheus_client.CollectorRegistry()
    first, second = lrofw.Manager(), lrofw.Manager()
    with first, second, metrics_http(registry) as url:
        for manager in (first, second):
            lrofw.metrics.enable(manager, registry)
            op = manager.new_operation()
            manager.set_result(op.name, RESPONSE)
        assert first.expire(now=time.time() + 31 * 86400) == 1
        samples = scrape(url)
    assert value(samples, "lrofw_operations_started_total", method="") == 2
    assert value(samples, "lrofw_operations_finished_total", method="", code="OK") == 2
    assert value(samples, "lrofw_operations_expired_total") == 1


def test_store_errors_are_counted_by_kind() -> None:
    """A store that fails: an insert that is UNAVAILABLE counts kind="unavailable", a read
    that finds the store corrupt kind="corrupted", and the RPCs answer UNAVAILABLE and
    DATA_LOSS."""
    registry = prometheus_client.CollectorRegistry()
    store = Faulty(MemoryStore())
    manager = lrofw.Manager(store=store)
    lrofw.metrics.enable(manager, registry)
    with serve(common(steered(threading.Event())), manager=manager) as srv:
        store.fail("insert", StoreUnavailable("the disk is gone"), times=1)
        refused = rpc_error(lambda: create(srv, "ok"))
        name = create(srv, "ok").name
        finished(srv, name)
        store.fail("get", StoreCorrupted("the file is damaged"), times=1)
        damaged = rpc_error(lambda: get(srv, name))
        samples = scrape_registry(registry)
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert damaged.code() == grpc.StatusCode.DATA_LOSS
    assert value(samples, "lrofw_store_errors_total", kind="unavailable") == 1
    assert value(samples, "lrofw_store_errors_total", kind="corrupted") == 1
    assert value(samples, "lrofw_store_errors_total", kind="other") == 0
    assert value(samples, "lrofw_operations_started_total", method=METHOD) == 1


def scrape_registry(registry: prometheus_client.CollectorRegistry) -> Samples:
    """The samples ``registry`` would serve, without HTTP."""
    with metrics_http(registry) as url:
        return scrape(url)


@pytest.mark.parametrize("registry", ["REGISTRY", 3])
def test_enable_refuses_what_is_not_a_registry_or_manager(registry: Any) -> None:
    """enable() with a wrong manager or registry: TypeError naming the argument."""
    with pytest.raises(TypeError, match=r"manager must be an lrofw\.Manager"):
        lrofw.metrics.enable(registry)  # type: ignore[arg-type]
    with lrofw.Manager() as manager, pytest.raises(TypeError, match="registry must be"):
        lrofw.metrics.enable(manager, registry)


def test_enable_refuses_a_registry_with_lrofw_names_it_did_not_make() -> None:
    """A registry that already has lrofw_operations_started_total: ValueError, not a clash."""
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("lrofw_operations_started", "theirs", registry=registry)
    with lrofw.Manager() as manager, pytest.raises(ValueError, match="another"):
        lrofw.metrics.enable(manager, registry)


# --- the example ------------------------------------------------------------------------------


def read_line(stream: IO[str]) -> str:
    """One line from ``stream``; fails the test if none comes within LONG seconds."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(LONG)
    if not result:
        pytest.fail(f"no line within {LONG}s")
    return result[0]


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_example_serves_metrics(tmp_path: Path, aio: bool) -> None:
    """server.py --metrics-address 127.0.0.1:0: /metrics counts the operations run through it
    (OK, NOT_FOUND for an unknown DUT, CANCELLED)."""
    command = [
        sys.executable, str(SERVER), "--store", "memory:", "--step-seconds", "0",
        "--address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
        *(["--aio"] if aio else []),
    ]  # fmt: skip
    stderr = (tmp_path / "server.stderr").open("w")
    with (
        stderr,
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=ENV) as p,
    ):
        try:
            assert p.stdout is not None
            target = re.fullmatch(r"listening on (\S+)\n", read_line(p.stdout))
            url = re.fullmatch(r"metrics on (http://\S+/metrics)\n", read_line(p.stdout))
            assert target and url, (tmp_path / "server.stderr").read_text()
            with grpc.insecure_channel(target.group(1)) as channel:
                stub = tls_pb2_grpc.CommonStub(channel)
                ops = operations_pb2_grpc.OperationsStub(channel)
                for name in ("some host", "some host", "no such host"):
                    op = stub.ProvisionDut(tls_pb2.ProvisionDutRequest(name=name), timeout=LONG)
                    request = operations_pb2.WaitOperationRequest(name=op.name)
                    assert ops.WaitOperation(request, timeout=LONG).done
            samples = scrape(url.group(1))
        finally:
            p.terminate()
            p.wait(LONG)
    method = "/chromiumos.config.api.test.tls.Common/ProvisionDut"
    assert value(samples, "lrofw_operations_started_total", method=method) == 3
    assert value(samples, "lrofw_operations_finished_total", method=method, code="OK") == 2
    assert value(samples, "lrofw_operations_finished_total", method=method, code="NOT_FOUND") == 1


def test_lrofw_never_imports_prometheus_client() -> None:
    """import lrofw (and serving with it) leaves prometheus_client unimported: it is optional."""
    code = (
        "import sys, lrofw, lrofw.testing, lrofw.aio\n"
        "assert 'prometheus_client' not in sys.modules, 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, timeout=LONG)
