"""Tests for lrofw.listing: filters and page tokens."""

from __future__ import annotations

import base64

import pytest
from google.rpc import code_pb2
from hypothesis import example, given
from hypothesis import strategies as st

from lrofw import listing
from lrofw.listing import (
    DEFAULT_PAGE_SIZE,
    FIELDS,
    MAX_PAGE_SIZE,
    And,
    Comparison,
    FilterError,
    MatchAll,
    Not,
    Or,
    PageTokenError,
    PageTokens,
    compile_filter,
    effective_page_size,
    parse_filter,
)

METHOD = "/chromiumos.config.api.test.tls.Common/ProvisionDut"


def op_fields(
    done: bool = False, code: int = 0, method: str = METHOD, name: str = "operations/1"
) -> dict[str, object]:
    """Builds the mapping that matches() receives."""
    return {"done": done, "error.code": code, "method": method, "name": name}


def test_constants() -> None:
    """The documented constants have their documented values."""
    assert (DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE) == (50, 1000)
    assert FIELDS == ("done", "error.code", "method", "name")


@pytest.mark.parametrize(
    ("requested", "expected"),
    [(0, 50), (1, 1), (50, 50), (1000, 1000), (1001, 1000), (2**40, 1000)],
)
def test_effective_page_size(requested: int, expected: int) -> None:
    """0 means the default and large sizes are capped."""
    assert effective_page_size(requested) == expected


def test_effective_page_size_negative() -> None:
    """A negative page size is an error that names the value."""
    with pytest.raises(ValueError, match=r"^page_size must not be negative, got -3$"):
        effective_page_size(-3)


def test_code_names_match_google_rpc() -> None:
    """The copied google.rpc.Code table matches the generated one."""
    assert dict(code_pb2.Code.items()) == listing._CODES


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_filter_matches_all(text: str) -> None:
    """An empty or blank filter is MatchAll, which matches everything."""
    node = parse_filter(text)
    assert node == MatchAll()
    assert node.matches(op_fields()) and str(node) == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("done = true", Comparison("done", "=", True)),
        ("done=FALSE", Comparison("done", "=", False)),
        ('done != "True"', Comparison("done", "!=", True)),
        ("error.code = 5", Comparison("error.code", "=", 5)),
        ("error.code >= -1", Comparison("error.code", ">=", -1)),
        ("error.code = not_found", Comparison("error.code", "=", 5)),
        ("error.code != 'Cancelled'", Comparison("error.code", "!=", 1)),
        ("error.code < OK", Comparison("error.code", "<", 0)),
        (f"method = {METHOD}", Comparison("method", "=", METHOD)),
        (f"method = {METHOD[1:]}", Comparison("method", "=", METHOD)),
        ('method = ""', Comparison("method", "=", "")),
        ("name = operations/a-b_c.d", Comparison("name", "=", "operations/a-b_c.d")),
        ("name = 5", Comparison("name", "=", "5")),
        ("name = -5", Comparison("name", "=", "-5")),
        ("name = true", Comparison("name", "=", "true")),
        (r'name = "a \"b\" \\ \n\t\r \'"', Comparison("name", "=", 'a "b" \\ \n\t\r \'')),
        (r"name = 'it\'s'", Comparison("name", "=", "it's")),
        ('name = "AND"', Comparison("name", "=", "AND")),
        ('name = "x*"', Comparison("name", "=", "x*")),
    ],
)
def test_parse_comparison(text: str, expected: Comparison) -> None:
    """Values are converted to the field's type and normalized."""
    assert parse_filter(text) == expected


