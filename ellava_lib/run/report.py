"""Generated documentation: splice tables produced by a run into the README or a page of ``docs/`` between markers.

A block ``<!-- NAME:start -->`` ... ``<!-- NAME:end -->`` lives in exactly one of a project's documents
(:func:`documents`: ``README.md`` and ``docs/*.md``); writers name the block and the project root (or, as before,
the README: :func:`update_readme`), and :func:`doc_with` finds the page that holds it, so a table moves with its
markers from one page to another without touching the code that writes it.
"""

from __future__ import annotations

import fcntl
import re
from pathlib import Path

from ellava_lib.core import files


def splice(text: str, marker: str, body: str) -> str:
    """Replace what stands between ``<!-- {marker}:start -->`` and ``<!-- {marker}:end -->``."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"markers {start} ... {end} not found")
    return pattern.sub(lambda _: f"{start}\n{body.strip()}\n{end}", text, count=1)


def documents(root: str | Path) -> list[Path]:
    """The documents of the project folder ``root`` that hold spliced blocks: ``README.md`` and ``docs/*.md``
    (those that exist)."""
    root = Path(root)
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def doc_with(root: str | Path, marker: str, also: tuple[Path, ...] = ()) -> Path:
    """The one document among :func:`documents` of ``root`` (and ``also``) holding the block ``marker``; a
    one-line ``ValueError`` when none or several do."""
    start = f"<!-- {marker}:start -->"
    unique = {p.resolve(): p for p in [*documents(root), *also]}  # the same file named two ways counts once
    found = [p for p in unique.values() if start in p.read_text(encoding="utf-8")]
    if len(found) != 1:
        where = f"{', '.join(str(p) for p in found)} all hold" if found else "no file holds"
        raise ValueError(f"{where} the block {start} (looked in {Path(root) / 'README.md'} and "
                         f"{Path(root) / 'docs'}/*.md{''.join(f', {p}' for p in also)})")
    return found[0]


def _splice_file(path: Path, marker: str, body: str) -> bool:
    """Splice ``body`` into ``path``'s block ``marker`` under an exclusive lock on ``<path>.lock``, so notebooks
    running side by side (the pipeline's overlap lane) never lose each other's blocks; whether it changed."""
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = path.read_text(encoding="utf-8")
        new = splice(old, marker, body)
        if new != old:
            files.write_text(path, new)
    return new != old


def update_doc(root: str | Path, marker: str, body: str) -> bool:
    """Splice ``body`` into the block ``marker`` of whichever document of the project ``root`` holds it
    (:func:`doc_with`); returns whether that file changed."""
    return _splice_file(doc_with(root, marker), marker, body)


def update_readme(readme: str | Path, marker: str, body: str) -> bool:
    """Splice ``body`` into the block ``marker`` of the project whose README is ``readme`` (a folder: the project
    root itself): into ``readme`` when it holds the block, else into the one page of ``docs/`` beside it that does
    (:func:`doc_with`). The notebooks' ``update_readme`` parameter and the ``--readme README.md`` options call it,
    so they reach a block wherever it lives. Returns whether the file changed."""
    readme = Path(readme)
    if readme.is_dir():
        return update_doc(readme, marker, body)
    return _splice_file(doc_with(readme.parent, marker, also=(readme,)), marker, body)
