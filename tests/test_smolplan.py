"""``ellava plan --profile smol`` (run/smolplan.py): the jobs are the notebooks' own, the build's FLOPs and step
time on hand-computed cases, the total is the sum of the parts, the README block is a fresh plan, bad input is
one line and exit 2. CPU only, nothing downloaded (the smol config is built from SmolLM2's shape)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from ellava_lib import cli
from ellava_lib.model import smol, structure
from ellava_lib.run import plan, report, smolplan, sweep
from ellava_lib.speed import costmodel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smol_plan():
    return smolplan.make_plan("smol")


@pytest.fixture(scope="module")
def params():
    return plan.profile_params("smol")


def _spec(params):
    """The SweepSpec notebooks 04-06 build (their first code cell) for the profile's parameters."""
    return sweep.SweepSpec("model", params["sweep_eval_limit"] or None, search_preset=params["search_preset"],
                           search=params["search"], ellava=params["ellava"], tier=params.get("tier", {}))


def test_jobs_are_the_notebooks_jobs(smol_plan, params):
    """04 runs one ellava job, 05 jobs_grid, 06 ablation_jobs, all in one sweep folder (a shared job runs once)."""
    spec = _spec(params)
    nb04 = [sweep.Job("ellava", params["sparsity"], params["seed"], params["calib_n"])]
    nb05 = sweep.jobs_grid(params["table_methods"], params["sparsities"], params["seeds"], params["calib_n"])
    nb06 = sweep.ablation_jobs(spec, params["sparsity"], params["seed"], params["calib_n"], params["gaps"],
                               params["calib_ns"])
    names = {j.name() for j in nb04 + nb05 + nb06}
    assert len(nb05) == len(params["seeds"]) * (1 + (len(params["table_methods"]) - 1) * len(params["sparsities"]))
    assert {j.name() for j in smolplan.profile_jobs(params, spec)} == names
    assert smol_plan.overrides["jobs"] == len(names) > len(nb05)
    stages = {s.name: s for s in smol_plan.stages}
    assert stages["sweep eval (test + calib)"].runs == len(names)
    pruned = sum(s.runs for n, s in stages.items() if n.startswith("prune: "))
    assert pruned + sum(j.method == "dense" for j in nb05) == len(names)
    searched = [j for j in nb04 + nb05 + nb06 if j.method in sweep.SEARCH_METHODS]
    assert stages["level databases"].runs == len({(j.seed, j.calib_n) for j in searched})
    assert stages["02 dense + magnitude eval"].runs == 1 + len(params["magnitude_sparsities"])


def test_train_flops_by_hand():
    # 6 * 10 * 3 (trained) + 2 * 5 * 2 (frozen before) + 4 * 7 * 4 (frozen after: backward to its inputs)
    assert smolplan.train_flops(((10, 3, "trained"), (5, 2, "frozen_before"), (7, 4, "frozen_after"))) == 312.0
    stage = smolplan.TrainStage("t", 5, ((10, 3, "trained"), (5, 2, "frozen_before")), layers=2)
    compute = costmodel.DeviceProfile("c", matmul_flops=100.0, solver_flops=1.0, mem_bandwidth=1e12, mem_bytes=1.0,
                                      link_bandwidth=1.0, op_latency_s=0.0, efficiency=0.5)
    # compute-bound: 200 FLOPs at 50 FLOP/s, plus AdamW's 28 bytes per trained parameter at 0.5e12 B/s
    assert stage.step_seconds(compute) == pytest.approx(200 / 50 + 28 * 10 / 0.5e12)
    issue = replace(compute, matmul_flops=1e15, op_latency_s=1e-3)
    # issue-bound: forward + backward = 3 passes of (40 kernels x 2 layers + 20) at 1 ms
    assert stage.step_seconds(issue) == pytest.approx(3 * (40 * 2 + 20) * 1e-3 + 28 * 10 / 0.5e12)


def test_smol_build_stages_have_smollm2_sizes():
    from ellava_lib.model import train

    config = smol.llava_config()

    tc = train.preset("smol")
    stages = {s.name: s for s in smolplan.build_stages(config, tc)}
    lm, tokens, role = stages["joint"].parts[0]
    # SmolLM2-135M (tied embeddings once) plus the <image> row of 576; 16 rows of 96 tokens; frozen under LoRA
    assert (lm, tokens, role) == (134_515_008 + 576, 16 * 96, "frozen_after")
    # rank 16 x 30 layers x (q 576+576, k 576+192, v 576+192, o 576+576, gate/up 576+1536 twice, down 1536+576)
    assert stages["joint"].parts[1] == (16 * 30 * 10_176, 16 * 96, "trained") and 16 * 30 * 10_176 == 4_884_480
    assert stages["joint"].parts[-1][2] == "frozen_after"  # the tied embedding of the aux logits
    assert structure.meta_model(config).model.language_model.layers[0].self_attn.k_proj.out_features == 192
    assert stages["vision"].steps == 300 and stages["align"].steps == 300 and stages["joint"].steps == 1200
    assert [r for _, _, r in stages["align"].parts] == ["frozen_before", "trained", "frozen_after"]


