from __future__ import annotations

import pandas as pd
import pytest

from ellava_lib import cli
from ellava_lib.core import files
from ellava_lib.core.schema import SUITES
from ellava_lib.eval import evaluate


def _eval(model_dir, out, *extra):
    return cli.main(["eval", "--model", str(model_dir), "--out", str(out), "--quiet", *extra])


def test_eval_cli_writes_metrics_and_predictions(micro_model_dir, tmp_path, capsys):
    assert _eval(micro_model_dir, tmp_path / "ev", "--limit", "3") == 0
    m = pd.read_csv(tmp_path / "ev" / "metrics.csv")
    assert list(m.columns[:4]) == ["suite", "metric", "score", "n"]
    overall = m[m.metric == "overall"].set_index("suite")
    assert sorted(overall.index) == sorted(SUITES)
    assert (overall["n"] == 3).all() and m["score"].between(0, 100).all()
    assert set(m.loc[m.suite == "mmvet", "judge"]) == {"local-v1"}
    preds = files.read_jsonl(tmp_path / "ev" / "predictions.jsonl")
    assert len(preds) == 12 and {"id", "suite", "prediction", "answer"} <= preds[0].keys()
    assert "mean" in capsys.readouterr().out


def test_eval_is_deterministic(micro_model, tmp_path):
    model, proc = micro_model
    cfg = evaluate.EvalConfig(suites=("sqa", "llavabench"), limit=4)
    a = evaluate.evaluate(model, proc, cfg, tmp_path / "a", progress=False)
    b = evaluate.evaluate(model, proc, cfg, tmp_path / "b", progress=False)
    pd.testing.assert_frame_equal(a, b)
    assert (tmp_path / "a" / "predictions.jsonl").read_text() == (tmp_path / "b" / "predictions.jsonl").read_text()


@pytest.mark.parametrize("args,needle", [
    (["--suite", "nope"], "unknown suite"),
    (["--split", "dev"], "invalid choice"),
    (["--limit", "0"], "positive integer"),
    (["--limit", "-3"], "positive integer"),
])
def test_bad_arguments_fail_with_one_line(micro_model_dir, tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        _eval(micro_model_dir, tmp_path / "out", *args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_model_folder_without_config(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    assert _eval(tmp_path / "m", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert "no config.json" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_corrupted_safetensors(micro_model_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(micro_model_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert _eval(bad, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert "corrupted weights" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_unwritable_output_folder(micro_model_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert _eval(micro_model_dir, blocker / "sub") == 2
    err = capsys.readouterr().err.strip()
    assert "cannot create output folder" in err and len(err.splitlines()) == 1


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.csv"
    files.write_text(target, "old\n")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        files.write_text(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_evaluation_restores_the_tokenizers_padding_side(micro_model, monkeypatch):
    """Generation pads on the left but hands the caller's tokenizer back with the padding side it had (also
    when generation fails), and the answers do not depend on the side the tokenizer started with."""
    from ellava_lib.data import synth

    model, proc = micro_model
    tok = proc.tokenizer
    items = synth.generate("sqa", "test", 3)
    start = tok.padding_side
    try:
        tok.padding_side = "left"
        from_left = evaluate.generate_answers(model, proc, items, 4, batch_size=2, progress=False)
        tok.padding_side = "right"
        from_right = evaluate.generate_answers(model, proc, items, 4, batch_size=2, progress=False)
        assert tok.padding_side == "right" and from_right == from_left
        frame, preds = evaluate.evaluate_samples(model, proc, {"sqa": items}, batch_size=2, progress=False)
        assert tok.padding_side == "right" and [p["prediction"] for p in preds] == from_left

        def boom(*a, **k):
            assert tok.padding_side == "left"
            raise RuntimeError("boom")

        monkeypatch.setattr(model, "generate", boom)
        with pytest.raises(RuntimeError, match="boom"):
            evaluate.generate_answers(model, proc, items, 4, progress=False)
        assert tok.padding_side == "right"
    finally:
        tok.padding_side = start
