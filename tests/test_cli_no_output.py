"""A failed command leaves no output folder behind: one line on stderr, exit status 2, no ``--out``."""

from __future__ import annotations

import pytest

from ellava_lib import cli
from tests.helpers import exit_code


def _check(capsys, out, argv, needle):
    assert exit_code(lambda: cli.main(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ellava: error:") and len(err.splitlines()) == 1, err
    assert needle in err, err
    assert not out.exists()


def test_eval_with_a_bad_data_dir_writes_nothing(micro_model_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    _check(capsys, out, ["eval", "--model", str(micro_model_dir), "--out", str(out), "--quiet", "--data", "real",
                         "--data-dir", str(tmp_path / "nowhere"), "--limit", "2"], "")


@pytest.mark.parametrize("args,needle", [
    (["--method", "nope"], "invalid choice"),
    (["--sparsity", "-0.5"], "--sparsity must be in [0, 1)"),
    (["--data", "real", "--data-dir", "NOWHERE"], ""),
])
def test_prune_with_bad_input_writes_nothing(micro_model_dir, tmp_path, capsys, args, needle):
    out = tmp_path / "pruned"
    args = [str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in args]
    argv = ["prune", "--model", str(micro_model_dir), "--out", str(out), "--quiet", "--calib", "4"]
    argv += args if "--sparsity" in args else ["--sparsity", "0.5", *args]
    _check(capsys, out, argv, needle)


@pytest.mark.parametrize("args,needle", [
    (["--screen", "1"], "screen_samples must be 0 (off) or >= 2"),
    (["--gap", "nope"], "invalid choice"),
    (["--data", "real", "--data-dir", "NOWHERE"], ""),
])
def test_search_with_bad_input_writes_nothing(micro_model_dir, tmp_path, capsys, args, needle):
    out = tmp_path / "run"
    args = [str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in args]
    _check(capsys, out, ["search", "--model", str(micro_model_dir), "--out", str(out), "--quiet", "--sparsity", "0.5",
                         "--calib", "4", "--preset", "ci", *args], needle)


def test_a_folder_the_command_did_not_create_is_kept(micro_model_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    out.mkdir()
    argv = ["eval", "--model", str(micro_model_dir), "--out", str(out), "--quiet", "--data", "real",
            "--data-dir", str(tmp_path / "nowhere"), "--limit", "2"]
    assert exit_code(lambda: cli.main(argv)) == 2
    capsys.readouterr()
    assert out.is_dir()
