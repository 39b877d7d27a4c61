"""Fenced code blocks of Markdown pages, and the hidden doctest markers around them.

The conventions (docs/testing.md's "Documentation that runs" states them for authors):

- A fenced block opens with a line of three or more backticks (or tildes) and an info string whose
  first word is the language (```` ```python ````); it closes with a fence at least as long.
- The HTML comment ``<!-- doctest: fragment -->`` on the last non-blank line before a block marks
  it a fragment: a Python fragment is only compiled, never run.
- Hidden code: the lines between a line opening with ``<!-- doctest: setup`` and the next line
  holding ``-->`` are Python, run (in the page's namespace) just before the next Python block, or
  after the page's last block when none follows (to close what the page left open).

Example:
    >>> text = "<!-- doctest: setup\\nx = 1\\n-->\\n```python\\nprint(x)\\n```\\n"
    >>> page = parse_text(text, "p.md")
    >>> [(block.lang, block.line, block.source, block.setup[0].source) for block in page.blocks]
    [('python', 5, 'print(x)\\n', 'x = 1\\n')]
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

FRAGMENT = "<!-- doctest: fragment -->"
SETUP_OPEN = "<!-- doctest: setup"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")


@dataclasses.dataclass(frozen=True)
class Hidden:
    """Hidden Python in a ``<!-- doctest: setup`` comment: its code and first line's number."""

    source: str
    line: int


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block: language, its first code line's number, code, markers."""

    path: pathlib.Path
    lang: str
    line: int
    source: str
    fragment: bool = False
    setup: tuple[Hidden, ...] = ()

    @property
    def where(self) -> str:
        """``file:line`` of the block's first code line, for messages."""
        return f"{self.path}:{self.line}"


@dataclasses.dataclass(frozen=True)
class Page:
    """The blocks of one page, in order, and hidden code after the last Python block."""

    path: pathlib.Path
    blocks: tuple[Block, ...]
    trailing: tuple[Hidden, ...] = ()


def parse(path: pathlib.Path, display: pathlib.Path | None = None) -> Page:
    """Parses the Markdown file at ``path`` (named ``display`` in messages)."""
    return parse_text(path.read_text(encoding="utf-8"), display or path)


def parse_text(text: str, path: str | pathlib.Path) -> Page:
    """Parses Markdown ``text``; see the module's docstring for the conventions."""
    path = pathlib.Path(path)
    lines = text.splitlines()
    blocks: list[Block] = []
    pending: list[Hidden] = []
    previous = ""  # the last non-blank line outside blocks and comments
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(SETUP_OPEN):
            hidden, i = _hidden(lines, i, path)
            pending.append(hidden)
            previous = ""
            continue
        match = _FENCE.match(line)
        if match is None:
            if stripped:
                previous = stripped
            i += 1
            continue
        fence, indent = match["fence"], len(match["indent"])
        lang = (match["info"].split() or [""])[0].lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = lines[j].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        else:
            raise ValueError(f"{path}:{i + 1}: a fenced block that is never closed")
        block = Block(
            path=path,
            lang=lang,
            line=i + 2,
            source="".join(b + "\n" for b in body),
            fragment=previous == FRAGMENT,
            setup=tuple(pending) if lang in PYTHON else (),
        )
        if lang in PYTHON:
            pending = []
        blocks.append(block)
        previous = ""
        i = j + 1
    return Page(path=path, blocks=tuple(blocks), trailing=tuple(pending))


PYTHON = frozenset({"python", "py", "python3", "pycon"})
SHELL = frozenset({"sh", "shell", "bash", "console", "shell-session", "zsh"})


def _hidden(lines: list[str], start: int, path: pathlib.Path) -> tuple[Hidden, int]:
    """The hidden code of the comment opening at ``lines[start]``, and the index after it."""
    first = lines[start].strip()[len(SETUP_OPEN) :]
    if "-->" in first:  # <!-- doctest: setup x = 1 -->, on one line
        return Hidden(first.split("-->", 1)[0].strip() + "\n", start + 1), start + 1
    body: list[str] = []
    j = start + 1
    while j < len(lines):
        if "-->" in lines[j]:
            before = lines[j].split("-->", 1)[0]
            if before.strip():
                body.append(before)
            return Hidden("".join(b + "\n" for b in body), start + 2), j + 1
        body.append(lines[j])
        j += 1
    raise ValueError(f"{path}:{start + 1}: a '{SETUP_OPEN}' comment that is never closed")
