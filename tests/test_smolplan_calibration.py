"""``ellava plan --profile smol --gpu cpu-2core`` against what the smol profile measured on the 2-core machine
(``benchmarks/results/smol_stages_cpu.json``, written by ``benchmarks/smol_stages.py`` from the runs' artifacts):
every measured stage predicted within 2x for the configuration it was measured in; the plan's constants and its
search accounting are the measurement's. Arithmetic only: nothing is run or timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ellava_lib.run import plan, report, smolplan, smolplan_calibration
from ellava_lib.run.jobs import Job, SweepSpec, search_config
from ellava_lib.search.evolve import stage_plan
from ellava_lib.speed import costmodel, memory

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "smol_stages_cpu.json"
MEASURED = json.loads(RESULTS.read_text())
#: The stages the record measured (an unmeasured one says why in its ``source``).
STAGES = [name for name, stage in MEASURED["stages"].items() if stage["seconds"] is not None]
#: The tolerance: the plan is a first-order model, "about 2x either way".
FACTOR = 2.0


@pytest.fixture(scope="module")
def params():
    return plan.profile_params("smol")


@pytest.fixture(scope="module")
def ctx(params):
    return smolplan.context(params, "cpu-2core")[0]


def _spec(params) -> SweepSpec:
    """The sweep spec of the profile, the searches starting from the measured search's start policies."""
    return SweepSpec("model", params["sweep_eval_limit"], search_preset=params["search_preset"],
                     search={**params["search"], "init": MEASURED["searches"]["init"]}, ellava=params["ellava"],
                     tier=params.get("tier", {}))


@pytest.fixture(scope="module")
def predicted():
    return smolplan_calibration.calibration_predictions(MEASURED)


def test_the_record_names_its_machine_and_sources():
    m = MEASURED["machine"]
    assert m["cores"] == 2 and m["torch"].startswith("2.13") and "EPYC" in m["cpu"]
    assert all(stage["source"] for stage in MEASURED["stages"].values())
    assert {"build", "level databases", "prune: ellava", "prune: search", "sweep eval (test + calib)"} <= set(STAGES)


def test_the_measured_configuration_is_the_plans(params, ctx):
    """The level database was built on the draw's statistic rows (64 less 16 selection rows), the evaluations ran
    the profile's items per suite, the search extrapolates to the preset's generations."""
    spec = _spec(params)
    assert smolplan.stat_rows(spec, 64) == MEASURED["stages"]["level databases"]["rows"] == 48
    assert MEASURED["stages"]["sweep eval (test + calib)"]["items_per_suite"] == params["sweep_eval_limit"] == 200
    assert set(MEASURED["stages"]["02 dense + magnitude eval"]["items_per_suite"].values()) == {params["eval_limit"]}
    assert MEASURED["searches"]["preset_generations"] == 32
    assert ctx.text_tokens == 77 - 9 and ctx.mean_text_tokens == pytest.approx(46.6 - 9)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_within_2x_of_the_measurement(predicted, stage):
    measured = MEASURED["stages"][stage]["seconds"]
    assert measured / FACTOR <= predicted[stage] <= measured * FACTOR, (stage, predicted[stage], measured)


def test_the_predictions_are_the_plans(params, ctx, predicted):
    """The calibrated numbers are the plan's own: the 64-row jobs' stages of `ellava plan --gpu cpu-2core`."""
    p = smolplan.make_plan("smol", "cpu-2core")
    stages = {s.name: s for s in p.stages}
    # the stage is the mean over every job, whose calibration scores differ by their selection rows (4 to 32)
    assert predicted["sweep eval (test + calib)"] == pytest.approx(stages["sweep eval (test + calib)"].seconds,
                                                                   rel=1e-3)
    for method in ("sparsegpt", "wanda", "owl", "llm_pruner"):  # every job of these is a 64-row draw
        assert predicted[f"prune: {method}"] == pytest.approx(stages[f"prune: {method}"].seconds)
    assert predicted["02 dense + magnitude eval"] == pytest.approx(stages["02 dense + magnitude eval"].seconds)
    assert sum(predicted[k] for k in predicted if k != "build") > 0 and p.device == "cpu-2core"


def test_docs_calibration_block_is_fresh():
    """The smol-cpu-plan block (docs/tiers.md) is the table of this record and the current plan
    (``python benchmarks/smol_stages.py --readme README.md``, or ``--splice-only``)."""
    text = report.doc_with(ROOT, smolplan.CALIBRATION_MARKER).read_text()
    p = smolplan.make_plan("smol", "cpu-2core")
    cal = smolplan_calibration
    body = cal.calibration_markdown(MEASURED, p, cal.calibration_predictions(MEASURED))
    assert report.splice(text, smolplan.CALIBRATION_MARKER, body) == text


def test_answer_constants_are_the_measured_answers():
    """GENERATED_TOKENS and ANSWER_TOKENS are the record's (the dense evaluation's full test split)."""
    answers = MEASURED["eval"]["answers"]
    assert smolplan.GENERATED_TOKENS == pytest.approx(answers["generated_answers"], abs=0.01)
    assert smolplan.ANSWER_TOKENS == pytest.approx(answers["answer_words_mean"], abs=0.05)
    # 02's 70% magnitude model never ends an answer: its batches generate the budget
    assert {s: v["generated_predictions"] for s, v in answers["magnitude-0.70"].items()} == \
        {"sqa": 4, "vizwiz": 6, "mmvet": 8, "llavabench": 64}
    # by hand: 46.6 tokens a row, less 9 image tokens, 4.7 answer words and the end-of-sequence token
    assert smolplan.context(plan.profile_params("smol"), "cpu-2core")[0].prompt_tokens == pytest.approx(31.9)


