"""docs/configuration.md agrees with the code: each table lists every option of its signature (or
the example server's flags), with the code's default."""

from __future__ import annotations

import datetime
import inspect
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import server as example_server

import lrofw
import lrofw.testing
from lrofw.stores import SQLiteStore
from lrofw.stores.postgres import PostgresStore

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
REQUIRED = object()
ROW = re.compile(r"^\| `([^`]+)` \| (required|`([^`]*)`) \|")


def table(heading: str) -> dict[str, object]:
    """The options of the first table under ``heading``: name -> default (REQUIRED, or the
    value of the expression written)."""
    text = PAGE.read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, object] = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match is None:
            if rows:
                break  # the end of the first table
            continue
        name, _, expression = match.groups()
        assert name not in rows, f"{name} is listed twice under {heading}"
        rows[name] = (
            REQUIRED
            if expression is None
            else eval(expression, {"time": time, "datetime": datetime})  # the page's literals
        )
    assert rows, f"no table under {heading}"
    return rows


def options(fn: Callable[..., Any], skip: tuple[str, ...] = ()) -> dict[str, object]:
    """The parameters of ``fn`` (but ``*args``): name -> default, or REQUIRED."""
    return {
        p.name: REQUIRED if p.default is inspect.Parameter.empty else p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is not inspect.Parameter.VAR_POSITIONAL and p.name not in skip
    }


@pytest.mark.parametrize(
    ("heading", "fn"),
    [
        ("Manager", lrofw.Manager),
        ("The decorator", lrofw.long_running),
        ("Registering on a server", lrofw.add_servicer_to_server),
        ("SQLiteStore", SQLiteStore),
        ("PostgresStore", PostgresStore),
    ],
)
def test_a_table_lists_every_option_with_its_default(heading: str, fn: Callable[..., Any]) -> None:
    """Every parameter is a row, every row a parameter, and the defaults agree."""
    assert table(heading) == options(fn)


def test_the_closing_table_lists_every_option_of_close_and_aclose() -> None:
    """Manager.close's options and defaults; aclose takes the same."""
    rows = table("Closing")
    assert rows == options(lrofw.Manager.close, skip=("self",))
    assert rows == options(lrofw.Manager.aclose, skip=("self",))


def test_the_serve_table_lists_every_option_with_its_default() -> None:
    """lrofw.testing.serve's options (its servicers aside) and their defaults."""
    assert table("lrofw.testing.serve") == options(lrofw.testing.serve)


def test_the_example_server_table_lists_every_flag_with_its_default() -> None:
    """The example server's flags (argparse's own --help aside) and their defaults."""
    flags = {
        action.option_strings[-1]: action.default
        for action in example_server.build_parser()._actions  # argparse has no public list
        if action.option_strings and action.option_strings[-1] != "--help"
    }
    assert table("The example server") == flags
