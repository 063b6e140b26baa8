"""core.files: atomic writes of one file (any writer) and of a whole folder."""

from __future__ import annotations

import pytest

from ellava_lib.core import files


def test_write_atomic_replaces_the_file_or_leaves_it_as_it_was(tmp_path):
    target = tmp_path / "sub" / "w.bin"
    assert files.write_atomic(target, lambda tmp: tmp.write_bytes(b"one")) == target
    assert target.read_bytes() == b"one"

    def half(tmp):
        tmp.write_bytes(b"tw")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(target, half)
    assert target.read_bytes() == b"one"
    assert [p.name for p in target.parent.iterdir()] == ["w.bin"]  # no temp file left


def test_write_dir_swaps_in_a_whole_folder(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")

    def fill(tmp):
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and ".tmp" in tmp.name and tmp.is_dir()
        files.write_text(tmp / "a.txt", "new")

    assert files.write_dir(out, fill) == out
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # replaced, not merged

    def broken(tmp):
        files.write_text(tmp / "b.txt", "half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        files.write_dir(out, broken)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folder left

    blocker = tmp_path / "file"
    blocker.write_text("a file in the way")
    files.write_dir(blocker, fill)
    assert blocker.is_dir() and (blocker / "a.txt").read_text() == "new"


def test_written_files_get_the_mode_open_gives(tmp_path):
    """Atomic writes go through a 0600 temp file; the result has the umask's ordinary mode, as ``open`` gives."""
    import os
    import stat

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    for name, write in [("a.txt", lambda p: files.write_text(p, "x")),
                        ("b.json", lambda p: files.write_json(p, {"a": 1}))]:
        write(tmp_path / name)
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
