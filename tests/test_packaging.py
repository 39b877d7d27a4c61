"""The distribution: what the sdist and the wheel carry, their metadata, one version, and a
type checker finding lrofw after an install (plain or editable).

The sdist and the wheel are built from a copy of the working tree with setuptools' own PEP 517
hooks (``setuptools.build_meta``, no network, no build isolation), the wheel from the unpacked
sdist as ``python -m build`` would, so the sdist is also shown to be enough to build the wheel.
"""

from __future__ import annotations

import ast
import email.message
import email.parser
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import lrofw

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tls_provision"
#: Kept out of the copy the builds start from: never part of a distribution.
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "*.egg-info", "build", "dist", "site", "__pycache__", ".*_cache",
    ".hypothesis", ".benchmarks", "*.db", "*.db-*", "*.log",
)  # fmt: skip
#: sha256 of https://www.apache.org/licenses/LICENSE-2.0.txt, the licence pyproject declares.
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
NOT_SHIPPED = ("tests/", "examples/", "benchmarks/", ".ci/")


@dataclass
class Built:
    """The built sdist and wheel: their member names and their core metadata."""

    sdist: Path
    wheel: Path
    sdist_names: list[str]
    wheel_names: list[str]
    sdist_metadata: email.message.Message
    wheel_metadata: email.message.Message


