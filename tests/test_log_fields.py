"""Every log line about an operation carries ``operation`` and ``method`` (LogRecord attributes)."""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import pytest
from factories import METHOD, RESPONSE, create, finished, on_both_servers, served
from google.longrunning.operations_pb2 import Operation

import lrofw
from lrofw.stores import SQLiteStore
from lrofw.stores.base import NewOperation


def about(caplog: pytest.LogCaptureFixture, text: str) -> logging.LogRecord:
    """The one captured record whose message contains ``text``."""
    found = [record for record in caplog.records if text in record.getMessage()]
    assert len(found) == 1, [record.getMessage() for record in caplog.records]
    return found[0]


@on_both_servers
def test_a_handler_that_raises_is_logged_with_its_operation_and_method(
    caplog: pytest.LogCaptureFixture, aio: bool
) -> None:
    """The INTERNAL outcome's log line names the operation and its method."""

    def fail(request: Any, op: lrofw.OperationContext) -> object:
        raise ValueError("broken")

    caplog.set_level(logging.INFO, logger="lrofw")
    with served(fail, aio=aio) as srv:
        name = create(srv).name
        finished(srv, name)
    record = about(caplog, f"{name}: handler raised ValueError")
    assert (record.operation, record.method) == (name, METHOD)
    assert record.levelno == logging.ERROR and record.exc_info is not None


def test_a_refused_completion_is_logged_with_its_operation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A second set_result is refused; its warning names the operation (method unknown: "")."""
    caplog.set_level(logging.INFO, logger="lrofw")
    with lrofw.Manager() as manager:
        name = manager.new_operation(METHOD).name
        assert manager.set_result(name, RESPONSE)
        assert not manager.set_result(name, RESPONSE)
    record = about(caplog, f"{name}: completion refused, it already ended with code 0")
    assert (record.operation, record.method) == (name, "")
    assert record.levelno == logging.WARNING


def test_a_recovered_orphan_is_logged_with_its_operation_and_method(
    caplog: pytest.LogCaptureFixture, tmp_path: pathlib.Path
) -> None:
    """An orphan ended ABORTED at start: the warning names the operation and its method."""
    caplog.set_level(logging.INFO, logger="lrofw")
    store = SQLiteStore(str(tmp_path / "ops.db"))
    try:
        name = "operations/orphaned"
        store.insert(Operation(name=name), 0.0, NewOperation(method="/t.S/M", owner="dead"))
        with lrofw.Manager(store=store) as manager:
            assert manager.get(name).error.code == 10  # ABORTED
    finally:
        store.close()
    record = about(caplog, f"{name}: aborted, its server stopped before it finished")
    assert (record.operation, record.method) == (name, "/t.S/M")