def test_search_accounting_is_the_measured_history(params):
    """The plan's scoring rows per part of a search are the measured search's history rows: the initial 8 on the
    24 scoring rows, lambda's choice on the 16 selection rows, each generation's 16 children on 8 rows, 6 on 16,
    2 on 24 (272 rows, 24 evaluations), 2 elites on 24 after a projector round, 10 finalists on 16 rows."""
    parts = MEASURED["searches"]["parts"]
    cfg = search_config(_spec(params), Job("ellava", 0.6, 0, 64))
    rows = plan.row_counts(64, cfg)
    assert rows == {"selection": 16, "scoring": 24, "projector": 24, "train": 18, "holdout": 6}
    stages = stage_plan(cfg.offspring, rows["scoring"], cfg.screen_samples, cfg.survivors)
    assert stages == [(8, 16), (16, 6), (24, 2)]
    assert parts["generation"] == {"rows": sum(r * e for r, e in stages), "evaluations": 24} and \
        parts["generation"]["rows"] == 8 * 16 + 16 * 6 + 24 * 2 == 272
    assert parts["init"] == {"rows": cfg.population * rows["scoring"], "evaluations": cfg.population}
    assert parts["lambda"] == {"rows": cfg.population * rows["selection"], "evaluations": cfg.population}
    assert parts["elites"] == {"rows": cfg.elitism * rows["scoring"], "evaluations": cfg.elitism}
    finalists = cfg.population + len(cfg.init)
    assert parts["select"] == {"rows": finalists * rows["selection"], "evaluations": finalists} and finalists == 10
    assert MEASURED["searches"]["reproduces_measured_search_s"] == pytest.approx(MEASURED["searches"]["search_s"])


def test_column_updates_and_kv_passes_by_hand(ctx):
    """The level database's in-block updates: SmolLM2's 30 layers hold 30 x 3,538,944 = 106,168,320 prunable
    weights; one level moves 16 bytes x (128 + 1) / 2 per weight, at 9 GB/s. A decode step's KV passes: SmolLM2
    (9 queries on 3 key/value heads) 3 + 2 x 3 = 9; llava-1.5-7b (no grouping) 3."""
    db = costmodel.estimate_level_db(ctx.config, ctx.plain_prof, 1, 48, n_visual_tokens=9, n_text_tokens=68)
    assert db.detail["column_updates"] == pytest.approx(106_168_320 * 16 * 129 / 2 / 9e9)
    assert db.detail["column_steps"] == pytest.approx(30 * (6 * 576 + 1536) * 25 * 2e-6)
    from ellava_lib.model import structure

    assert plan.kv_passes(ctx.dm) == 9
    assert plan.kv_passes(memory.Dims.of(structure.load_config("llava-1.5-7b"))) == 3


def test_cpu_preset_rates():
    """cpu-2core: bf16 (the build's autocast) 280, oneDNN fp32 150 and plain sgemm 110 GFLOP/s; the GPUs' fp32
    forward is their FP32 GEMM."""
    cpu, h100 = costmodel.get_profile("cpu-2core"), costmodel.get_profile("h100")
    assert (cpu.matmul_flops, cpu.fp32_forward(), cpu.solver_flops) == (280e9, 150e9, 110e9)
    assert h100.fp32_forward() == h100.solver_flops == 67e12


def test_the_importance_stage_is_read_from_the_ledger_and_updated_alone(tmp_path):
    """``smol_stages.py --update "ECoFLaP importances"``: the median ``seconds`` of the ledger's timed importance
    entries replaces that stage only; an untimed entry (null seconds) is left out."""
    from helpers import load_benchmark

    stages = load_benchmark("smol_stages")
    book = tmp_path / "ledger"
    (book / "ecoflap").mkdir(parents=True)
    for key, secs in (("s0-n64", 2400.0), ("s1-n64", 2100.0), ("s2-n64", 3000.0), ("s3-n64", None)):
        (book / "ecoflap" / f"{key}.json").write_text(json.dumps({"key": key, "seconds": secs, "commit": "c"}))
    out = tmp_path / "stages.json"
    out.write_text(json.dumps({"stages": {"build": {"seconds": 4600.0, "source": "kept"},
                                          "ECoFLaP importances": {"seconds": None, "source": "none"}}}))
    assert stages.main(["--ledger", str(book), "--out", str(out), "--update", "ECoFLaP importances"]) == 0
    record = json.loads(out.read_text())
    assert record["stages"]["build"] == {"seconds": 4600.0, "source": "kept"}
    got = record["stages"]["ECoFLaP importances"]
    assert got["seconds"] == 2400.0
    assert (got["entries_min"], got["entries_max"], got["entries_n"]) == (2100.0, 3000.0, 3)
    assert [e["key"] for e in got["entries"]] == ["s0-n64", "s1-n64", "s2-n64"]
    # the caption names the machine of a stage measured later, beside the record's own
    later = {**MEASURED, "updated": [{"stages": ["ECoFLaP importances"], "machine": {"cpu": "Some CPU", "cores": 2}}]}
    cal = smolplan_calibration
    body = cal.calibration_markdown(later, smolplan.make_plan("smol", "cpu-2core"), cal.calibration_predictions(later))
    assert "; ECoFLaP importances on Some CPU, 2 cores)" in body
    (book / "ecoflap").rename(book / "gone")
    assert stages.importance_stage(book)["seconds"] is None
