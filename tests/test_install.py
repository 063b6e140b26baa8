"""A non-editable install finds its manifests as package data and the notebooks/profiles from an explicit root,
never from the current folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from real_fixtures import write_benchmark_tree

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install --no-deps .`` (a built wheel, not editable) into a private target folder."""
    target = tmp_path_factory.mktemp("site")
    src = tmp_path_factory.mktemp("src")  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO / "ellava_lib", src / "ellava_lib", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-compile",
                    "--target", str(target), str(src)], check=True, capture_output=True, text=True, cwd=src,
                   env={**os.environ, "PIP_NO_INPUT": "1"})
    assert (target / "ellava_lib" / "data" / "manifests" / "scienceqa.yaml").is_file()
    assert (target / "ellava_lib" / "speed" / "csrc" / "bitmask.cpp").is_file()  # the kernel source ships
    assert not (target / "ellava_lib" / "__editable__").exists()
    return target


def run_installed(site: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python args`` with only the installed copy of ellava_lib importable (not the checkout)."""
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    env.pop("ELLAVA_ROOT", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_installed_package_is_the_one_imported(installed: Path, tmp_path: Path) -> None:
    out = run_installed(installed, ["-c", "import ellava_lib; print(ellava_lib.__file__)"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(installed)


def test_installed_eval_on_real_data(installed: Path, micro_model_dir: Path, tmp_path: Path) -> None:
    data_root = write_benchmark_tree(tmp_path / "real", n=3, n_train=8)
    out = tmp_path / "eval"
    res = run_installed(installed, ["-m", "ellava_lib.cli", "eval", "--model", str(micro_model_dir), "--data", "real",
                                    "--data-dir", str(data_root), "--limit", "2", "--out", str(out), "--quiet"],
                        tmp_path)
    assert res.returncode == 0, res.stderr
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["suite"]) == {"sqa", "vizwiz", "mmvet", "llavabench"}


def _project(root: Path) -> Path:
    """A minimal project folder: one notebook that records which ellava_lib it ran and where, one profile."""
    (root / "notebooks").mkdir(parents=True)
    (root / "profiles").mkdir()
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('run_dir: str = ""\nlabel: str = "none"')
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "import json, os\nfrom pathlib import Path\nimport ellava_lib\n"
        "from ellava_lib.data.manifest import MANIFEST_DIR\n"
        "Path(run_dir).mkdir(parents=True, exist_ok=True)\n"
        "(Path(run_dir) / 'where.json').write_text(json.dumps({'lib': ellava_lib.__file__, 'cwd': os.getcwd(), "
        "'label': label, 'manifests': sorted(p.name for p in MANIFEST_DIR.glob('*.yaml'))}))")
    nb.cells = [params, body]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "notebooks" / "01_where.ipynb")
    (root / "profiles" / "check.yaml").write_text("label: from-profile\n")
    return root


def test_installed_pipeline_needs_and_uses_an_explicit_root(installed: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # no root: a one-line error naming --root, exit 2, nothing written
    res = run_installed(installed, ["-m", "ellava_lib.run.pipeline", "--profile", "check"], elsewhere)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "--root" in res.stderr
    assert list(elsewhere.iterdir()) == []
    # an explicit root: its notebooks run with it as working directory, on the installed package
    root = _project(tmp_path / "project")
    res = run_installed(installed, ["-m", "ellava_lib.run.pipeline", "--root", str(root), "--profile", "check"],
                        elsewhere)
    assert res.returncode == 0, res.stderr
    where = json.loads((root / "runs" / "check" / "where.json").read_text())
    assert Path(where["lib"]).is_relative_to(installed)
    assert Path(where["cwd"]) == root.resolve()
    assert where["label"] == "from-profile"
    assert where["manifests"] == ["llavabench.yaml", "mmvet.yaml", "scienceqa.yaml", "vizwiz.yaml"]
    assert (root / "runs" / "check" / "notebooks" / "01_where.ipynb").is_file()
