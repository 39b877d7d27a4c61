"""Filters and page tokens for ListOperations (AIP-158, AIP-160 subset).

Filter fields:

* ``done`` (bool): ``true`` or ``false``, case-insensitive.
* ``error.code`` (int): a number (``5``, ``-1``) or a ``google.rpc.Code`` name
  (``NOT_FOUND``, ``cancelled``; case-insensitive). An operation without an error, finished
  or not, has code ``0``. Values must fit in an int32.
* ``method`` (str): the full name of the RPC that started the operation, such as
  ``/chromiumos.config.api.test.tls.Common/ProvisionDut``. A leading ``/`` is optional: both
  sides are compared with one.
* ``name`` (str): the operation name, compared exactly (``*`` is not a wildcard).

Operators: ``=`` and ``!=`` on every field; ``<``, ``<=``, ``>``, ``>=`` on ``error.code`` only.
The AIP-160 "has" operator ``:`` is not supported.

Logic: ``AND``, ``OR`` and ``NOT`` (upper case), ``-`` as a prefix ``NOT``, parentheses, and
``AND`` by juxtaposition (``done = true error.code = 1``). As in AIP-160, ``OR`` binds tighter
than ``AND``: ``a AND b OR c`` means ``a AND (b OR c)``. ``NOT`` binds tightest.

Values: bare words (ASCII letters, digits, ``_``, ``.``, ``/``, and ``-`` between them),
integers (``-`` directly before the digits makes them negative), or strings in double or single
quotes with the escapes ``\\\\``, ``\\"``, ``\\'``, ``\\n``, ``\\t``, ``\\r``. Quoting does not
change the type: ``done = "true"`` is the same as ``done = true``. Quote a value that is a
keyword or has other characters: ``name = "AND"``.

Evaluation: :func:`compile_filter` turns a tree into one function of an operation's fields, for
stores that filter in Python; an ``OR`` of ``=`` comparisons on one field is one set lookup, so
the longest filter costs about what a short one does per operation.

Limits: at most 2,000 characters and 32 levels of parentheses and negations. Any malformed
filter raises :class:`FilterError` with the character offset of the problem.

Page tokens are opaque: a versioned binary payload (cursor plus HMAC-SHA256 over the cursor and
the listing's binding), base64url-encoded without padding. A token only works with the key that
signed it and the same binding (collection, canonical filter and, with ``identify``, principal).

Example:
    >>> node = parse_filter("done = true AND error.code != OK")
    >>> str(node)
    'done = true AND error.code != 0'
    >>> node.matches({"done": True, "error.code": 5, "method": "/a.B/C", "name": "operations/1"})
    True
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

from .tokens import PageTokenError, PageTokens

__all__ = [
    "DEFAULT_PAGE_SIZE", "FIELDS", "MAX_FILTER_DEPTH", "MAX_FILTER_LENGTH", "MAX_PAGE_SIZE", "And",
    "Comparison", "Fields", "FilterError", "MatchAll", "Node", "Not", "Or", "PageTokenError",
    "PageTokens", "Predicate", "compile_filter", "effective_page_size", "parse_filter", "parsed",
]  # fmt: skip

DEFAULT_PAGE_SIZE: int = 50
MAX_PAGE_SIZE: int = 1000
FIELDS: tuple[str, ...] = ("done", "error.code", "method", "name")
MAX_FILTER_LENGTH: int = 2000
MAX_FILTER_DEPTH: int = 32

# google.rpc.Code, copied so that this module needs no generated code.
_CODES: dict[str, int] = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}  # fmt: skip
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq, "!=": operator.ne, "<": operator.lt,
    "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}  # fmt: skip
_EQUALITY = ("=", "!=")
_INT32 = range(-(2**31), 2**31)
_SYNTAX_HINT = "write comparisons like 'done = true AND error.code != 0'"


class FilterError(ValueError):
    """A filter that cannot be parsed; the message says what, where and what is supported.

    Attributes:
        offset: Character offset of the problem in the filter text, if there is one.

    Example:
        >>> try:
        ...     parse_filter("state = 1")
        ... except FilterError as exc:
        ...     print(exc.offset)
        0
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


