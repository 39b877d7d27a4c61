"""Every error or log message the docs quote is one lrofw can produce.

A quoted message is a backticked span in a table row of README.md or docs/ (outside code blocks),
or a backticked span written ``"..."`` anywhere, that reads as prose (four or more lowercase
words) and is not a filter, a command or code (nor in a table's first column, where the docs put
inputs). Placeholders in the docs (``<name>``, ``N``, ``...``, ``'x'``, numbers) and concrete
values (names with dots, digits or capitals) split it into phrases of prose. Every phrase must be
made of pieces of lrofw/'s string literals (an f-string's or %-format's literal parts, each on its
own; a message may be built from two), each piece two words or more except at the phrase's ends,
or come from a library lrofw relays (``EXTERNAL``).
"""

from __future__ import annotations

import ast
import builtins
import pathlib
import re

import pytest

from lrofw import listing

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]

#: Phrases relayed from other libraries: SQLite's reasons, protoc's, grpc's.
EXTERNAL = (
    "database or disk is full",
    "database disk image is malformed",
    "file is not a database",
    "File not found",
    "Exception deserializing request!",
)

_PLACEHOLDER = re.compile(r"<[^<>]*>|\.\.\.|…|'[^']*'|\"[^\"]*\"|\b[NM]\b|-?\b\d[\d,.]*\b")
_SPAN = re.compile(r"`([^`]+)`")


def _pieces() -> list[str]:
    """The literal parts of every string in lrofw/ (f-strings split at their fields)."""
    out: list[str] = []
    for path in (ROOT / "lrofw").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                out += [v.value for v in node.values if isinstance(v, ast.Constant)]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                out += re.split(r"%[sdr]", node.value)
    return out


def _is_message(text: str) -> bool:
    if len(re.findall(r"\b[a-z]{2,}\b", text)) < 4:
        return False
    if re.match(r"^(await |python|pip |grpc\.|lrofw\.|--|/|\(|@|[\w.]+\()", text):
        return False
    try:
        listing.parse_filter(text)
    except ValueError:
        return True
    return False  # a filter


def quoted() -> list[tuple[str, str]]:
    """(file:line, message) for every message the docs quote."""
    found = []
    for path in PAGES:
        block = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith(("```", "~~~")):
                block = not block
                continue
            if block:
                continue
            row = line.lstrip().startswith("|")
            first_cell = line.lstrip()[1:].find("|") + 1 if row else -1
            for match in _SPAN.finditer(line):
                span = match.group(1).strip()
                if not (row or (span[:1] == span[-1:] == '"')):
                    continue
                if row and match.start() - (len(line) - len(line.lstrip())) < first_cell:
                    continue
                text = span.strip('"')
                text = re.sub(r"^[A-Z]\w*(Error|Exception|Exists|Found|Argument)?: ", "", text)
                if _is_message(text):
                    found.append((f"{path.relative_to(ROOT)}:{number}", text))
    return found


def phrases(message: str) -> list[str]:
    """The runs of two or more prose words between placeholders and concrete values."""
    out = []
    for fragment in _PLACEHOLDER.split(message):
        run: list[str] = []
        for word in [*fragment.split(), None]:
            bare = None if word is None else word.strip(",;:()")
            if bare and re.search("[a-z]", bare) and not re.search(r"[./@_A-Z0-9]", bare):
                run.append(word)
                continue
            if len(run) >= 2:
                out.append(" ".join(run).strip(" ,;:("))
            run = []
    return [p for p in out if len(p.split()) >= 2]


def _words(text: str) -> str:
    """``text`` as its words only, one space apart (punctuation dropped)."""
    return " ".join(re.findall(r"[A-Za-z0-9_'-]+", text))


PIECES = [_words(piece) for piece in _pieces()]
#: Words a code placeholder may be filled with, in the middle of a phrase: whole constants of
#: lrofw (e.g. ``"written"`` in "cannot be {doing}") and builtin names (a type, ``None``).
VALUES = {p for p in PIECES if " " not in p} | set(dir(builtins))
EXTERNAL_WORDS = [_words(e) for e in EXTERNAL]


def _found(text: str) -> bool:
    pattern = re.compile(rf"(?<![\w'-]){re.escape(text)}(?![\w'-])")
    return any(pattern.search(piece) for piece in (*PIECES, *EXTERNAL_WORDS))


def covered(phrase: str) -> bool:
    """True when ``phrase`` (its words) is lrofw's string pieces end to end (greedy, longest
    first); a piece of one word only at either end (next to a code placeholder) or when it is a
    value a placeholder may hold (``VALUES``)."""
    words = _words(phrase).split()
    i = 0
    while i < len(words):
        j = next((j for j in range(len(words), i, -1) if _found(" ".join(words[i:j]))), i)
        if j == i:
            return False
        if j == i + 1 and i > 0 and j < len(words) and words[i] not in VALUES:
            return False
        i = j
    return True


@pytest.mark.parametrize(("where", "message"), quoted(), ids=lambda x: x[:60])
def test_a_quoted_message_is_in_the_code(where: str, message: str) -> None:
    """Each phrase of a message the docs quote is made of strings lrofw has (or relays)."""
    missing = [p for p in phrases(message) if not covered(p)]
    assert not missing, f"{where}: `{message}`: lrofw/ has no strings that make {missing}"


def test_phrases_split_at_placeholders_and_values() -> None:
    """Placeholders and concrete values split a message; prose phrases remain."""
    assert phrases("the server is busy: N operations are running or queued; retry later") == [
        "the server is busy",
        "operations are running or queued; retry later",
    ]
    assert phrases("ProvisionDut is a @long_running method, but its servicer was") == [
        "is a",
        "method, but its servicer was",
    ]
    assert covered("the server is busy:") and not covered("the server is asleep:")
    assert not covered("the server is on holiday; come back next week")
    assert len(quoted()) > 40
