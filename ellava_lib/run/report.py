"""Generated documentation: splice tables produced by a run into the README between markers."""

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


def update_readme(readme: Path, marker: str, body: str) -> bool:
    """Splice ``body`` into the README block ``marker``; returns whether the file changed. The read-splice-write
    holds an exclusive lock on ``<readme>.lock``, so notebooks running side by side (the pipeline's overlap lane)
    never lose each other's blocks."""
    readme = Path(readme)
    with open(readme.with_name(readme.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = readme.read_text()
        new = splice(old, marker, body)
        if new != old:
            files.write_text(readme, new)
    return new != old