def effective_page_size(requested: int) -> int:
    """Returns the page size to use: ``DEFAULT_PAGE_SIZE`` for 0, at most ``MAX_PAGE_SIZE``.

    Args:
        requested: The request's ``page_size`` (AIP-158: 0 means the documented default).

    Raises:
        ValueError: If ``requested`` is negative.

    Example:
        >>> effective_page_size(0), effective_page_size(10), effective_page_size(10**6)
        (50, 10, 1000)
    """
    if requested < 0:
        raise ValueError(f"page_size must not be negative, got {requested}")
    return DEFAULT_PAGE_SIZE if requested == 0 else min(requested, MAX_PAGE_SIZE)


def _slash(method: str) -> str:
    return method if not method or method.startswith("/") else "/" + method


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") + '"'


@dataclass(frozen=True)
class Comparison:
    """``field op value``: one restriction on one field.

    ``value`` is a ``bool`` for ``done``, an ``int`` for ``error.code`` and a ``str`` otherwise;
    :func:`parse_filter` gives ``method`` values a leading ``/``.

    Example:
        >>> c = Comparison("error.code", ">=", 5)
        >>> str(c), c.matches({"done": True, "error.code": 5, "method": "", "name": "x"})
        ('error.code >= 5', True)
    """

    field: str
    op: str
    value: bool | int | str

    def __post_init__(self) -> None:
        # Guards SQL compilers that splice field and op into their query text.
        if self.field not in FIELDS or self.op not in _OPS:
            raise ValueError(f"unsupported comparison {self.field!r} {self.op!r}")

    def matches(self, fields: Mapping[str, object]) -> bool:
        """Tells whether an operation with these field values satisfies the comparison."""
        actual, value = fields[self.field], self.value
        if self.field == "method" and isinstance(actual, str) and isinstance(value, str):
            actual, value = _slash(actual), _slash(value)
        return _OPS[self.op](actual, value)

    def __str__(self) -> str:
        if isinstance(self.value, bool):
            text = "true" if self.value else "false"
        elif isinstance(self.value, int):
            text = str(self.value)
        else:
            text = _quote(self.value)
        return f"{self.field} {self.op} {text}"


@dataclass(frozen=True)
class _Terms:
    terms: tuple[Node, ...]
    _KEYWORD: ClassVar[str]
    _REDUCE: ClassVar[Callable[[Iterable[bool]], bool]]

    def matches(self, fields: Mapping[str, object]) -> bool:
        """Tells whether all (``And``) or any (``Or``) of the terms match."""
        return type(self)._REDUCE(term.matches(fields) for term in self.terms)

    def __str__(self) -> str:
        # Only the parentheses AIP-160 precedence needs, so that printing never nests deeper
        # than the text that was parsed (MAX_FILTER_DEPTH).
        nest = isinstance(self, Or)
        parts = (f"({t})" if nest and isinstance(t, And) else str(t) for t in self.terms)
        return f" {self._KEYWORD} ".join(parts)


@dataclass(frozen=True)
class And(_Terms):
    """All ``terms`` hold (an empty ``And`` matches everything).

    Example:
        >>> str(And((Comparison("done", "=", True), Comparison("name", "=", "a"))))
        'done = true AND name = "a"'
    """

    _KEYWORD = "AND"
    _REDUCE = all


@dataclass(frozen=True)
class Or(_Terms):
    """At least one of ``terms`` holds (an empty ``Or`` matches nothing).

    Example:
        >>> str(Or((Comparison("error.code", "=", 1), Comparison("error.code", "=", 4))))
        'error.code = 1 OR error.code = 4'
    """

    _KEYWORD = "OR"
    _REDUCE = any


