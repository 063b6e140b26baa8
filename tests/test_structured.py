"""LLM-Pruner-style structured baseline: Taylor scores per attention group / channel, whole structures zeroed,
grouped-query attention by KV group, the budget met by the MLP channels, honest sparsity and FLOPs, and its wiring
(sweep policy and table rows, ``ellava prune --method llm_pruner``)."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
from transformers import LlamaForCausalLM

from ellava_lib import cli
from ellava_lib.core import units
from ellava_lib.core.policy import Policy, weighted_mean
from ellava_lib.data import calibration
from ellava_lib.model import smol, tiny
from ellava_lib.model.specs import load_model
from ellava_lib.prune import prune, structured
from ellava_lib.run import pipeline, sweep, tables
from ellava_lib.run.sweep import Job, SweepSpec
from ellava_lib.speed.flops import flop_ratio


def _heads(model):
    t = model.config.text_config
    return t.num_attention_heads, t.hidden_size // t.num_attention_heads, t.intermediate_size


def test_scores_are_the_summed_taylor_salience(micro_model, calib):
    model, _ = micro_model
    H, hd, F = _heads(model)
    scores = structured.taylor_scores(model, calib)
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind
    layer = units.lm_layers(model)[0]
    # the same loss, by hand: |w * g| summed over head 0's q/k/v rows and o columns, channel 0's gate/up/down
    ws = [layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight,
          layer.self_attn.o_proj.weight, layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight,
          layer.mlp.down_proj.weight]
    for w in ws:
        w.requires_grad_(True)
    model.eval()
    loss = model(**{k: calib[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in calib},
                 labels=calib["labels"], use_cache=False).loss
    g = torch.autograd.grad(loss, ws)
    for w in ws:
        w.requires_grad_(False)
    s = [(w.detach() * gw).abs() for w, gw in zip(ws, g)]
    head0 = s[0][:hd].sum() + s[1][:hd].sum() + s[2][:hd].sum() + s[3][:, :hd].sum()
    chan0 = s[4][0].sum() + s[5][0].sum() + s[6][:, 0].sum()
    assert scores["lm.0.attn"].shape == (H,) and scores["lm.0.mlp"].shape == (F,)
    assert float(scores["lm.0.attn"][0]) == pytest.approx(float(head0), rel=1e-4)
    assert float(scores["lm.0.mlp"][0]) == pytest.approx(float(chan0), rel=1e-4)


def test_prune_zeroes_whole_lowest_structures_and_reports_honestly(micro_model_dir, calib):
    model, _ = load_model(micro_model_dir)
    H, hd, F = _heads(model)
    policy = sweep.method_policy(model, calib, "llm_pruner", 0.5)
    assert policy.meta["method"] == "llm_pruner" and policy.meta["heads_pruned"] == round(0.5 * H)
    scores = structured.taylor_scores(model, calib)
    report = prune.prune_model(model, policy, "llm_pruner", calib, progress=False)
    # measured sparsity = the policy's realised ratio, exactly, per linear
    assert (report["measured"] - report["target"]).abs().max() < 1e-9
    sizes = units.list_units(model)
    assert weighted_mean(policy.sparsities, sizes) == pytest.approx(policy.meta["mean_sparsity"])
    for i, layer in enumerate(units.lm_layers(model)):
        q = layer.self_attn.q_proj.weight.view(H, hd, -1)
        dead = [h for h in range(H) if bool((q[h] == 0).all())]
        lowest = torch.argsort(scores[f"lm.{i}.attn"], stable=True)[:len(dead)].tolist()
        assert sorted(dead) == sorted(lowest) and len(dead) == policy.meta["heads_pruned"]
        for h in dead:
            assert bool((layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] == 0).all())
        gone = (layer.mlp.gate_proj.weight == 0).all(1)
        assert int(gone.sum()) == policy.meta["channels_pruned"]
        assert bool((layer.mlp.down_proj.weight[:, gone] == 0).all())
    # the FLOP model counts the zeroed share of every unit
    assert flop_ratio(model, policy, "prefill", "units") == pytest.approx(1 / (1 - policy.meta["mean_sparsity"]))


def test_ratio_zero_prunes_nothing_and_bad_ratio_fails(micro_model):
    model, _ = micro_model
    assert set(structured.structured_policy(model, 0.0).sparsities.values()) == {0.0}
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        structured.structured_policy(model, 1.5)


def test_cli_prune_llm_pruner(micro_model_dir, tmp_path):
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(micro_model_dir), "--out", str(out), "--quiet", "--calib", "8",
            "--method", "llm_pruner", "--sparsity", "0.5"]
    assert cli.main(argv) == 0
    policy = Policy.from_json(out / "policy.json")
    report = pd.read_csv(out / "sparsity.csv")
    assert policy.meta["method"] == "llm_pruner"
    assert (report["measured"] - report["target"]).abs().max() < 1e-6
    assert json.loads((out / "ellava.json").read_text())["method"] == "llm_pruner"


# ---- grouped-query attention ---------------------------------------------------------------------------------------

#: The micro GQA decoder: 6 query heads in 2 KV groups of 3, head width 8, hidden 48, 96 MLP channels, 2 layers.
MICRO = structured.Shape(heads=6, kv_heads=2, head_dim=8, hidden=48, channels=96)


def _gqa_llava():
    """A LLaVA around a random micro Llama with grouped-query attention (:data:`MICRO`) and its processor."""
    lm, tok = smol.micro_llama(0)
    config = copy.deepcopy(lm.config)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 6, 2, 8
    with tiny.torch_seeded(1):
        lm = LlamaForCausalLM(config)
    proc = smol.smol_processor(tok)
    with tiny.torch_seeded(0):
        model = smol.init_smol_model(lm, proc.tokenizer, tiny.TinyConfig.micro())
    return model.eval(), proc


@pytest.fixture(scope="module")
def gqa():
    model, proc = _gqa_llava()
    return model, proc, calibration.encode_calibration(calibration.draw_calibration(8, 0), proc)


def test_shape_accounting_and_counts_by_hand():
    assert (MICRO.group, MICRO.group_params, MICRO.channel_params, MICRO.layer_params) == (3, 3072, 144, 19968)
    # r = 0.6: floor(1.2) = 1 group (3072 weights); (11980.8 - 3072) / 144 = 61.87 -> 62 channels
    assert structured.prune_counts(MICRO, 0.6) == (1, 62)
    assert structured.prune_counts(MICRO, 0.5) == (1, 48)  # 9984 - 3072 = 6912 = 48 * 144: exact
    assert structured.prune_counts(MICRO, 0.25) == (0, 35)  # floor(0.5) = 0; 4992 / 144 = 34.67 -> 35
    assert structured.prune_counts(MICRO, 1.0) == (2, 96)
    assert structured.prune_counts(MICRO, 0.0) == (0, 0)
    smollm2 = structured.Shape(heads=9, kv_heads=3, head_dim=64, hidden=576, channels=1536)
    assert (smollm2.group_params, smollm2.channel_params, smollm2.layer_params) == (294_912, 1_728, 3_538_944)
    assert [structured.prune_counts(smollm2, r) for r in (0.5, 0.6, 0.7)] == [(1, 853), (1, 1058), (2, 1092)]
    with pytest.raises(ValueError, match="evenly"):
        structured.Shape(heads=6, kv_heads=4, head_dim=8, hidden=48, channels=96)


def test_group_and_channel_scores_by_hand():
    # H = 4 query heads in K = 2 groups of 2, head width 2, hidden 1
    q = torch.arange(1.0, 9.0).view(8, 1)  # heads 0-1: 1+2+3+4 = 10, heads 2-3: 5+6+7+8 = 26
    k = torch.tensor([[1.0], [2.0], [3.0], [4.0]])  # KV head 0: 3, KV head 1: 7
    v = torch.tensor([[10.0], [0.0], [0.0], [0.0]])  # 10, 0
    o = torch.tensor([[0.0, 0, 0, 0, 0, 0, 0, 100]])  # columns of heads 0-1: 0, heads 2-3: 100
    assert structured.group_scores(q, k, v, o, 2).tolist() == [23.0, 133.0]
    gate = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # F = 3 channels, hidden 2
    up = torch.ones(3, 2)
    down = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 7.0]])
    assert structured.channel_scores(gate, up, down).tolist() == [5.0, 11.0, 20.0]


def test_gqa_prune_zeroes_whole_groups_and_meets_the_budget(gqa):
    model, proc, batch = gqa
    model = copy.deepcopy(model)
    assert structured.shape_of(model) == MICRO
    policy = sweep.method_policy(model, batch, "llm_pruner", 0.6)
    assert {k: policy.meta[k] for k in ("groups_pruned", "heads_pruned", "channels_pruned")} == \
        {"groups_pruned": 1, "heads_pruned": 3, "channels_pruned": 62}
    assert policy.sparsities["lm.0.attn"] == 0.5 and policy.sparsities["lm.1.mlp"] == 62 / 96
    assert policy.meta["mean_sparsity"] == pytest.approx(0.6009615385)  # (3072 + 62 * 144) / 19968 = 12000 / 19968
    report = prune.prune_model(model, policy, "llm_pruner", batch, progress=False)
    assert (report["measured"] - report["target"]).abs().max() < 1e-6  # the report rounds to 6 digits
    assert prune.measured_mean(report) == pytest.approx(0.600962, abs=1e-6)
    for layer in units.lm_layers(model):
        a = layer.self_attn
        q_dead = (a.q_proj.weight.view(6, 8, 48) == 0).all(-1).all(-1).tolist()
        kv_dead = [(a.k_proj.weight.view(2, 8, 48) == 0).all(-1).all(-1).tolist(),
                   (a.v_proj.weight.view(2, 8, 48) == 0).all(-1).all(-1).tolist()]
        o_dead = (a.o_proj.weight.view(48, 6, 8) == 0).all(0).all(-1).tolist()
        assert q_dead in ([True] * 3 + [False] * 3, [False] * 3 + [True] * 3)  # one whole group of 3 heads
        g = 0 if q_dead[0] else 1
        assert kv_dead == [[g == 0, g == 1]] * 2 and o_dead == q_dead
        assert int((layer.mlp.gate_proj.weight == 0).all(1).sum()) == 62
        assert int((layer.mlp.down_proj.weight == 0).all(0).sum()) == 62
    assert flop_ratio(model, policy, "prefill", "units") == pytest.approx(2.5060240964)  # 19968 / 7968
    # still a working model: a forward and a generate
    with torch.no_grad():
        logits = model(**{k: batch[k][:2] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
        out = model.generate(**{k: batch[k][:2] for k in ("input_ids", "attention_mask", "pixel_values")},
                             max_new_tokens=3, do_sample=False)
    assert bool(torch.isfinite(logits).all()) and out.shape == (2, batch["input_ids"].shape[1] + 3)


def test_the_group_with_the_smallest_taylor_importance_is_removed(gqa):
    model, _, batch = gqa
    model = copy.deepcopy(model)
    layers = units.lm_layers(model)
    with torch.no_grad():  # shrink group 1 of layer 0 and group 0 of layer 1 a thousandfold
        for layer, g in ((layers[0], 1), (layers[1], 0)):
            a = layer.self_attn
            a.q_proj.weight[24 * g:24 * (g + 1)] *= 1e-3
            a.k_proj.weight[8 * g:8 * (g + 1)] *= 1e-3
            a.v_proj.weight[8 * g:8 * (g + 1)] *= 1e-3
            a.o_proj.weight[:, 24 * g:24 * (g + 1)] *= 1e-3
    scores = structured.taylor_scores(model, batch)
    assert scores["lm.0.attn"].shape == (2,)
    assert float(scores["lm.0.attn"][1]) < float(scores["lm.0.attn"][0])
    assert float(scores["lm.1.attn"][0]) < float(scores["lm.1.attn"][1])
    removed = structured.structured_prune(model, structured.structured_policy(model, 0.5), batch)
    assert (removed["lm.0.attn"], removed["lm.1.attn"]) == ([1], [0])
    assert bool((layers[0].self_attn.q_proj.weight[24:] == 0).all())
    assert bool((layers[0].self_attn.q_proj.weight[:24] != 0).any())


def test_profiles_run_llm_pruner_in_their_tables():
    for profile in ("ci", "default", "smol", "paper"):
        methods = pipeline.load_profile(profile)["table_methods"]
        assert "llm_pruner" in methods and set(methods) <= set(sweep.ALL_METHODS)
    assert "llm_pruner" in tables.MARGIN_BASELINES


def test_margins_against_llm_pruner_by_hand():
    rows = [{"method": m, "sparsity": 0.5, "seed": s, "mean": x}
            for m, xs in (("ellava", (50.0, 54.0)), ("llm_pruner", (40.0, 41.0))) for s, x in zip((0, 1), xs)]
    out = tables.paired_margins(pd.DataFrame(rows)).set_index("baseline")
    row = out.loc["LLM-Pruner (structured)"]
    # d = (10, 13): mean 11.5, sd 2.1213, se 1.5
    assert (row["k"], row["mean_diff"], row["se"]) == (2, 11.5, pytest.approx(1.5))


def test_micro_sweep_makes_llm_pruner_rows(gqa, tmp_path):
    model, proc, _ = gqa
    model_dir = tmp_path / "gqa"
    model.save_pretrained(model_dir, safe_serialization=True)
    proc.save_pretrained(model_dir)
    spec = SweepSpec(str(model_dir), eval_limit=2)
    jobs = [Job("dense", 0.0, 0, 8), Job("llm_pruner", 0.6, 0, 8)]
    res = sweep.run_sweep(spec, jobs, tmp_path / "sweep", progress=False)
    assert list(res["method"]) == ["dense", "llm_pruner"]
    row = res.iloc[1]
    assert row["measured"] == pytest.approx(0.600962, abs=2e-6) and row["flops_rel"] < 1  # report rounds to 1e-6
    policy = Policy.from_json(tmp_path / "sweep" / "jobs" / "llm_pruner-0.60-s0-n8" / "policy.json")
    assert policy.meta["groups_pruned"] == 1 and policy.meta["channels_pruned"] == 62
    table = tables.format_main_table(tables.main_table(res, ["dense", "llm_pruner"]))
    assert list(table["method"]) == ["dense", "LLM-Pruner (structured)"]