def _hook(hook: str, cwd: Path, out: Path) -> Path:
    """Runs a setuptools PEP 517 hook in ``cwd`` in a fresh interpreter; the file it wrote.

    The sdist and wheel builds run with warnings as errors (a deprecated setting in pyproject
    fails here first); the editable one may print setuptools' notes about its mode.
    """
    code = f"import sys, setuptools.build_meta as b; print(b.{hook}(sys.argv[1]))"
    warnings = [] if hook == "build_editable" else ["-W", "error"]
    done = subprocess.run(
        [sys.executable, *warnings, "-c", code, str(out)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{hook} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out / done.stdout.strip().splitlines()[-1]


def _source_modules() -> set[str]:
    """lrofw's modules and data files in the working tree, as paths relative to the root."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "lrofw").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The sdist built from a copy of the tree, and the wheel built from that sdist."""
    tmp = tmp_path_factory.mktemp("dist")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=COPY_IGNORE)
    sdist = _hook("build_sdist", source, tmp)
    with tarfile.open(sdist) as archive:
        sdist_names = archive.getnames()
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
            archive.extractall(tmp / "unpacked", filter="data")
        else:
            archive.extractall(tmp / "unpacked")
    (unpacked,) = (tmp / "unpacked").iterdir()
    wheel = _hook("build_wheel", unpacked, tmp)
    with zipfile.ZipFile(wheel) as archive:
        wheel_names = archive.namelist()
        (metadata_name,) = (n for n in wheel_names if n.endswith(".dist-info/METADATA"))
        wheel_metadata = email.parser.BytesParser().parsebytes(archive.read(metadata_name))
    sdist_metadata = email.parser.BytesParser().parsebytes((unpacked / "PKG-INFO").read_bytes())
    return Built(sdist, wheel, sdist_names, wheel_names, sdist_metadata, wheel_metadata)


def test_installed_version_is_lrofw_version() -> None:
    """The installed distribution's version is lrofw.__version__ (pyproject reads it there)."""
    assert importlib.metadata.version("lrofw") == lrofw.__version__


def test_license_is_the_full_apache_2_text() -> None:
    """LICENSE is the unmodified Apache License 2.0, the licence pyproject declares."""
    text = (ROOT / "LICENSE").read_bytes()
    assert hashlib.sha256(text).hexdigest() == APACHE_2_SHA256, "LICENSE is not Apache-2.0 verbatim"


def test_wheel_carries_lrofw_typed_and_nothing_else(built: Built) -> None:
    """The wheel: every lrofw module, py.typed and the licence; no tests, examples or benchmarks."""
    names = set(built.wheel_names)
    assert "lrofw/py.typed" in names
    assert _source_modules() <= names
    dist_info = f"lrofw-{lrofw.__version__}.dist-info/"
    assert {n.split("/", 1)[0] + "/" for n in names} == {"lrofw/", dist_info}
    with zipfile.ZipFile(built.wheel) as archive:
        assert archive.read(dist_info + "licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()


def test_sdist_carries_the_library_and_docs_but_no_tests(built: Built) -> None:
    """The sdist: lrofw, README, LICENSE, docs and build config; no tests (they need the repo)."""
    prefix = f"lrofw-{lrofw.__version__}/"
    assert all(n.startswith(prefix) or n + "/" == prefix for n in built.sdist_names)
    names = {n.removeprefix(prefix) for n in built.sdist_names}
    assert {"pyproject.toml", "README.md", "LICENSE", "PKG-INFO", "lrofw/py.typed"} <= names
    assert _source_modules() <= names
    docs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert docs <= names
    shipped = sorted(n for n in names if n.startswith(NOT_SHIPPED) or n.rstrip("/") in NOT_SHIPPED)
    assert shipped == [], f"the sdist ships {shipped}"


@pytest.mark.parametrize("which", ["sdist", "wheel"])
def test_metadata_licence_classifiers_urls_version(built: Built, which: str) -> None:
    """Core metadata: the version, the licence, Python and typing classifiers, URLs, keywords."""
    meta = built.sdist_metadata if which == "sdist" else built.wheel_metadata
    assert meta["Version"] == lrofw.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    pythons = tuple(
        c.rsplit(" :: ", 1)[1]
        for c in classifiers
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    assert pythons == PYTHONS
    assert meta["Requires-Python"] == f">={PYTHONS[0]}"
    assert any(c.startswith("Development Status :: ") for c in classifiers)
    assert any(c.startswith("Topic :: ") for c in classifiers)
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert set(urls) == {"Homepage", "Documentation", "Changelog", "Issues"}
    assert all(u.startswith("https://") for u in urls.values())
    assert "grpc" in (meta["Keywords"] or "").split(",")


def _requirements(meta: email.message.Message, extra: str) -> set[str]:
    """Normalised names of the distributions required with no extra or with ``extra``."""
    names = set()
    for line in meta.get_all("Requires-Dist") or []:
        requirement, _, marker = line.partition(";")
        if marker and f'extra == "{extra}"' not in marker:
            continue
        name = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
        assert name is not None, line
        names.add(re.sub(r"[-_.]+", "-", name.group()).lower())
    return names


def _distributions_of(module: str, owners: dict[Path, str]) -> set[str]:
    """The installed distributions that provide ``module`` (none for the standard library)."""
    if module.split(".")[0] in sys.stdlib_module_names:
        return set()
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"{module} is not importable"
    if spec.origin is not None:
        return {owners[Path(spec.origin).resolve()]}
    # A namespace package (google.longrunning): whoever installed the files directly in it.
    folders = [Path(f).resolve() for f in spec.submodule_search_locations or []]
    return {dist for path, dist in owners.items() if path.parent in folders}


def test_example_extra_has_everything_the_example_imports(built: Built) -> None:
    """`pip install '.[example]'` is enough for the example (generate.py needs the protoc extra)."""
    owners = {
        Path(str(dist.locate_file(file))).resolve(): re.sub(
            r"[-_.]+", "-", dist.metadata["Name"]
        ).lower()
        for dist in importlib.metadata.distributions()
        for file in dist.files or []
        if file.suffix in (".py", ".so", ".pyd")
    }
    local = {path.stem for path in EXAMPLE.glob("*.py")}
    needed: dict[str, str] = {}
    for path in EXAMPLE.glob("*.py"):
        if path.name == "generate.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            for module in modules:
                top = module.split(".")[0]
                if top in local or top == "lrofw":
                    continue
                for dist in _distributions_of(module, owners):
                    needed[dist] = f"{path.name}: import {module}"
    assert needed, "found no third-party import in the example"
    installed = _requirements(built.wheel_metadata, "example")
    missing = {dist: where for dist, where in needed.items() if dist not in installed}
    assert missing == {}, f"not in lrofw's dependencies or the example extra: {missing}"


CHECKED = """\
import lrofw

version: int = lrofw.__version__
"""


def _install(wheel: Path, target: Path) -> Path:
    """A venv at ``target`` with ``wheel`` unpacked into its site-packages; its python."""
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(target)
    python = target / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return python


@pytest.mark.parametrize("mode", ["wheel", "editable"])
def test_mypy_finds_typed_lrofw_after_install(built: Built, mode: str, tmp_path: Path) -> None:
    """mypy sees lrofw's annotations after `pip install .` and after `pip install -e .`."""
    pytest.importorskip("mypy", reason="mypy is in the dev extra")
    if mode == "wheel":
        wheel = built.wheel
    else:
        # The editable wheel pip would install from a clone: built from the tree in place of
        # the sdist, which has no tests to put on the path anyway.
        source = tmp_path / "source"
        shutil.copytree(ROOT, source, ignore=COPY_IGNORE)
        wheel = _hook("build_editable", source, tmp_path)
        with zipfile.ZipFile(wheel) as archive:
            pth = [n for n in archive.namelist() if n.endswith(".pth")]
            assert len(pth) == 1, archive.namelist()
            # A path, not an import hook (`import __editable___..._finder`): mypy reads paths.
            assert Path(archive.read(pth[0]).decode().strip()).resolve() == source.resolve()
    python = _install(wheel, tmp_path / "venv")
    (tmp_path / "use.py").write_text(CHECKED)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file=", "--no-incremental",
         f"--python-executable={python}", "use.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    # lrofw.__version__ is a str: a typed lrofw makes this one line an error, an untyped one (or
    # one mypy cannot find) gives an import error and Any instead.
    for code in ("import-not-found", "import-untyped"):
        assert code not in done.stdout, done.stdout
    assert re.search(
        r'use\.py:3: error: Incompatible types in assignment \(expression has type "str", '
        r'variable has type "int"\)',
        done.stdout,
    ), done.stdout