@dataclass(frozen=True)
class Not:
    """``term`` does not hold.

    Example:
        >>> str(Not(Comparison("done", "=", True)))
        'NOT done = true'
    """

    term: Node

    def matches(self, fields: Mapping[str, object]) -> bool:
        """Tells whether the term does not match."""
        return not self.term.matches(fields)

    def __str__(self) -> str:
        return f"NOT {self.term}" if isinstance(self.term, Comparison) else f"NOT ({self.term})"


@dataclass(frozen=True)
class MatchAll:
    """The empty filter: every operation matches.

    Example:
        >>> parse_filter("  ") == MatchAll(), str(MatchAll())
        (True, '')
    """

    def matches(self, fields: Mapping[str, object]) -> bool:
        """Always true."""
        return True

    def __str__(self) -> str:
        return ""


Node: TypeAlias = Comparison | And | Or | Not | MatchAll

_TOKEN_RE = re.compile(
    r"""(?P<space>[ \t\n\r\f\v]+)
    |(?P<op>!=|<=|>=|=|<|>|:)
    |(?P<word>[A-Za-z0-9_./]+(?:-[A-Za-z0-9_./]+)*)
    |(?P<punct>[()-])
    |(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""",
    re.VERBOSE | re.DOTALL,
)
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r"}


def _error(what: str, pos: int, hint: str = _SYNTAX_HINT) -> FilterError:
    return FilterError(
        f"invalid filter: {what} at offset {pos}" + (f"; {hint}" if hint else ""), pos
    )


@dataclass(frozen=True)
class _Token:
    kind: str  # "op", "word", "string", "(", ")", "-", "AND", "OR", "NOT" or "end"
    text: str
    pos: int


def _unquote(lexeme: str, pos: int) -> str:
    def escape(match: re.Match[str]) -> str:
        if match.group(1) not in _ESCAPES:
            hint = "supported escapes: " + " ".join("\\" + key for key in _ESCAPES)
            raise _error(f"unknown escape {match.group()!r}", pos + 1 + match.start(), hint)
        return _ESCAPES[match.group(1)]

    return re.sub(r"\\(.)", escape, lexeme[1:-1], flags=re.DOTALL)


def _tokenize(text: str) -> list[_Token]:
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            if text[pos] in "\"'":
                raise _error("unterminated string", pos, "end it with the same quote")
            raise _error(f"unexpected character {text[pos]!r}", pos, "quote values that have it")
        kind, lexeme = match.lastgroup or "", match.group()
        if kind == "string":
            lexeme = _unquote(lexeme, pos)
        elif kind == "punct" or lexeme in ("AND", "OR", "NOT"):
            kind = lexeme
        if kind != "space":
            tokens.append(_Token(kind, lexeme, pos))
        pos = match.end()
    return [*tokens, _Token("end", "", len(text))]


