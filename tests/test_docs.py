"""The code blocks of README.md and docs/: every one runs or is checked (one test per block).

- ```python blocks of one page run in order in one namespace (``__name__`` is not ``"__main__"``;
  ``__doc_page__`` is the page's path), in a fresh temporary working directory that is also on
  sys.path (modules a page writes are importable), with examples/tls_provision importable; top-level
  ``await`` runs on one event loop per page; a block that opens with ``>>>`` runs as a doctest.
  ``<!-- doctest: fragment -->`` before a block: only compiled. ``<!-- doctest: setup`` ... ``-->``:
  hidden code run before the next Python block (or after the page's last one). A page's
  ``[end]`` test fails when its blocks leave threads running or tasks pending.
- sh/bash/console blocks: every ``python -m MODULE`` / ``python path/script.py`` names a module or
  file that exists, each ``--flag`` it passes appears in that program's ``--help``, and
  ``python -c CODE`` compiles; ``lrofw ...`` likewise for the ``lrofw`` command; ``tox -e ENV``
  names an environment of tox.ini. Nothing is installed or run.
- proto blocks that are whole files (``syntax = ...``) compile with ``python -m lrofw.protoc``;
  json, toml and yaml blocks parse.
"""

from __future__ import annotations

import ast
import asyncio
import configparser
import dataclasses
import doctest
import gc
import importlib.machinery
import inspect
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import mdblocks
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tls_provision"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
CHECKED = mdblocks.PYTHON | mdblocks.SHELL | {"proto", "json", "toml", "yaml", "yml", "ini"}
THREAD_GRACE = 5.0  # seconds a page's threads get to end after its last block


def _relative(path: pathlib.Path) -> pathlib.Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _checked(block: mdblocks.Block) -> bool:
    if block.lang == "proto":
        return _is_proto_file(block.source)
    return block.lang in CHECKED


def _is_proto_file(source: str) -> bool:
    return re.search(r"^\s*syntax\s*=", source, re.MULTILINE) is not None


def _cases() -> Iterator[Any]:
    for path in PAGES:
        page = mdblocks.parse(path, _relative(path))
        for index, block in enumerate(page.blocks):
            if _checked(block):
                yield pytest.param(path, index, id=f"{block.where}-{block.lang}")
        if any(block.lang in mdblocks.PYTHON for block in page.blocks) or page.trailing:
            yield pytest.param(path, None, id=f"{_relative(path)}[end]")


# --- Python: one namespace, one working directory and one event loop per page --------------------


@dataclasses.dataclass
class _PageRun:
    page: mdblocks.Page
    workdir: pathlib.Path
    namespace: dict[str, Any]
    threads_before: set[threading.Thread]
    done: int = 0  # blocks run so far
    failed: str = ""  # where an earlier block failed
    loop: asyncio.AbstractEventLoop | None = None

    def event_loop(self) -> asyncio.AbstractEventLoop:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
        return self.loop


_RUNS: dict[pathlib.Path, _PageRun] = {}


def _page_run(path: pathlib.Path) -> _PageRun:
    run = _RUNS.get(path)
    if run is None:
        page = mdblocks.parse(path, _relative(path))
        workdir = pathlib.Path(tempfile.mkdtemp(prefix="lrofw-docs-"))
        name = "docs_" + re.sub(r"\W", "_", str(_relative(path).with_suffix("")))
        namespace = {"__name__": name, "__doc_page__": str(path)}
        run = _PageRun(page, workdir, namespace, set(threading.enumerate()))
        _RUNS[path] = run
    return run


@pytest.fixture(scope="module", autouse=True)
def _discard_runs() -> Iterator[None]:
    """Whatever a partial selection (``-k``) left of a page's run is thrown away at the end."""
    yield
    for path in list(_RUNS):
        _discard(_RUNS.pop(path))


def _discard(run: _PageRun) -> None:
    run.namespace.clear()
    for name, module in list(sys.modules.items()):  # modules the page wrote and imported
        if str(getattr(module, "__file__", None) or "").startswith(str(run.workdir)):
            del sys.modules[name]
    if run.loop is not None:
        for task in asyncio.all_tasks(run.loop):
            task.cancel()
        run.loop.run_until_complete(asyncio.sleep(0))
        run.loop.close()
        run.loop = None
    shutil.rmtree(run.workdir, ignore_errors=True)


