"""Atomic writes for run-folder artifacts: every file (and every model folder) is written beside its destination
under a temporary name, then renamed into place, so a reader never sees half of one.

- :func:`write_atomic`: one file, whatever writes it (text, JSON, CSV, safetensors); :func:`write_text`,
  :func:`write_json`, :func:`write_jsonl` and :func:`write_csv` are its text forms.
- :func:`write_dir`: a whole folder (a saved model with its policy and report), replacing what was there.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and check it is writable; one-line error otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create output folder {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise OSError(f"output folder {path} is not writable")
    return path


def _file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the process umask (read from ``/proc`` where it can
    be, since ``os.umask`` can only be read by setting it, which races with other threads; else ``0o022``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a fresh temp file ``.<name>.<random>.tmp`` in the same
    folder, which gets the mode a plain ``open()`` would give (:func:`_file_mode`; ``mkstemp`` makes it 0600)
    and then replaces ``path`` (``os.replace``). If anything raises (or the process is interrupted), the temp
    file is removed and ``path`` keeps its old content."""
    path = Path(path)
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`write_atomic`)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: Any) -> Path:
    """``obj`` as indented JSON with sorted keys (``str`` for what JSON cannot hold), newline-terminated."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    """One compact JSON object (sorted keys) per line."""
    return write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_csv(path: Path, frame: pd.DataFrame) -> Path:
    """``frame`` as CSV without its index."""
    return write_text(path, frame.to_csv(index=False))


def write_dir(path: Path, fill: Callable[[Path], object]) -> Path:
    """Write the folder ``path`` atomically: ``fill(tmp)`` writes into a fresh folder ``.<name>.tmp<pid>`` beside
    it, which then takes ``path``'s place (a file or folder already there is removed first). If ``fill``
    raises (or the process is interrupted), the temp folder is removed and ``path`` is left as it was."""
    path = Path(path)
    ensure_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.exists():  # left by an interrupted process that had this pid
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        fill(tmp)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path
