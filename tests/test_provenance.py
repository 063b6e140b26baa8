"""Provenance: every ``benchmarks/results/*.json`` a document cites is in the repository.

Cited = named in prose in README.md or docs/*.md, a docstring or comment of ``ellava_lib/**/*.py``, or
``benchmarks/*.py``. Command examples (lines whose text starts with ``python ``) name files a command *writes*
and are not citations.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"benchmarks/results/[A-Za-z0-9_./-]+?\.json")


def _sources() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "ellava_lib").rglob("*.py")),
            *sorted((ROOT / "benchmarks").glob("*.py"))]


def cited_results() -> dict[str, list[str]]:
    """Cited path -> the ``file:line`` places citing it."""
    out: dict[str, list[str]] = {}
    for path in _sources():
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip().startswith("python "):
                continue
            for m in CITED.finditer(line):
                out.setdefault(m.group(0), []).append(f"{path.relative_to(ROOT)}:{no}")
    return out


def test_cited_results_files_exist():
    missing = {p: where for p, where in cited_results().items() if not (ROOT / p).is_file()}
    assert not missing, f"results files cited but not in the repository: {missing}"


def test_the_citation_scan_sees_prose_not_commands(tmp_path):
    assert CITED.findall("see benchmarks/results/a_b.json and `benchmarks/results/c.json`.") == [
        "benchmarks/results/a_b.json", "benchmarks/results/c.json"]


def test_benchmarks_results_is_not_ignored():
    text = (ROOT / ".gitignore").read_text()
    assert not any(line.strip().rstrip("/") == "benchmarks/results" for line in text.splitlines())
