"""The nbval regression set (tests/nbval/<cpu kind>/): references exist for each CPU kind kept, carry outputs, match
the source notebooks, and the check really fails when a checked number changes."""

from __future__ import annotations

import subprocess
import sys

import nbformat
import pytest

from ellava_lib.run import pipeline

#: Every CPU kind's reference folder (tests/nbval/<kind>, pipeline.cpu_kind): each must be complete and current.
KINDS = sorted(p for p in pipeline.nbval_dir().parent.iterdir() if p.is_dir() and not p.name.startswith("."))
CHECK = "# NBVAL_CHECK_OUTPUT"


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"
            and "injected-parameters" not in c.metadata.get("tags", [])]


def test_the_references_are_kept_per_cpu_kind():
    assert [k.name for k in KINDS] and {k.name for k in KINDS} <= {"amd", "intel"}
    assert pipeline.cpu_kind("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n") == "amd"
    assert pipeline.cpu_kind("vendor_id\t: GenuineIntel\nvendor_id\t: AuthenticAMD\n") == "intel"  # the first
    assert pipeline.cpu_kind("vendor_id : HygonGenuine\n") == "hygongenuine"
    assert pipeline.cpu_kind("processor : 0\n") == "unknown"
    assert pipeline.nbval_dir(kind="amd") == pipeline.project_root() / "tests" / "nbval" / "amd"


def test_make_nbval_names_this_machines_references_or_says_there_are_none(tmp_path, capsys):
    if pipeline.nbval_dir() in KINDS:
        assert pipeline.main(["--nbval-dir"]) == 0
        assert capsys.readouterr().out.strip() == str(pipeline.nbval_dir())
    root = tmp_path / "proj"
    for sub in ("notebooks", "profiles"):
        (root / sub).mkdir(parents=True)
    assert pipeline.main(["--nbval-dir", "--root", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pipeline: error: no nbval references for this CPU kind "
                                               f"({pipeline.cpu_kind()}) in {root / 'tests' / 'nbval'}")


@pytest.mark.parametrize("refs", KINDS, ids=[k.name for k in KINDS])
def test_every_notebook_has_a_reference_with_outputs_in_its_checked_cells(refs):
    sources = sorted(p.name for p in pipeline.notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
    assert sorted(p.name for p in refs.glob("*.ipynb")) == sources
    for name in sources:
        ref = nbformat.read(refs / name, as_version=4)
        checked = [c for c in ref.cells if c.cell_type == "code" and c.source.startswith(CHECK)]
        assert checked, f"{name}: no checked cell"
        # the trap: a reference stored without outputs compares nothing
        assert all(c.outputs for c in checked), f"{name}: a checked cell has no stored output"


@pytest.mark.parametrize("refs", KINDS, ids=[k.name for k in KINDS])
def test_references_replay_the_current_notebook_code(refs):
    """A notebook edited without regenerating its references (make nbval-refs, on each CPU kind) fails here."""
    for src in sorted(pipeline.notebooks_dir().glob("[0-9][0-9]_*.ipynb")):
        ref = nbformat.read(refs / src.name, as_version=4)
        assert _code(ref) == _code(nbformat.read(src, as_version=4)), f"{refs.name}/{src.name}: run make nbval-refs"
        injected = [c for c in ref.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1 and 'run_dir = "../../../runs/nbval"' in injected[0].source


def _nbval(path, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                           "--nbval-current-env", "--nbval-sanitize-with", str(pipeline.nbval_sanitize()), str(path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("stored,passes", [("0.33\n", True), ("0.34\n", False)])
def test_a_changed_number_in_a_checked_cell_fails(tmp_path, stored, passes):
    """The same checking setup as `make nbval` (lax mode, our sanitize file): a timing line is sanitized,
    an unchecked cell is ignored, and a checked number that differs from the stored one fails."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    timing = nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nimport time\nprint(f'took {time.time() % 7:.2f} s')")
    timing.outputs = [nbformat.v4.new_output("stream", name="stdout", text="took 1.23 s\n")]
    free = nbformat.v4.new_code_cell("print(42)")
    free.outputs = [nbformat.v4.new_output("stream", name="stdout", text="41\n")]
    checked = nbformat.v4.new_code_cell(f"{CHECK}\nprint(round(1 / 3, 2))")
    checked.outputs = [nbformat.v4.new_output("stream", name="stdout", text=stored)]
    nb.cells = [timing, free, checked]
    for i, cell in enumerate(nb.cells, 1):
        cell.execution_count = i
    path = tmp_path / "check.ipynb"
    nbformat.write(nb, path)
    result = _nbval(path, tmp_path)
    assert (result.returncode == 0) == passes, result.stdout[-2000:]
