"""Generated documentation: splice tables produced by a run into the README between markers."""

from __future__ import annotations

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


def update_readme(readme: Path, marker: str, body: str) -> bool:
    """Splice ``body`` into the README block ``marker``; returns whether the file changed."""
    readme = Path(readme)
    old = readme.read_text()
    new = splice(old, marker, body)
    if new != old:
        files.write_text(readme, new)
    return new != old