A, B, C = (Comparison("error.code", "=", n) for n in (1, 2, 3))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("error.code=1 AND error.code=2", And((A, B))),
        ("error.code=1 error.code=2", And((A, B))),
        ("error.code=1 OR error.code=2", Or((A, B))),
        ("error.code=1 AND error.code=2 OR error.code=3", And((A, Or((B, C))))),
        ("error.code=1 error.code=2 OR error.code=3", And((A, Or((B, C))))),
        ("error.code=1 OR error.code=2 AND error.code=3", And((Or((A, B)), C))),
        ("(error.code=1 AND error.code=2) OR error.code=3", Or((And((A, B)), C))),
        ("((error.code=1)) AND (error.code=2 AND error.code=3)", And((A, B, C))),
        ("error.code=1 OR (error.code=2 OR error.code=3)", Or((A, B, C))),
        ("NOT error.code=1", Not(A)),
        ("-error.code=1", Not(A)),
        ("- error.code=1", Not(A)),
        ("NOT NOT error.code=1", A),
        ("-(-error.code=1)", A),
        ("NOT error.code=1 OR error.code=2", Or((Not(A), B))),
        ("NOT(error.code=1 OR error.code=2)", Not(Or((A, B)))),
        ("error.code=1 -error.code=2", And((A, Not(B)))),
    ],
)
def test_parse_logic(text: str, expected: object) -> None:
    """Logic follows AIP-160 precedence: NOT, then OR, then AND."""
    assert parse_filter(text) == expected


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("  done=true  ", "done = true"),
        ("error.code=not_found", "error.code = 5"),
        ("method=a.B/C", 'method = "/a.B/C"'),
        ("(done = true) ((error.code > 0))", "done = true AND error.code > 0"),
        (
            "done = true error.code = 1 OR error.code = 2",
            "done = true AND error.code = 1 OR error.code = 2",
        ),
        ("(done = true AND name = x) OR name = y", '(done = true AND name = "x") OR name = "y"'),
        ("-(done = true OR name = x)", 'NOT (done = true OR name = "x")'),
        ("NOT -done = true", "done = true"),
        ("name = 'a\"b\\\\'", r'name = "a\"b\\"'),
    ],
)
def test_canonical_text(text: str, canonical: str) -> None:
    """str() gives one canonical spelling that parses back to the same tree."""
    node = parse_filter(text)
    assert str(node) == canonical
    assert parse_filter(canonical) == node


@pytest.mark.parametrize(
    ("text", "fields", "expected"),
    [
        ("done = true", op_fields(done=True), True),
        ("done = true", op_fields(), False),
        ("done != true", op_fields(), True),
        ("error.code = 0", op_fields(), True),
        ("error.code = CANCELLED", op_fields(done=True, code=1), True),
        ("error.code > 1", op_fields(done=True, code=1), False),
        ("error.code >= 1", op_fields(done=True, code=1), True),
        ("error.code < 1", op_fields(done=True, code=1), False),
        ("error.code <= 1", op_fields(done=True, code=1), True),
        (f"method = {METHOD}", op_fields(), True),
        (f"method = {METHOD[1:]}", op_fields(), True),
        (f"method = {METHOD}", op_fields(method=METHOD[1:]), True),
        (f"method != {METHOD}", op_fields(), False),
        ('method = ""', op_fields(method=""), True),
        ("method = /x.Y/Z", op_fields(), False),
        ("name = operations/1", op_fields(), True),
        ("name = operations/10", op_fields(), False),
        ("done = false AND name = operations/1", op_fields(), True),
        ("done = true OR name = operations/1", op_fields(), True),
        ("done = true OR name = other", op_fields(), False),
        ("NOT done = true", op_fields(), True),
        ("done = false -error.code = 0", op_fields(), False),
    ],
)
def test_matches(text: str, fields: dict[str, object], expected: bool) -> None:
    """matches() and compile_filter() apply the documented semantics to an operation's fields."""
    assert parse_filter(text).matches(fields) is expected
    assert compile_filter(parse_filter(text))(as_tuple(fields)) is expected


def as_tuple(fields: dict[str, object]) -> listing.Fields:
    """The fields as compile_filter's predicates take them."""
    return tuple(fields[f] for f in FIELDS)  # type: ignore[return-value]


def test_compiled_or_of_many_names_is_one_lookup() -> None:
    """A 199-term OR of names matches exactly its names, also mixed with other terms."""
    names = [f"operations/{i}" for i in range(199)]
    terms = tuple(Comparison("name", "=", n) for n in names)
    match = compile_filter(Or((*terms, Comparison("error.code", "=", 5))))
    assert all(match(as_tuple(op_fields(name=n))) for n in names)
    assert not match(as_tuple(op_fields(name="operations/199")))
    assert match(as_tuple(op_fields(name="x", done=True, code=5)))
    methods = compile_filter(parse_filter("method = a.B/C OR method = /d.E/F"))
    assert methods(as_tuple(op_fields(method="d.E/F")))
    assert not methods(as_tuple(op_fields(method="/a.B/D")))