def _clip(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _describe(token: _Token) -> str:
    if token.kind == "end":
        return "the end of the filter"
    return f"string {_clip(token.text)}" if token.kind == "string" else _clip(token.text)


class _Parser:
    """Recursive descent over AIP-160: juxtaposition and AND join factors, OR joins terms."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens, self.index, self.depth = tokens, 0, 0

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def take(self) -> _Token:
        self.index += 1
        return self.tokens[self.index - 1]

    def expression(self) -> Node:
        # AIP-160 ranks AND below juxtaposition, but both mean conjunction, so one loop does.
        terms = [self.factor()]
        while self.peek().kind not in (")", "end"):
            if self.peek().kind == "AND":
                self.take()
            terms.append(self.factor())
        return _join(And, terms)

    def factor(self) -> Node:
        terms = [self.term()]
        while self.peek().kind == "OR":
            self.take()
            terms.append(self.term())
        return _join(Or, terms)

    def term(self) -> Node:
        token = self.peek()
        if token.kind not in ("NOT", "-", "("):
            return self.comparison()
        self.depth += 1
        if self.depth > MAX_FILTER_DEPTH:
            raise _error(f"nesting deeper than {MAX_FILTER_DEPTH} levels", token.pos, "")
        self.take()
        if token.kind == "(":
            if self.peek().kind == ")":
                raise _error("empty parentheses", self.peek().pos)
            node = self.expression()
            if self.take().kind != ")":
                raise _error(f"no ')' for the '(' at offset {token.pos}", self.tokens[-1].pos)
        else:
            inner = self.term()
            node = inner.term if isinstance(inner, Not) else Not(inner)
        self.depth -= 1
        return node

    def comparison(self) -> Comparison:
        token = self.take()
        if token.kind != "word":
            raise _error(f"expected a field name, found {_describe(token)}", token.pos)
        field, op = token.text, self.peek()
        if field not in FIELDS:
            hint = "fields: " + ", ".join(FIELDS)
            if field.lower() in ("and", "or", "not"):
                hint = "write AND, OR, NOT in upper case"
            raise _error(f"unknown field {_clip(field)}", token.pos, hint)
        if self.take().kind != "op":
            raise _error(f"expected an operator after {field!r}, found {_describe(op)}", op.pos)
        allowed = tuple(_OPS) if field == "error.code" else _EQUALITY
        if op.text not in allowed:
            hint = "supported here: " + " ".join(allowed)
            if op.text == ":":
                hint = "the ':' (has) operator is not supported, use '='"
            raise _error(f"operator {op.text!r} is not supported on {field!r}", op.pos, hint)
        return Comparison(field, op.text, self.value(field, op))

    def value(self, field: str, op: _Token) -> bool | int | str:
        token = self.take()
        if token.kind == "-":
            digits = self.take()
            if digits.kind != "word" or digits.pos != token.pos + 1 or not digits.text.isdigit():
                raise _error("'-' before a value must start a negative integer", token.pos, "")
            token = _Token("word", "-" + digits.text, token.pos)
        elif token.kind not in ("word", "string"):
            hint = "quote values that are keywords or contain other characters"
            raise _error(
                f"expected a value after {op.text!r}, found {_describe(token)}", token.pos, hint
            )
        text = token.text
        if field == "done":
            if text.lower() not in ("true", "false"):
                raise _error(f"'done' takes true or false, not {_clip(text)}", token.pos, "")
            return text.lower() == "true"
        if field == "error.code":
            if re.fullmatch(r"-?[0-9]+", text):
                if int(text) not in _INT32:
                    raise _error(f"error.code {_clip(text)} is out of int32 range", token.pos, "")
                return int(text)
            if text.upper() not in _CODES:
                what = f"'error.code' takes a number or a google.rpc.Code name, not {_clip(text)}"
                raise _error(what, token.pos, "names: " + ", ".join(_CODES))
            return _CODES[text.upper()]
        return _slash(text) if field == "method" else text


def _join(kind: type[And] | type[Or], terms: list[Node]) -> Node:
    if len(terms) == 1:
        return terms[0]
    flat: list[Node] = []
    for term in terms:
        flat.extend(term.terms if isinstance(term, kind) else (term,))
    return kind(tuple(flat))


@functools.lru_cache(maxsize=256)
def parsed(text: str) -> tuple[Node, str]:
    """:func:`parse_filter` of ``text`` and the tree's canonical form (its ``str``), remembered
    for the last 256 filters: a client paging through a list sends the same filter with every
    page, and parsing a long one costs milliseconds of Python (the trees are immutable, so one
    serves every call).

    Raises:
        FilterError: If the filter is malformed, too long or too deeply nested.

    Example:
        >>> parsed("done = true")
        (Comparison(field='done', op='=', value=True), 'done = true')
    """
    node = parse_filter(text)
    return node, str(node)


def parse_filter(text: str) -> Node:
    """Returns a ListOperations filter (see the module docstring) as an immutable tree.

    ``str()`` of the tree is a canonical form using AIP-160 precedence, so it prints
    ``a AND b OR c`` for ``a AND (b OR c)``.

    Args:
        text: The request's ``filter``; empty or blank text gives :class:`MatchAll`.

    Raises:
        FilterError: If the filter is malformed, too long or too deeply nested.

    Example:
        >>> str(parse_filter("(done=TRUE) method = a.B/C OR error.code > 3"))
        'done = true AND method = "/a.B/C" OR error.code > 3'
    """
    if len(text) > MAX_FILTER_LENGTH:
        raise FilterError(
            f"invalid filter: {len(text)} characters, at most {MAX_FILTER_LENGTH} allowed"
        )
    tokens = _tokenize(text)
    if tokens[0].kind == "end":
        return MatchAll()
    parser = _Parser(tokens)
    node = parser.expression()
    if parser.peek().kind != "end":  # only a stray ')' stops an expression early
        raise _error("unbalanced ')'", parser.peek().pos)
    return node


#: An operation's filter fields in :data:`FIELDS` order: (done, error.code, method, name).
Fields: TypeAlias = tuple[bool, int, str, str]
#: A compiled filter: tells whether an operation with these fields matches.
Predicate: TypeAlias = Callable[[Fields], bool]
_INDEX = {field: i for i, field in enumerate(FIELDS)}


def _compare(c: Comparison) -> Predicate:
    i, op, value = _INDEX[c.field], _OPS[c.op], c.value
    if c.field == "method" and isinstance(value, str):  # as Comparison.matches: both slashed
        wanted = _slash(value)
        return lambda f: op(_slash(f[2]), wanted)
    return lambda f: op(f[i], value)


def _any(terms: tuple[Node, ...]) -> Predicate:
    # The ``=`` comparisons on one field become one set lookup (hash and == agree on the values
    # a Comparison holds: bool, int, str); the other terms are tried in turn.
    sets: dict[str, set[bool | int | str]] = {}
    rest: list[Predicate] = []
    for term in terms:
        if isinstance(term, Comparison) and term.op == "=":
            value = term.value
            if term.field == "method" and isinstance(value, str):
                value = _slash(value)
            sets.setdefault(term.field, set()).add(value)
        else:
            rest.append(compile_filter(term))
    for field, values in sets.items():
        if len(values) == 1:
            rest.insert(0, _compare(Comparison(field, "=", next(iter(values)))))
        elif field == "method":
            rest.insert(0, lambda f, v=frozenset(values): _slash(f[2]) in v)  # type: ignore[misc]
        else:
            i = _INDEX[field]
            rest.insert(0, lambda f, i=i, v=frozenset(values): f[i] in v)  # type: ignore[misc]
    if len(rest) == 1:
        return rest[0]
    parts = tuple(rest)
    return lambda f: any(p(f) for p in parts)


def compile_filter(node: Node) -> Predicate:
    """Returns a function that tells, as ``node.matches`` does, whether an operation matches.

    It takes the fields as a tuple (no dict per operation) and turns an ``OR`` of ``=``
    comparisons on one field into a set lookup: a store that filters in Python calls it once per
    operation it examines, so this is what a listing's scan costs.

    Args:
        node: A filter from :func:`parse_filter` (or built from the node classes).

    Example:
        >>> match = compile_filter(parse_filter("name = a OR name = b OR name = c"))
        >>> match((True, 0, "/a.B/C", "b")), match((True, 0, "/a.B/C", "d"))
        (True, False)
    """
    if isinstance(node, MatchAll):
        return lambda f: True
    if isinstance(node, Comparison):
        return _compare(node)
    if isinstance(node, Not):
        inner = compile_filter(node.term)
        return lambda f: not inner(f)
    if isinstance(node, Or):
        return _any(node.terms)
    parts = tuple(compile_filter(term) for term in node.terms)
    if not parts:
        return lambda f: True
    return lambda f: all(p(f) for p in parts)
