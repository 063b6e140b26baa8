"""Parameter and FLOP accounting per unit and per policy, prefill and decode, checked by hand on a toy config
and for consistency on the 7B meta model."""

from __future__ import annotations

import pytest
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from ellava_lib.core import units
from ellava_lib.core.policy import Policy
from ellava_lib.model import structure
from ellava_lib.speed import flops

# Toy LLaVA: decoder d=8, d_ff=12, 2 layers, 2 heads of 4 with 1 KV head (d_attn=8, d_kv=4), vocab 20;
# CLIP d_v=4, d_vff=8, 1 layer, 8x8 image in 4x4 patches (T_v = 4 + 1); 4 visual tokens.
ATTN = 8 * 8 + 2 * 8 * 4 + 8 * 8        # q, k, v, o = 192 weights
MLP = 3 * 8 * 12                        # gate, up, down = 288 weights
T = 4 + 3                               # 4 visual + 3 text tokens
PREFILL = {
    "lm_linear": 2 * T * 2 * (ATTN + MLP),          # 13440
    "lm_attention": 4 * T * T * 8 * 2,              # 3136
    "lm_head": 2 * T * 8 * 20,                      # 2240
    "projector": 2 * 4 * (4 * 8 + 8 * 8),           # 768
    "vision_embed": 2 * 4 * 3 * 4 * 4 * 4,          # 1536
    "vision_linear": 2 * 5 * (4 * 4 * 4 + 2 * 4 * 8),  # 1280
    "vision_attention": 4 * 5 * 5 * 4,              # 400
}
DECODE = 2 * 1 * 2 * (ATTN + MLP) + 4 * (T + 1) * 8 * 2 + 2 * 8 * 20   # kv_len = T: 1920 + 512 + 320
POLICY = {"lm.0.attn": 0.5, "lm.0.mlp": 0.0, "lm.1.attn": 0.0, "lm.1.mlp": 0.5}


@pytest.fixture(scope="module")
def toy():
    text = LlamaConfig(vocab_size=20, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1)
    vision = CLIPVisionConfig(hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                              image_size=8, patch_size=4)
    cfg = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1, image_seq_length=4)
    return structure.meta_model(cfg)


@pytest.fixture(scope="module")
def llava7b():
    return structure.meta_model(structure.load_config())


def test_toy_prefill_by_hand(toy):
    f = flops.phase_flops(toy, None, "prefill", n_text_tokens=3)
    assert f["tokens"] == T and f["dense_total"] == sum(PREFILL.values()) == 22800
    assert f["pruned_total"] == f["dense_total"] and f["lm_attention"] == PREFILL["lm_attention"]
    g = flops.phase_flops(toy, POLICY, "prefill", n_text_tokens=3)
    saved = 0.5 * 2 * T * ATTN + 0.5 * 2 * T * MLP  # 1344 + 2016
    assert g["pruned_total"] == 22800 - saved == 19440
    assert flops.flop_ratio(toy, POLICY, "prefill", n_text_tokens=3) == pytest.approx(22800 / 19440)
    assert flops.flop_ratio(toy, POLICY, "prefill", "units", n_text_tokens=3) == pytest.approx(
        (2 * T * 2 * (ATTN + MLP)) / (2 * T * 2 * (ATTN + MLP) - saved))
    assert flops.flop_ratio(toy, {"lm.1.mlp": 0.5}, "prefill", "units") == pytest.approx(2.0)  # named only
    assert flops.flop_ratio(toy, POLICY, "prefill", "decoder", n_text_tokens=3) == pytest.approx(
        (13440 + 3136) / (13440 + 3136 - saved))


def test_toy_decode_by_hand(toy):
    f = flops.phase_flops(toy, None, "decode", n_text_tokens=3)
    assert (f["tokens"], f["kv_len"], f["dense_total"]) == (1, T, DECODE) and DECODE == 2752
    g = flops.phase_flops(toy, POLICY, "decode", n_text_tokens=3)
    assert g["pruned_total"] == DECODE - (0.5 * 2 * ATTN + 0.5 * 2 * MLP) == 2272
    assert all(u["tokens"] == (1 if name.startswith("lm.") else 0) for name, u in g["units"].items())
    longer = flops.phase_flops(toy, None, "decode", kv_len=100)
    assert longer["dense_total"] - f["dense_total"] == 4 * (100 - T) * 8 * 2  # attention grows with the cache
    with pytest.raises(ValueError, match="phase"):
        flops.phase_flops(toy, None, "train")


def test_toy_params_and_unit_table(toy):
    acc = flops.policy_accounting(toy, Policy(POLICY), n_text_tokens=3)
    assert acc["params_prunable"] == 2 * (ATTN + MLP) and acc["params_pruned"] == 0.5 * ATTN + 0.5 * MLP == 240
    assert acc["params_total"] == units.params_by_component(toy)["total"]
    assert acc["params_kept"] == acc["params_total"] - 240
    assert acc["prefill"]["ratio"] == pytest.approx(22800 / 19440)
    assert acc["decode"]["ratio"] == pytest.approx(2752 / 2272)
    table = flops.unit_accounting(toy, POLICY, n_text_tokens=3)
    assert list(table["unit"]) == list(POLICY)
    row = table.set_index("unit").loc["lm.1.mlp"]
    assert (row["params"], row["params_kept"]) == (MLP, 144)
    assert (row["prefill_dense"], row["decode_pruned"]) == (2 * T * MLP, MLP)
    assert len(flops.unit_accounting(toy, include_vision=True)) == 6


def test_dense_ratio_is_one_and_pruned_above_one(llava7b):
    unit_names = units.list_units(llava7b)
    for phase in flops.PHASES:
        for scope in flops.SCOPES:
            assert flops.flop_ratio(llava7b, None, phase, scope) == 1.0
    half = Policy.uniform(unit_names, 0.5)
    assert flops.flop_ratio(llava7b, half, "prefill", "units") == pytest.approx(2.0)
    assert flops.flop_ratio(llava7b, half, "decode", "units") == pytest.approx(2.0)
    full = flops.flop_ratio(llava7b, half, "prefill")
    dec = flops.flop_ratio(llava7b, half, "decode")
    assert 1.0 < full < 2.0 and 1.0 < dec < 2.0  # attention, vision, LM head are not pruned


def test_decode_is_cheaper_than_prefill(llava7b):
    for pol in (None, Policy.uniform(units.list_units(llava7b), 0.7)):
        acc = flops.policy_accounting(llava7b, pol)
        assert acc["decode"]["dense"] < acc["prefill"]["dense"] and acc["decode"]["pruned"] < acc["prefill"]["pruned"]
        assert acc["prefill"]["tokens"] == 576 + flops.DEFAULT_TEXT_TOKENS
    # decode: one token through every decoder linear, 2 FLOPs per weight
    f = flops.phase_flops(llava7b, None, "decode")
    assert f["prunable_dense"] == 2 * 6_476_005_376
