"""The tier interface: the paper setting's code paths (real data, real calibration, GPT judge, device checks)
run here on the micro model and parquet fixtures in the upstream schemas; nothing reaches the network."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from real_fixtures import write_benchmark_tree

from ellava_lib.cli import main as cli_main
from ellava_lib.data.manifest import load_manifest
from ellava_lib.data.real import rank_rows
from ellava_lib.eval.gpt_judge import GPTJudge, JudgeError
from ellava_lib.eval.judge import LocalJudge
from ellava_lib.model import losses
from ellava_lib.run import pipeline
from ellava_lib.run.jobs import Job, SweepSpec, spec_digest
from ellava_lib.run.sweep import run_sweep
from ellava_lib.run.tier import (
    Tier,
    calibration_samples,
    check_device,
    encode_calibration,
    eval_config,
    make_judge,
)

pytestmark = pytest.mark.usefixtures("no_network")

N_TRAIN = 24  # ScienceQA-IMG train rows of the fixture; row 1 has an undecodable image


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_benchmark_tree(tmp_path_factory.mktemp("real"), n=6, n_train=N_TRAIN)


def real(data_root: Path, **kw) -> Tier:
    return Tier(data="real", data_dir=str(data_root), **kw)


def test_tier_round_trip_and_bad_values() -> None:
    t = Tier(model="llava-1.5-7b", data="real", data_dir="/data", judge="gpt", device="cuda", dtype="float16")
    assert Tier.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    assert Tier.from_dict({}) == Tier() and Tier().is_default and not t.is_default
    with pytest.raises(ValueError, match="unknown tier keys \\['modle'\\]"):
        Tier.from_dict({"modle": "tiny"})
    for bad, match in [({"data": "web"}, "data must be one of"), ({"judge": "human"}, "judge must be one of"),
                       ({"dtype": "int8"}, "dtype must be one of"), ({"data_dir": "/x"}, "only used with data: real"),
                       ({"calib_benchmarks": ["imagenet"]}, "calib_benchmarks")]:
        with pytest.raises(ValueError, match=match):
            Tier.from_dict(bad)


def test_cuda_tier_fails_early_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda' is not available"):
        check_device(Tier(device="cuda"))
    check_device(Tier())  # the CPU is always there
    params = pipeline.load_profile("paper")
    with pytest.raises(ValueError, match="not available"):
        pipeline.preflight(params)
    with pytest.raises(ValueError, match="unknown device profile"):
        pipeline.preflight({"gpu": "tpu-v9"})


def test_paper_profile_matches_the_notebooks(tmp_path: Path) -> None:
    """Every value of the paper profile has the type its notebook declares; its tier is the paper setting."""
    params = pipeline.load_profile("paper")
    tier = Tier.from_dict(params["tier"])
    assert (tier.model, tier.data, tier.judge, tier.device) == ("llava-1.5-7b", "real", "gpt", "cuda")
    declared: set[str] = set()
    for nb in sorted(pipeline.notebooks_dir().glob("[0-9][0-9]_*.ipynb")):
        declared |= set(pipeline.notebook_parameters(nb, params, tmp_path)) - {"run_dir"}
    assert set(params) - set(pipeline.PIPELINE_KEYS) <= declared  # no key silently ignored


def test_default_tier_keeps_sweep_digests(micro_model_dir: Path, data_root: Path) -> None:
    job = Job("sparsegpt", 0.5, 0, 8)
    plain = SweepSpec(str(micro_model_dir), 8)
    assert spec_digest(SweepSpec(str(micro_model_dir), 8, tier=Tier().to_dict()), job) == spec_digest(plain, job)
    real_spec = SweepSpec(str(micro_model_dir), 8, tier=real(data_root).to_dict())
    assert spec_digest(real_spec, job) != spec_digest(plain, job)


def test_real_calibration_comes_from_the_training_split(data_root: Path) -> None:
    tier = real(data_root)
    seed = next(s for s in range(200) if 1 in rank_rows(N_TRAIN, s)[:6])  # the corrupt row is drawn
    samples = calibration_samples(tier, 6, seed)
    expected = sorted([i for i in rank_rows(N_TRAIN, seed) if i != 1][:6])
    assert [s.id for s in samples] == [f"sqa-train-{i:05d}" for i in expected]  # the corrupt row is replaced
    assert all(s.split == "train" and s.answer in "ABC" for s in samples)
    assert [s.id for s in calibration_samples(tier, 6, seed)] == [s.id for s in samples]  # deterministic
    assert [s.id for s in calibration_samples(tier, 6, seed + 1)] != [s.id for s in samples]
    with pytest.raises(ValueError, match="exceed"):
        calibration_samples(tier, N_TRAIN + 1, 0)


def test_processor_encoding_labels_the_answer_tokens(micro_model, data_root: Path) -> None:
    model, proc = micro_model
    tier = real(data_root)
    samples = calibration_samples(tier, 4, 0)
    batch = encode_calibration(tier, samples, proc)
    tok = proc.tokenizer
    assert batch["pixel_values"].shape[0] == 4 and batch["input_ids"].shape == batch["labels"].shape
    for row, s in enumerate(samples):
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labelled == tok(s.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row][n - len(labelled): n].tolist() == labelled  # the answer ends the row
    loss = losses.calibration_loss(model, batch)
    assert torch.isfinite(torch.tensor(loss))


def test_real_tier_sweep_jobs(micro_model_dir: Path, data_root: Path, tmp_path: Path) -> None:
    """A baseline and the full method (level database on real calibration, search, projector evolution),
    evaluated on the four real fixture benchmarks."""
    tier = real(data_root)
    spec = SweepSpec(str(micro_model_dir), 4, search={"population": 3, "generations": 2, "offspring": 3,
                                                      "screen_samples": 0, "survivors": 2, "loss_kind": "ce",
                                                      "init": ["uniform"]},
                     ellava={"gap": "bernstein", "projector_every": 1, "projector_steps": 2},
                     tier=tier.to_dict())
    jobs = [Job("sparsegpt", 0.5, 0, 6), Job("ellava", 0.5, 0, 6)]
    rows = run_sweep(spec, jobs, tmp_path / "sweep", progress=False)
    assert list(rows["job"]) == [j.name() for j in jobs]
    for job in jobs:
        job_dir = tmp_path / "sweep" / "jobs" / job.name()
        record = json.loads((job_dir / "test" / "eval.json").read_text())
        assert set(record["data"]) == {"sqa", "vizwiz", "mmvet", "llavabench"}
        assert all(d["source"].startswith("local:") for d in record["data"].values())
        preds = pd.read_json(job_dir / "test" / "predictions.jsonl", lines=True)
        assert "sqa-test-00000" in set(preds["id"]) and "VizWiz_val_00000000.jpg" in set(preds["id"])
        assert len(preds) == 16  # 4 items of each benchmark
    db_config = json.loads(next((tmp_path / "sweep" / "leveldb").rglob("config.json")).read_text())
    assert all(i.startswith("sqa-train-") for i in db_config["calibration"]["ids"])
    assert rows["calib_mean"].notna().all()


def test_eval_and_prune_cli_on_real_data(micro_model_dir: Path, data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert cli_main(["eval", "--model", str(micro_model_dir), "--data", "real", "--data-dir", str(data_root),
                     "--limit", "3", "--out", str(out), "--quiet"]) == 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["suite"]) == {"sqa", "vizwiz", "mmvet", "llavabench"}
    assert (metrics[metrics["metric"] == "overall"]["n"] == 3).all()
    pruned = tmp_path / "pruned"
    assert cli_main(["prune", "--model", str(micro_model_dir), "--method", "wanda", "--sparsity", "0.5",
                     "--calib", "4", "--data", "real", "--data-dir", str(data_root), "--out", str(pruned),
                     "--quiet"]) == 0
    meta = json.loads((pruned / "ellava.json").read_text())
    assert meta["calibration"]["data"] == "real"
    assert all(i.startswith("sqa-train-") for i in meta["calibration"]["ids"])
    # synthetic-only options are still checked, and a real-data error is one line, exit 2
    assert cli_main(["eval", "--model", str(micro_model_dir), "--data", "real", "--data-dir", str(tmp_path / "none"),
                     "--limit", "3", "--out", str(tmp_path / "e2"), "--quiet"]) == 2


def test_judge_of_a_tier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(make_judge(Tier(), tmp_path), LocalJudge)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(JudgeError, match="no API key"):
        make_judge(Tier(judge="gpt"), tmp_path)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("ELLAVA_JUDGE_MODEL", "judge-x")
    judge = make_judge(Tier(judge="gpt"), tmp_path)
    assert isinstance(judge, GPTJudge) and judge.name == "judge-x"


def test_eval_config_limits(data_root: Path) -> None:
    assert eval_config(Tier(), 0).limit is None and eval_config(Tier(), 7).limit == 7
    cfg = eval_config(real(data_root), 2)
    assert (cfg.data, cfg.data_dir) == ("real", str(data_root))


def test_notebooks_run_on_the_real_tier(micro_model_dir: Path, data_root: Path, tmp_path: Path) -> None:
    """Notebooks 01-04 under the ci profile with a real-data tier (micro model folder, fixture benchmarks):
    the run folder records the tier and every table comes from the real data."""
    tier = real(data_root, model=str(micro_model_dir))
    nbs = sorted(pipeline.notebooks_dir().glob("0[1-4]_*.ipynb"))
    run_dir = pipeline.run_pipeline("ci", tmp_path, nbs, overrides={
        "tier": tier.to_dict(), "eval_limit": 3, "sweep_eval_limit": 3, "calib_n": 6, "n_show": 2,
        "search": {"population": 3, "generations": 2, "offspring": 3, "screen_samples": 0, "survivors": 2,
                   "loss_kind": "ce", "init": ["uniform"]},
        "ellava": {"gap": "bernstein", "projector_every": 1, "projector_steps": 2}})
    model_info = json.loads((run_dir / "model.json").read_text())
    assert Tier.from_dict(model_info["tier"]) == tier and model_info["model_dir"] == str(micro_model_dir)
    calib = json.loads((run_dir / "calibration.json").read_text())
    assert calib["data"] == "real" and all(i.startswith("sqa-train-") for i in calib["ids"])
    run_manifest = load_manifest(run_dir / "data_manifests" / "scienceqa.yaml")  # still a valid manifest
    drawn = yaml.safe_load((run_dir / "data_manifests" / "scienceqa.yaml").read_text())["calibration_drawn"]
    assert run_manifest.name == "scienceqa" and drawn["ids"] == calib["ids"] and drawn["split"] == "train"
    assert drawn["source"] == [f"local:{data_root / 'scienceqa'}"]
    dense = pd.read_csv(run_dir / "tables" / "dense.csv")
    assert len(dense) == 3  # dense, magnitude 50 %, magnitude 70 %
    eval_record = json.loads((run_dir / "eval" / "dense" / "eval.json").read_text())
    assert eval_record["data"]["mmvet"]["samples"] == 3
    assert (run_dir / "tables" / "search_showcase.csv").is_file()


def test_model_record_of_a_hub_model_needs_no_download(tmp_path: Path) -> None:
    """The paper tier's model.json: the 7B's size from the shipped config on the meta device, no weights."""
    from ellava_lib.model.loading import ModelLoadError
    from ellava_lib.run.tier import model_record

    tier = Tier(model="llava-1.5-7b", data="real", judge="gpt", device="cuda", dtype="float16")
    record = model_record(tier)
    assert record["model_dir"] == "llava-1.5-7b" and Tier.from_dict(record["tier"]) == tier
    assert 7.0e9 < record["params"] < 7.1e9  # LLaVA-1.5-7B: 7.06 B parameters
    with pytest.raises(ModelLoadError, match="neither"):
        model_record(Tier(model=str(tmp_path / "missing")))


def test_real_splits_are_loaded_once_per_process(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every sweep job evaluates on the same items: the split is read and decoded once, and callers get
    their own list."""
    from ellava_lib.data import real as real_data
    from ellava_lib.eval import evaluate

    calls = []
    real_load = real_data.load_real_suite
    monkeypatch.setattr(real_data, "load_real_suite", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    evaluate._real_split.cache_clear()
    cfg = eval_config(real(data_root), 5)
    first = evaluate.load_samples(cfg, "mmvet")
    first.pop()
    again = evaluate.load_samples(cfg, "mmvet")
    assert len(calls) == 1 and len(again) == 5 and [s.id for s in again[:4]] == [s.id for s in first]
    evaluate.load_samples(eval_config(real(data_root), 4), "mmvet")  # another size is another split
    assert len(calls) == 2


def test_ecoflap_batch_is_part_of_the_tier_identity_only_when_set():
    assert "ecoflap_batch" not in Tier().to_dict() and "ecoflap_batch" not in Tier().identity()
    eight = Tier(ecoflap_batch=8)
    assert eight.to_dict()["ecoflap_batch"] == 8 and eight.identity()["ecoflap_batch"] == 8
    assert Tier.from_dict(eight.to_dict()) == eight
    with pytest.raises(ValueError, match="ecoflap_batch must be >= 1"):
        Tier(ecoflap_batch=0)
