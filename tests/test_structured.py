"""LLM-Pruner-style structured baseline: Taylor scores per head / channel, whole structures zeroed, honest
sparsity and FLOPs, and its wiring (sweep policy, ``ellava prune --method llm_pruner``)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from ellava_lib import cli
from ellava_lib.core import units
from ellava_lib.core.policy import Policy, weighted_mean
from ellava_lib.model.specs import load_model
from ellava_lib.prune import prune, structured
from ellava_lib.run import sweep
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
