"""MkDocs hook: links from the docs to files of the repository outside ``docs/``.

The docs are read in two places: on a code host, where ``../examples/tls_provision/server.py``
is a file next to the docs, and as the built site, which holds only ``docs/``. This hook makes
such links work in the site and keeps them checked (``mkdocs build --strict`` fails on a dead one):

* a link whose target lies outside ``docs/`` but inside the repository must name a file or a
  folder that exists (a folder stands for its ``README.md``); otherwise a warning is logged;
* each such file is copied into the site under ``repo/`` at its repository path (a Markdown file
  becomes a page there, so ``examples/tls_provision/README.md`` is rendered, and its own links are
  handled the same way), and the link is rewritten to the copy;
* links are resolved from the real location of the file they are written in, so the copied
  pages' links back into ``docs/`` (``../../docs/asyncio.md``) land on the docs' pages.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.plugins.repo_links")

#: ``[text](target)`` and ``![alt](target)``: the target up to a space, ``#`` or ``)``.
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s#]+)((?:#[^)\s]*)?(?:\s+\"[^\"]*\")?\))")
#: Where copies of repository files live in the site.
MIRROR = "repo"

_mirrored: dict[Path, str] = {}  # repository file -> its src_uri in the site


def _roots(config: Any) -> tuple[Path, Path]:
    docs = Path(config["docs_dir"]).resolve()
    return docs, Path(config["config_file_path"]).resolve().parent


def _is_local(target: str) -> bool:
    return not (target.startswith(("/", "mailto:")) or re.match(r"^[a-zA-Z][\w+.-]*:", target))


def _resolve(source: Path, target: str, repo: Path) -> Path | None:
    """The repository file ``target`` (written in ``source``) names; None outside the repo."""
    path = (source.parent / target).resolve()
    if not path.is_relative_to(repo):
        return None
    if path.is_dir() and (path / "README.md").is_file():
        path = path / "README.md"
    return path


def _outside_links(source: Path, docs: Path, repo: Path) -> list[Path]:
    found = []
    for match in LINK.finditer(source.read_text(encoding="utf-8")):
        target = match.group(2)
        if not _is_local(target):
            continue
        path = _resolve(source, target, repo)
        if path is not None and not path.is_relative_to(docs) and path.is_file():
            found.append(path)
    return found


def on_files(files: Files, config: Any) -> Files:
    """Adds a copy of every repository file the docs link to (transitively through copied
    Markdown files) to the site."""
    docs, repo = _roots(config)
    _mirrored.clear()
    pending = [Path(f.abs_src_path) for f in files.documentation_pages() if f.abs_src_path]
    while pending:
        for path in _outside_links(pending.pop(), docs, repo):
            if path in _mirrored:
                continue
            uri = posixpath.join(MIRROR, path.relative_to(repo).as_posix())
            _mirrored[path] = uri
            files.append(File.generated(config, uri, abs_src_path=str(path)))
            if path.suffix == ".md":
                pending.append(path)
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Rewrites links to repository files outside ``docs/`` into links to their copies; a link
    to a repository path that does not exist is a warning (an error with ``--strict``)."""
    docs, repo = _roots(config)
    if page.file.abs_src_path is None:
        return markdown
    source = Path(page.file.abs_src_path)
    here = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match[str]) -> str:
        target = match.group(2)
        if not _is_local(target):
            return match.group(0)
        path = _resolve(source, target, repo)
        if path is None:
            return match.group(0)  # outside the repository: MkDocs reports it
        if path.is_relative_to(docs):
            uri = path.relative_to(docs).as_posix()
            if source.is_relative_to(docs):
                return match.group(0)  # an ordinary link between docs pages: MkDocs checks it
        elif path.is_file() and path in _mirrored:
            uri = _mirrored[path]
        else:
            log.warning(
                "Doc file '%s' links to '%s', which does not exist in the repository",
                page.file.src_uri,
                target,
            )
            return match.group(0)
        relative = posixpath.relpath(uri, here or ".")
        return f"{match.group(1)}{relative}{match.group(3)}"

    return LINK.sub(rewrite, markdown)