def test_compiled_empty_junctions() -> None:
    """An empty And matches everything, an empty Or nothing, as matches() says."""
    assert compile_filter(And(()))(as_tuple(op_fields())) is True
    assert compile_filter(Or(()))(as_tuple(op_fields())) is False


@pytest.mark.parametrize(
    ("text", "message", "offset"),
    [
        ("state = 1", r"unknown field 'state' at offset 0; fields: done, error.code", 0),
        ("done = true and error.code = 1", r"unknown field 'and' .*upper case", 12),
        ("done = 3", r"'done' takes true or false", 7),
        ("done < true", r"operator '<' is not supported on 'done'.*supported here: = !=", 5),
        ("name > a", r"operator '>' is not supported on 'name'", 5),
        ("name : a", r"':' \(has\) operator is not supported, use '='", 5),
        ("error.code = abc", r"google.rpc.Code name, not 'abc'.*NOT_FOUND", 13),
        ('error.code = ""', r"google.rpc.Code name", 13),
        ("error.code = 2147483648", r"out of int32 range", 13),
        ("error.code = - 5", r"negative integer", 13),
        ("error.code = -x", r"negative integer", 13),
        ("done", r"expected an operator after 'done', found the end of the filter", 4),
        ("done =", r"expected a value after '=', found the end", 6),
        ("done = AND", r"expected a value after '=', found 'AND'.*quote", 7),
        ("done == true", r"expected a value after '=', found '='", 6),
        ("done ! true", r"unexpected character '!'", 5),
        ("name = a*", r"unexpected character '\*'", 8),
        ("name = caf\u00e9", r"unexpected character", 10),
        ("done = true AND", r"expected a field name, found the end", 15),
        ("done = true OR", r"expected a field name", 14),
        ("AND done = true", r"expected a field name, found 'AND'", 0),
        ("OR", r"expected a field name, found 'OR'", 0),
        ("NOT", r"expected a field name, found the end", 3),
        ("-", r"expected a field name", 1),
        ("true", r"unknown field 'true'", 0),
        ('"done" = true', r"expected a field name, found string 'done'", 0),
        ("a-" * 999 + "a", r"unknown field 'a-a-a-a-a-a-a-a-a-a-a-a-a-a-a-a-a-a-a\.\.\.' at", 0),
        ("()", r"empty parentheses", 1),
        ("(done = true", r"no '\)' for the '\(' at offset 0", 12),
        ("done = true)", r"unbalanced '\)'", 11),
        ("name = 'abc", r"unterminated string", 7),
        ('name = "a\\"', r"unterminated string", 7),
        (r'name = "a\qb"', r"unknown escape '\\\\q'.*supported escapes", 9),
        ("(" * 33 + "done = true" + ")" * 33, r"nesting deeper than 32 levels", 32),
        ("NOT " * 33 + "done = true", r"nesting deeper than 32 levels", 128),
        ("-" * 1999, r"nesting deeper than 32 levels", 32),
    ],
)
def test_filter_errors(text: str, message: str, offset: int) -> None:
    """Malformed filters raise FilterError saying what, where and what is supported."""
    with pytest.raises(FilterError, match=message) as info:
        parse_filter(text)
    assert info.value.offset == offset
    assert f"at offset {offset}" in str(info.value)


def test_filter_depth_limit_is_inclusive() -> None:
    """Exactly 32 levels of nesting are allowed."""
    assert parse_filter("(" * 32 + "done = true" + ")" * 32) == Comparison("done", "=", True)


def test_filter_too_long() -> None:
    """Filters over 2,000 characters are rejected before parsing."""
    text = "name = " + "x" * 1993
    assert len(text) == 2000 and parse_filter(text) == Comparison("name", "=", "x" * 1993)
    with pytest.raises(FilterError, match="2001 characters, at most 2000"):
        parse_filter(text + "x")


def test_filter_deep_nesting_raises_no_recursion_error() -> None:
    """Deep nesting of every kind fails with FilterError, never RecursionError."""
    for text in ("(" * 1000, "NOT " * 499, "-(" * 999, "(" * 999 + ")" * 999):
        with pytest.raises(FilterError):
            parse_filter(text)


def test_comparison_rejects_unknown_field_or_operator() -> None:
    """Nodes built by hand cannot carry a field or operator a SQL compiler must not splice."""
    with pytest.raises(ValueError, match="unsupported comparison"):
        Comparison("done; DROP TABLE", "=", True)
    with pytest.raises(ValueError, match="unsupported comparison"):
        Comparison("done", "LIKE", True)