class _InPage:
    """Runs code in a page's namespace, working directory and sys.path."""

    def __init__(self, run: _PageRun) -> None:
        self.run = run

    def __enter__(self) -> _InPage:
        self.cwd = os.getcwd()
        self.path = list(sys.path)
        os.chdir(self.run.workdir)
        sys.path[:0] = [str(self.run.workdir), str(EXAMPLE)]
        return self

    def __exit__(self, *exc: object) -> None:
        os.chdir(self.cwd)
        sys.path[:] = self.path

    def exec(self, source: str, line: int, what: str) -> None:
        """Runs ``source`` (whose first line is the page's ``line``); failures name the place."""
        filename = str(ROOT / self.run.page.path)  # absolute paths stay as they are
        try:
            code = compile(
                "\n" * (line - 1) + source,
                filename,
                "exec",
                flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
                dont_inherit=True,
            )
            if code.co_flags & inspect.CO_COROUTINE:
                self.run.event_loop().run_until_complete(eval(code, self.run.namespace))
            else:
                exec(code, self.run.namespace)
        except Exception as exc:
            where = f"{self.run.page.path}:{line}"
            self.run.failed = where
            frames = traceback.extract_tb(exc.__traceback__)
            ours = [f for f in frames if f.filename == filename]
            at = f"{self.run.page.path}:{ours[-1].lineno}" if ours else where
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))
            message = f"{what} at {where} failed at {at}: {type(exc).__name__}: {exc}\n\n{text}"
        else:
            return
        pytest.fail(message, pytrace=False)

    def doctest(self, block: mdblocks.Block) -> None:
        parser = doctest.DocTestParser()
        test = parser.get_doctest(
            block.source, self.run.namespace, block.where, str(ROOT / block.path), block.line - 1
        )
        out: list[str] = []
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        result = runner.run(test, out=out.append, clear_globs=False)
        if result.failed:
            self.run.failed = block.where
            pytest.fail(f"the doctest at {block.where} failed:\n{''.join(out)}", pytrace=False)


def _run_python(run: _PageRun, upto: int) -> None:
    """Runs the page's Python blocks before index ``upto`` that have not run yet."""
    with _InPage(run) as page:
        while run.done < upto:
            block = run.page.blocks[run.done]
            run.done += 1
            if block.lang not in mdblocks.PYTHON:
                continue
            if run.failed:
                pytest.fail(f"an earlier block failed ({run.failed})", pytrace=False)
            for hidden in block.setup:
                page.exec(textwrap.dedent(hidden.source), hidden.line, "hidden setup code")
            if block.fragment:
                _compile_fragment(block)
            elif block.source.lstrip().startswith(">>>"):
                page.doctest(block)
            else:
                page.exec(block.source, block.line, "the block")