def test_total_is_the_sum_of_the_parts(smol_plan, params):
    """Build + 02 + level databases + importances + every job's own time, computed job by job."""
    from ellava_lib.model import train

    ctx, _ = smolplan.context(params)
    spec = _spec(params)
    jobs = smolplan.profile_jobs(params, spec)
    build = sum(s.steps * s.step_seconds(ctx.train_prof) for s in smolplan.build_stages(ctx.config,
                                                                                         train.preset("smol")))
    dense = (smolplan.eval_seconds(ctx, params["eval_limit"])
             + len(params["magnitude_sparsities"]) * smolplan.eval_seconds(ctx, params["eval_limit"], to_budget=True))
    by_name = {s.name: s for s in smol_plan.stages}
    shared = sum(by_name[n].seconds * by_name[n].runs for n in ("level databases", "ECoFLaP importances"))
    each = sum(smolplan.job_seconds(ctx, spec, j, params["sweep_eval_limit"]) for j in jobs)
    assert smolplan.total_seconds(smol_plan) == pytest.approx(build + dense + shared + each, rel=1e-9)
    assert by_name["ECoFLaP importances"].runs == len({(j.seed, j.calib_n) for j in jobs
                                                       if sweep.needs_importance(spec, j)})
    assert all(s.seconds >= 0 and s.fits for s in smol_plan.stages)


def test_issue_floor_bounds_decode():
    """A decode step of the 135M model is bound by issuing its kernels, not by reading its weights."""
    ctx, _ = smolplan.context(plan.profile_params("smol"))
    weights = ctx.dm.params * ctx.dtype_bytes / ctx.prof.eff(ctx.prof.mem_bandwidth)
    assert ctx.floor == pytest.approx((40 * 30 + 20) * ctx.prof.op_latency_s) and ctx.floor > 10 * weights
    slow = replace(ctx, prof=replace(ctx.prof, op_latency_s=2 * ctx.prof.op_latency_s))
    # 64 items per suite = 2 batches of 32; every forward waits on the host, the 32 x 40.9-token prefill too (0.28
    # TFLOP: 8.5 ms at half the H100's FP32 rate, under the 9.76 ms floor): doubling the latency adds one floor per
    # generated token, 2 + 2 + 2.19 + 22.75 = 28.94 a batch set (the prefill makes the first of each batch)
    added = smolplan.eval_seconds(slow, 64) - smolplan.eval_seconds(ctx, 64)
    assert sum(smolplan.GENERATED_TOKENS.values()) == pytest.approx(28.94)
    assert ctx.eval_batch == 32 and added == pytest.approx(2 * 28.94 * ctx.floor)


def test_readme_smol_plan_is_a_fresh_plan(smol_plan):
    """The smol-plan block (in docs/tiers.md, wherever report.doc_with finds it) is a fresh plan."""
    text = report.doc_with(ROOT, smolplan.README_MARKER).read_text()
    assert report.splice(text, smolplan.README_MARKER, smolplan.markdown(smol_plan)) == text


def test_smol_plan_cli(capsys, tmp_path):
    assert cli.main(["plan", "--profile", "smol", "--gpu", "a100", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["device"] == "a100" and got["target_seconds"] == 1200
    assert got["total_seconds"] == pytest.approx(sum(s["seconds"] * s["runs"] for s in got["stages"]))
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- smol-plan:start -->\nold\n<!-- smol-plan:end -->\nb\n")
    assert cli.main(["plan", "--profile", "smol", "--readme", str(readme)]) == 0
    assert "| build: joint |" in readme.read_text() and "old" not in readme.read_text()
    for bad in (["--profile", "nope"], ["--profile", "smol", "--gpu", "tpu"], ["--profile", "paper", "--gpu", "x"],
                ["--profile", "smol", "--gpu-mem", "0"]):
        capsys.readouterr()
        assert cli.main(["plan", *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ellava: error:") and err.count("\n") == 1, err


def test_llava_config_is_the_config_of_a_built_smol_llava():
    """smol.llava_config (no GGUF needed) describes what init_smol_model builds, checked on the micro Llama."""
    from ellava_lib.model.tiny import TinyConfig

    lm, tok = smol.micro_llama(0)
    shape = smol.LlamaShape(params=lm.num_parameters(), layers=2, hidden=48, mlp=96, heads=3,
                            vocab=lm.config.vocab_size, kv_heads=1)
    config = smol.llava_config(shape, TinyConfig.micro())
    built = smol.init_smol_model(lm, smol.smol_processor(tok).tokenizer, TinyConfig.micro())
    assert config.image_token_id == built.config.image_token_id
    assert structure.meta_model(config).num_parameters() == built.num_parameters()
    dims, real = smolplan.memory.Dims.of(config), smolplan.memory.Dims.of(built.config)
    assert dims == real
