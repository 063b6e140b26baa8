"""The documentation: README.md is the short front door, docs/*.md the pages behind it. Every relative link of
either resolves (the file exists; a ``#anchor`` is a heading of the target under GitHub's slug rules), every
spliced block lives in exactly one document, and the splice writers find it there (:mod:`ellava_lib.run.report`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ellava_lib.run import report

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 260
PRUNE_HEADING = "## Prune your own LLaVA checkpoint"

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` outside fenced code blocks, with inline code spans blanked out."""
    out, fenced = [], False
    for no, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((no, re.sub(r"`[^`]*`", lambda m: " " * len(m.group(0)), line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, lowercase, every character but letters, digits, spaces,
    hyphens and underscores dropped, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of ``path``'s headings (a repeated slug gets ``-1``, ``-2``, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            s = slug(m.group(2))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def broken_links(path: Path) -> list[str]:
    """``file:line: target (why)`` for every relative link of the markdown file ``path`` that does not resolve."""
    bad = []
    for no, line in prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(line):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                bad.append(f"{path.name}:{no}: {target} (no such file)")
            elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                bad.append(f"{path.name}:{no}: {target} (no heading #{anchor} in {dest.name})")
    return bad


def test_every_relative_link_resolves():
    bad = [b for doc in report.documents(ROOT) for b in broken_links(doc)]
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_docs_pages_exist_and_the_readme_links_each():
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {"method.md", "tiers.md", "paper.md", "sweeps.md", "speed.md", "cli.md", "layout.md"} <= pages
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert all(f"(docs/{p})" in readme for p in pages), pages


def test_readme_is_short_and_shows_how_to_prune_your_own_checkpoint():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    assert PRUNE_HEADING in text.splitlines()


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(
        "# A page\n## Shipped weights (`weights/`)\n## Shipped weights\n## Shipped weights\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Top: the kit\n\n"
        "[ok](docs/page.md) [ok anchor](docs/page.md#shipped-weights-weights) [dup](docs/page.md#shipped-weights-1)\n"
        "[self](#top-the-kit) ![figure](docs/page.md) [web](https://example.com/x.md#nowhere)\n"
        "[missing file](docs/nope.md)\n"
        "[missing anchor](docs/page.md#no-such-heading)\n"
        "`[in code](docs/nope.md)`\n"
        "```\n[in a fence](docs/nope.md)\n```\n"
        "[bad self](#nowhere)\n")
    assert broken_links(readme) == [
        "README.md:5: docs/nope.md (no such file)",
        "README.md:6: docs/page.md#no-such-heading (no heading #no-such-heading in page.md)",
        "README.md:11: #nowhere (no heading #nowhere in README.md)"]


@pytest.mark.parametrize("heading, anchor", [
    ("The main table (`05_main_table`)", "the-main-table-05_main_table"),
    ("tiny: the embedded default", "tiny-the-embedded-default"),
    ("How the main table's methods are made", "how-the-main-tables-methods-are-made"),
    ("ellava — EfficientLLaVA, reproducible", "ellava--efficientllava-reproducible"),
    ("See [the docs](docs/cli.md)", "see-the-docs"),
])
def test_slug_follows_github(heading, anchor):
    assert slug(heading) == anchor


def test_every_spliced_block_is_closed_and_lives_in_one_document():
    starts: dict[str, list[str]] = {}
    for doc in report.documents(ROOT):
        text = doc.read_text(encoding="utf-8")
        for name in re.findall(r"<!-- ([\w-]+):start -->", text):
            starts.setdefault(name, []).append(doc.name)
            assert f"<!-- {name}:end -->" in text, (doc.name, name)
    assert {n for n, where in starts.items() if len(where) > 1} == set()
    for name in starts:
        assert report.doc_with(ROOT, name).name == starts[name][0]
    # what the writers splice: notebooks / pipeline (with the smol prefix too), ellava plan, the benchmarks
    written = {"timing", "results", "main", "ablations", "leveldb", "grid", "latency", "e2e_decode", "e2e_decode_7b",
               "paper-plan", "smol-plan", "smol-cpu-plan", "smol-accuracy-speed"} | \
        {f"smol-{n}" for n in ("timing", "results", "main", "ablations", "leveldb")}
    assert written <= set(starts), written - set(starts)


def _project(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# r\n<!-- a:start -->\nold\n<!-- a:end -->\n")
    (tmp_path / "docs" / "x.md").write_text("# x\n<!-- b:start -->\nold\n<!-- b:end -->\n")
    return tmp_path


def test_update_readme_splices_wherever_the_block_lives(tmp_path):
    root = _project(tmp_path)
    assert report.update_readme(root / "README.md", "b", "| new |")  # --readme README.md reaches docs/x.md
    assert (root / "docs" / "x.md").read_text() == "# x\n<!-- b:start -->\n| new |\n<!-- b:end -->\n"
    assert report.update_doc(root, "a", "| a |") and "| a |" in (root / "README.md").read_text()
    assert report.update_readme(root, "b", "| b |")  # a folder is the project root
    assert not report.update_doc(root, "b", "| b |")  # unchanged
    assert (root / "docs" / "x.md.lock").is_file()  # per-file lock, git-ignored (docs/*.lock)
    assert "docs/*.lock" in (ROOT / ".gitignore").read_text().splitlines()


def test_a_block_in_no_document_or_in_several_is_a_one_line_error(tmp_path):
    root = _project(tmp_path)
    with pytest.raises(ValueError, match=r"^no file holds the block <!-- c:start -->") as e:
        report.update_doc(root, "c", "x")
    assert "\n" not in str(e.value)
    (root / "docs" / "y.md").write_text("<!-- b:start -->\n<!-- b:end -->\n")
    with pytest.raises(ValueError, match=r"x\.md, .*y\.md all hold the block <!-- b:start -->") as e:
        report.update_readme(root / "README.md", "b", "x")
    assert "\n" not in str(e.value)
    assert "old" in (root / "docs" / "x.md").read_text()  # nothing written


def test_the_notebooks_relative_call_reaches_docs(tmp_path, monkeypatch):
    """Notebooks run with the project as their folder and call ``update_readme(Path("README.md"), ...)``."""
    root = _project(tmp_path)
    monkeypatch.chdir(root)
    assert report.update_readme(Path("README.md"), "b", "| nb |")
    assert "| nb |" in (root / "docs" / "x.md").read_text()