def test_nodes_are_frozen_and_hashable() -> None:
    """Parsed trees are immutable values."""
    node = parse_filter("done = true OR NOT name = x")
    assert hash(node) == hash(parse_filter("(done = true) OR -name = x"))
    with pytest.raises(AttributeError):
        node.terms = ()  # type: ignore[misc,union-attr]


def test_empty_junctions() -> None:
    """An empty And matches everything and an empty Or nothing."""
    assert And(()).matches(op_fields()) and not Or(()).matches(op_fields())


FILTER_WORDS = [
    "done", "error.code", "method", "name", "=", "!=", "<", "<=", ">", ">=", ":", "AND", "OR",
    "NOT", "-", "(", ")", "true", "FALSE", "0", "5", "-3", "not_found", "OK", "/a.B/C", "x-y",
    "'q'", '"a\\"b"', '""', "and",
]  # fmt: skip


@st.composite
def filter_texts(draw: st.DrawFn, depth: int = 0) -> str:
    """Draws a mostly valid filter with random spacing, parentheses and negation."""
    if depth < 3 and draw(st.booleans()):
        parts = draw(st.lists(filter_texts(depth + 1), min_size=1, max_size=3))
        separators = draw(st.lists(st.sampled_from([" ", " AND ", " OR "]), min_size=len(parts)))
        text = parts[0] + "".join(s + p for s, p in zip(separators, parts[1:], strict=False))
    else:
        field = draw(st.sampled_from(FIELDS))
        ops = ["=", "!=", "<", "<=", ">", ">="] if field == "error.code" else ["=", "!="]
        values = {
            "done": ["true", "False", "'TRUE'"],
            "error.code": ["0", "-1", "16", "not_found", "Ok", '"5"'],
            "method": ["a.B/C", "/a.B/C", '"x y"', "''"],
            "name": ["operations/1", "'it\\'s'", '"\\n\\t\\\\"', "AND2", "-7"],
        }[field]
        space = draw(st.sampled_from(["", " ", "  "]))
        text = f"{field}{space}{draw(st.sampled_from(ops))}{space}{draw(st.sampled_from(values))}"
    wrap = draw(st.sampled_from(["{}", "({})", "NOT {}", "-{}", "NOT ({})", "-({})", "( {} )"]))
    return wrap.format(text)


def assert_parse_total(text: str) -> None:
    """parse_filter either raises FilterError or returns a tree whose str() reparses equal."""
    try:
        node = parse_filter(text)
    except FilterError:
        return
    assert parse_filter(str(node)) == node
    node.matches(op_fields())


@given(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=300))
@example("(" * 40)
@example("name = '\\")
def test_parse_filter_is_total_on_random_text(text: str) -> None:
    """Random text parses to a tree that round-trips, or raises only FilterError."""
    assert_parse_total(text)


@given(st.lists(st.sampled_from(FILTER_WORDS), max_size=25), st.sampled_from([" ", ""]))
def test_parse_filter_is_total_on_token_soup(words: list[str], separator: str) -> None:
    """Random sequences of filter tokens round-trip or raise only FilterError."""
    assert_parse_total(separator.join(words))


@given(
    filter_texts(),
    st.booleans(),
    st.sampled_from([-1, 0, 1, 5, 16]),
    st.sampled_from(["a.B/C", "/a.B/C", "x y", ""]),
    st.sampled_from(["operations/1", "it's", "\n\t\\", "AND2", "-7", "x"]),
)
def test_compiled_filter_agrees_with_matches(
    text: str, done: bool, code: int, method: str, name: str
) -> None:
    """compile_filter(node) gives what node.matches gives, on every generated filter."""
    fields = op_fields(done=done, code=code, method=method, name=name)
    node = parse_filter(text)
    assert compile_filter(node)(as_tuple(fields)) is node.matches(fields)


@given(filter_texts())
def test_parse_filter_round_trips_valid_filters(text: str) -> None:
    """Generated filters parse, and their canonical text is a fixed point."""
    node = parse_filter(text)
    canonical = str(node)
    assert parse_filter(canonical) == node
    assert str(parse_filter(canonical)) == canonical