def _compile_fragment(block: mdblocks.Block) -> None:
    """A fragment compiles as a module, or as the body of a function (a handler's excerpt may
    ``return``)."""
    body = textwrap.indent(block.source, "    ")
    error = None
    for source in (block.source, f"def _():\n{body}", f"async def _():\n{body}"):
        try:
            compile(source, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            return
        except SyntaxError as exc:
            error = error or exc
    pytest.fail(f"the fragment at {block.where} does not compile: {error}", pytrace=False)


def _end_page(run: _PageRun, grace: float = THREAD_GRACE) -> None:
    """Runs trailing hidden code, then fails if the page left threads or tasks behind."""
    _run_python(run, len(run.page.blocks))
    if run.failed:
        pytest.skip(f"an earlier block failed ({run.failed})")
    with _InPage(run) as page:
        for hidden in run.page.trailing:
            page.exec(textwrap.dedent(hidden.source), hidden.line, "hidden code")
    pending = [] if run.loop is None else [t for t in asyncio.all_tasks(run.loop) if not t.done()]
    _discard(run)
    gc.collect()
    deadline = time.monotonic() + grace
    left = []
    for thread in set(threading.enumerate()) - run.threads_before:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            left.append(thread.name)
    problems = []
    if pending:
        problems.append(f"asyncio tasks still pending: {pending}")
    if left:
        problems.append(f"threads still running {grace} s after its last block: {left}")
    if problems:
        pytest.fail(
            f"{run.page.path} leaves {'; '.join(problems)} (close the servers, channels and "
            "managers a page opens, in a hidden '<!-- doctest: setup' comment after its last "
            "block if the reader need not see it)",
            pytrace=False,
        )


# --- shell, proto and data blocks ----------------------------------------------------------------

_SEPARATORS = {"&&", "||", ";", "|", "&", "\n"}
_PYTHON = re.compile(r"^(?:.*/)?python(?:3(?:\.\d+)?)?$")
_HELP: dict[tuple[str, ...], str] = {}


def _commands(source: str) -> Iterator[list[str]]:
    """The simple commands of a shell block, as word lists (comments and redirections dropped)."""
    text = source.replace("\\\n", " ")
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>()")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        redirect = False
        for token in lexer:
            if token in _SEPARATORS:
                if words:
                    yield words
                words = []
            elif set(token) <= set("<>&"):
                redirect = True
            elif redirect:
                redirect = False
            elif set(token) <= set("()$"):
                continue
            else:
                words.append(token)
        if words:
            yield words


def _help(argv: tuple[str, ...]) -> str:
    """``argv --help``'s output (run once per program)."""
    if argv not in _HELP:
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        )
        done = subprocess.run(
            [*argv, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"{' '.join(argv)} --help failed: {done.stderr[-2000:]}"
        _HELP[argv] = done.stdout + done.stderr
    return _HELP[argv]


def _flags(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("--") and len(w) > 2]


def _check_flags(where: str, argv: tuple[str, ...], shown: str, words: list[str]) -> None:
    flags = _flags(words)
    if not flags:
        return
    text = _help(argv)
    missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
    assert not missing, f"{where}: `{shown}` passes {missing}, not in its --help"


def _page_files(page: pathlib.Path) -> set[str]:
    """The files a page writes itself (a ``<!-- file: NAME -->`` line before a block; such pages
    are run by a test of their own, e.g. tests/test_tutorial.py)."""
    return set(re.findall(r"<!-- file: (\S+) -->", (ROOT / page).read_text(encoding="utf-8")))


def _check_python(where: str, words: list[str], page: pathlib.Path | None = None) -> None:
    args = words[1:]
    while args and args[0].startswith("-") and args[0] not in ("-m", "-c"):
        args = args[1:]
    if not args:
        return
    if args[0] == "-c":
        compile(args[1], f"{where} (python -c)", "exec")
        return
    if args[0] == "-m":
        module, rest = args[1], args[2:]
        top = module.split(".")[0]
        assert importlib.machinery.PathFinder.find_spec(top, [str(ROOT), *sys.path]), (
            f"{where}: `python -m {module}`: no module {top!r}"
        )
        if module in ("venv", "pip"):
            return
        _check_flags(where, (sys.executable, "-m", module), f"python -m {module}", rest)
        return
    if page is not None and args[0] in _page_files(page):
        return  # a file the page has the reader write: its own test runs it
    script = ROOT / args[0]
    assert script.is_file(), f"{where}: `python {args[0]}`: no such file (from the repository root)"
    _check_flags(where, (sys.executable, str(script)), f"python {args[0]}", args[1:])


def _lrofw_command() -> tuple[str, ...] | None:
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("scripts", {})
    if "lrofw" not in scripts:
        return None
    module, function = scripts["lrofw"].split(":")
    code = f"import sys; from {module} import {function} as m; sys.argv[0] = 'lrofw'; sys.exit(m())"
    return (sys.executable, "-c", code)


def _check_lrofw(where: str, words: list[str]) -> None:
    base = _lrofw_command()
    assert base is not None, (
        f"{where}: `lrofw` is not a command of pyproject.toml's [project.scripts]"
    )
    sub = []
    for word in words[1:]:
        if word.startswith("-"):
            break
        sub.append(word)
    rest = words[1 + len(sub) :]
    # the longest run of leading words that is a subcommand whose --help works
    while sub:
        try:
            _help((*base, *sub))
            break
        except AssertionError:
            rest = [sub.pop(), *rest]
    _check_flags(where, (*base, *sub), " ".join(["lrofw", *sub]), rest)


def _check_tox(where: str, words: list[str]) -> None:
    if "-e" not in words:
        return
    wanted = words[words.index("-e") + 1].split(",")
    config = configparser.ConfigParser()
    config.read(ROOT / "tox.ini")
    known = {s.split(":", 1)[1] for s in config.sections() if s.startswith("testenv:")}
    known |= set(config.get("tox", "envlist", fallback="").replace(",", " ").split())
    missing = [env for env in wanted if env not in known]
    assert not missing, f"{where}: `tox -e {','.join(wanted)}`: tox.ini has no {missing}"


def _check_shell(block: mdblocks.Block) -> None:
    for words in _commands(block.source):
        while words and re.match(r"^\w+=", words[0]):
            words = words[1:]
        if not words:
            continue
        if _PYTHON.match(words[0]):
            _check_python(block.where, words, block.path)
        elif words[0] == "lrofw":
            _check_lrofw(block.where, words)
        elif words[0] == "tox":
            _check_tox(block.where, words)


def _check_proto(block: mdblocks.Block) -> None:
    with tempfile.TemporaryDirectory(prefix="lrofw-docs-proto-") as tmp:
        (pathlib.Path(tmp) / "block.proto").write_text(block.source)
        done = subprocess.run(
            [sys.executable, "-m", "lrofw.protoc", "-I.", "--python_out=.", "block.proto"],
            cwd=tmp,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, f"{block.where}: the .proto does not compile:\n{done.stderr}"


def _check_data(block: mdblocks.Block) -> None:
    if block.lang == "json":
        json.loads(block.source)
    elif block.lang == "toml":
        import tomllib

        tomllib.loads(block.source)
    elif block.lang in ("yaml", "yml"):
        yaml = pytest.importorskip("yaml")
        yaml.safe_load(block.source)
    else:
        configparser.ConfigParser().read_string(block.source)


@pytest.mark.parametrize(("path", "index"), list(_cases()))
def test_block(path: pathlib.Path, index: int | None) -> None:
    """The block runs (Python) or checks out (shell, proto, data); [end]: the page leaks nothing."""
    run = _page_run(path)
    if index is None:
        _end_page(run)
        return
    block = run.page.blocks[index]
    if block.lang in mdblocks.PYTHON:
        _run_python(run, index + 1)
    elif block.lang in mdblocks.SHELL:
        _check_shell(block)
    elif block.lang == "proto":
        _check_proto(block)
    else:
        _check_data(block)


def test_conventions() -> None:
    """The parser finds blocks, fragments and hidden code where the conventions say."""
    text = (
        "<!-- doctest: setup\nx = 1\n-->\n\n```python\ny = x + 1\n```\n"
        "<!-- doctest: fragment -->\n```python\nz = undefined\n```\n"
        "~~~sh\npython -m lrofw.protoc --help\n~~~\n<!-- doctest: setup close() -->\n"
    )
    page = mdblocks.parse_text(text, "t.md")
    python, fragment, shell = page.blocks
    assert (python.lang, python.line, python.source, python.fragment) == (
        "python",
        6,
        "y = x + 1\n",
        False,
    )
    assert [(h.source, h.line) for h in python.setup] == [("x = 1\n", 2)]
    assert fragment.fragment and not fragment.setup
    assert (shell.lang, shell.source) == ("sh", "python -m lrofw.protoc --help\n")
    assert [h.source for h in page.trailing] == ["close()\n"]
    assert list(_commands("A=1 python -m x --a=1 > out.txt && cd y  # --not-a-flag\n")) == [
        ["A=1", "python", "-m", "x", "--a=1"],
        ["cd", "y"],
    ]


def test_a_page_that_leaves_a_thread_running_fails(tmp_path: pathlib.Path) -> None:
    """The [end] check names a thread a page started and did not stop."""
    page = tmp_path / "leaky.md"
    page.write_text(
        "```python\nimport threading\nstop = threading.Event()\n"
        "threading.Thread(target=stop.wait, name='leaky-thread').start()\n```\n"
    )
    run = _page_run(page)
    _run_python(run, 1)
    stop = run.namespace["stop"]
    try:
        with pytest.raises(pytest.fail.Exception, match="leaky-thread"):
            _end_page(run, grace=0.05)
    finally:
        stop.set()
        _RUNS.pop(page, None)


def test_a_failing_block_names_its_line(tmp_path: pathlib.Path) -> None:
    """A block that raises fails with the page's file:line of the raising line."""
    page = tmp_path / "broken.md"
    page.write_text("text\n\n```python\nx = 1\nundefined_name\n```\n")
    run = _page_run(page)
    try:
        with pytest.raises(pytest.fail.Exception, match=r"broken.md:5: NameError"):
            _run_python(run, 1)
    finally:
        _discard(_RUNS.pop(page))