def test_page_token_round_trip_and_shape() -> None:
    """A token is URL-safe, unpadded, opaque text that decodes to its cursor."""
    tokens = PageTokens(b"k" * 32)
    token = tokens.encode(123, "operations|done = true|50")
    assert tokens.decode(token, "operations|done = true|50") == 123
    assert len(token) == 44 and "=" not in token
    assert base64.urlsafe_b64decode(token)[0] == 1  # version byte
    assert tokens.encode(123, "operations|done = true|50") == token


@pytest.mark.parametrize("cursor", [0, 1, 2**63, 2**64 - 1])
def test_page_token_cursor_range(cursor: int) -> None:
    """Every cursor in [0, 2**64) round-trips."""
    tokens = PageTokens()
    assert tokens.decode(tokens.encode(cursor, "b"), "b") == cursor


@pytest.mark.parametrize("cursor", [-1, 2**64])
def test_page_token_cursor_out_of_range(cursor: int) -> None:
    """Cursors outside [0, 2**64) cannot be encoded."""
    with pytest.raises(ValueError, match="cursor must be in"):
        PageTokens().encode(cursor, "b")


def test_page_token_rejects_other_binding_and_key() -> None:
    """A token only decodes with the binding and key that made it."""
    tokens = PageTokens(b"a" * 16)
    token = tokens.encode(7, "ops|done = true|50")
    with pytest.raises(PageTokenError, match=r"^invalid page_token: not from this listing"):
        tokens.decode(token, "ops|done = false|50")
    with pytest.raises(PageTokenError, match=r"^invalid page_token: "):
        PageTokens(b"b" * 16).decode(token, "ops|done = true|50")
    with pytest.raises(PageTokenError):
        PageTokens().decode(token, "ops|done = true|50")
    assert PageTokens(b"a" * 16).decode(token, "ops|done = true|50") == 7


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "malformed"),
        ("bogus", "malformed"),
        ("A" * 43, "malformed"),
        ("A" * 45, "malformed"),
        ("A" * 43 + "=", "malformed"),
        ("A" * 43 + "+", "malformed"),
        ("A" * 44 + "\n", "malformed"),
        ("\u00e9" * 44, "malformed"),
        ("A" * 44, "unsupported version"),
        ("x" * 1001, "longer than 1000 characters"),
        ("x" * 10**6, "longer than 1000 characters"),
    ],
)
def test_page_token_malformed(token: str, message: str) -> None:
    """Anything that is not a well-formed token raises PageTokenError."""
    with pytest.raises(PageTokenError, match=f"^invalid page_token: {message}"):
        PageTokens().decode(token, "b")


def test_page_token_key_length() -> None:
    """Keys shorter than 16 bytes are refused."""
    with pytest.raises(ValueError, match="at least 16 bytes, got 3"):
        PageTokens(b"abc")


@given(
    cursor=st.integers(min_value=0, max_value=2**64 - 1),
    binding=st.text(),
    index=st.integers(min_value=0),
    replacement=st.characters(codec="utf-8", exclude_categories=["Cs"]),
)
def test_page_token_round_trip_and_tamper(
    cursor: int, binding: str, index: int, replacement: str
) -> None:
    """Tokens round-trip, and changing any one character is detected."""
    tokens = PageTokens(b"secret key 0123456789")
    token = tokens.encode(cursor, binding)
    assert tokens.decode(token, binding) == cursor
    index %= len(token)
    tampered = token[:index] + replacement + token[index + 1 :]
    if tampered != token:
        with pytest.raises(PageTokenError):
            tokens.decode(tampered, binding)
    with pytest.raises(PageTokenError):
        tokens.decode(token[:index] + token[index + 1 :], binding)
    with pytest.raises(PageTokenError):
        tokens.decode(token + "A", binding)


@given(cursor=st.integers(min_value=0, max_value=2**64 - 1), binding=st.text())
def test_page_token_every_byte_flip_is_rejected(cursor: int, binding: str) -> None:
    """Flipping any bit of any byte of the decoded payload is rejected."""
    tokens = PageTokens(b"secret key 0123456789")
    payload = bytearray(base64.urlsafe_b64decode(tokens.encode(cursor, binding)))
    for index in range(len(payload)):
        for bit in (1, 128):
            payload[index] ^= bit
            tampered = base64.urlsafe_b64encode(bytes(payload)).decode()
            payload[index] ^= bit
            with pytest.raises(PageTokenError):
                tokens.decode(tampered, binding)
