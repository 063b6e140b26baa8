"""The 7B model's structure on the meta device, from the shipped config: units, parameters, FLOPs (DESIGN 5).

Parameter convention: unit sizes count linear **weights only** (as ``units.list_units``; biases are not
prunable), component totals count every parameter (biases, norms, embeddings included).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaConfig

from ellava_lib.model import structure
from ellava_lib.speed import flops

D, D_FF, L, V = 4096, 11008, 32, 32064          # Vicuna-7B decoder
DV, DV_FF, LV, TV = 1024, 4096, 24, 577          # CLIP ViT-L/14-336: 24^2 patches + CLS


@pytest.fixture(scope="module")
def config():
    return structure.load_config()


@pytest.fixture(scope="module")
def model(config):
    return structure.meta_model(config)


def test_shipped_config_values(config):
    t, v = config.text_config, config.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (4096, 32, 32, 32)
    assert (t.intermediate_size, t.vocab_size, t.max_position_embeddings, t.hidden_act) == (11008, 32064, 4096, "silu")
    assert t.rms_norm_eps == 1e-5 and not config.tie_word_embeddings
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1024, 24, 16, 4096)
    assert (v.image_size, v.patch_size, v.projection_dim, v.hidden_act) == (336, 14, 768, "quick_gelu")
    assert config.projector_hidden_act == "gelu" and config.image_token_id == 32000
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.image_seq_length == 576 and config.pad_token_id == 32001
    assert not any(k.startswith("_ellava") for k in config.to_dict())


def test_config_aliases_and_unknown():
    assert structure.load_config("llava-hf/llava-1.5-7b-hf").text_config.hidden_size == 4096
    with pytest.raises(FileNotFoundError):
        structure.load_config("llava-1.5-13b")


def test_meta_model_has_no_weights(model):
    assert all(p.device.type == "meta" for p in model.parameters())


def test_unit_counts_and_sizes(model):
    rows = structure.unit_table(model, include_vision=True)
    lm = [r for r in rows if r["kind"].startswith("lm.")]
    vision = [r for r in rows if r["kind"].startswith("vision.")]
    assert len(lm) == 2 * L == 64 and len(vision) == 2 * LV == 48
    assert rows[0]["name"] == "vision.0.attn" and rows[48]["name"] == "lm.0.attn" and rows[-1]["name"] == "lm.31.mlp"
    sizes = {r["kind"]: {x["params"] for x in rows if x["kind"] == r["kind"]} for r in rows}
    assert sizes["lm.attn"] == {4 * 4096 ** 2} == {67_108_864}
    assert sizes["lm.mlp"] == {3 * 4096 * 11008} == {135_266_304}
    assert sizes["vision.attn"] == {4 * 1024 ** 2} == {4_194_304}     # weights only: 4 x 1024 biases not counted
    assert sizes["vision.mlp"] == {2 * 1024 * 4096} == {8_388_608}    # fc1 + fc2 weights, biases not counted
    assert [r["name"] for r in structure.unit_table(model, include_vision=False)] == [r["name"] for r in lm]


def test_parameter_counts_match_published_total(model):
    info = structure.inspect_model("llava-1.5-7b")
    assert info["n_units"] == 64
    assert sum(u["params"] for u in info["units"]) == 32 * (67_108_864 + 135_266_304) == 6_476_005_376
    # vision: class emb + patch conv (no bias) + 577 positions + pre/post LayerNorm + 24 blocks
    # (q,k,v,out with bias, 2 LayerNorms, fc1, fc2 with bias)
    block = 4 * (DV * DV + DV) + 2 * 2 * DV + (DV * DV_FF + DV_FF) + (DV_FF * DV + DV)
    vision = DV + 3 * 14 * 14 * DV + TV * DV + 2 * DV + LV * block + 2 * DV
    projector = (DV * D + D) + (D * D + D)
    # language model: embeddings + 32 x (attn + mlp + 2 RMSNorm) + final norm + untied LM head
    language = V * D + L * (4 * D * D + 3 * D * D_FF + 2 * D) + D + V * D
    assert info["params_by_component"] == {"vision": vision, "projector": projector, "language_model": language}
    assert (vision, projector, language) == (303_507_456, 20_979_712, 6_738_939_904)
    # Published total of llava-hf/llava-1.5-7b-hf: 7,063,427,072 -- our count matches it exactly (it includes
    # the 32064-row vocabulary and the vision post-LayerNorm that feature layer -2 never uses).
    assert info["params_total"] == vision + projector + language == 7_063_427_072


def test_inspect_model_variants(model):
    assert structure.inspect_model(model, include_vision=True)["n_units"] == 112
    assert structure.inspect_model_obj(model)["params_total"] == 7_063_427_072
    with pytest.raises(ValueError):
        structure.inspect_model("llava-1.5-7b", meta=False)
    with pytest.raises(ValueError):
        structure.inspect_model("no-such-model")


def test_flops_hand_computation(config):
    f = flops.flops_per_token(config, n_visual_tokens=576, n_text_tokens=64)
    T = 576 + 64
    hand = {
        "vision_embed": 2 * 576 * (3 * 14 * 14 * 1024),                           # 693,633,024
        "vision_linear": 2 * 577 * 24 * (4 * 1024 ** 2 + 2 * 1024 * 4096),         # 348,496,330,752
        "vision_attention": 4 * 577 ** 2 * 1024 * 24,                              # 32,728,252,416
        "projector": 2 * 576 * (1024 * 4096 + 4096 * 4096),                        # 24,159,191,040
        "lm_linear": 2 * T * 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008),              # 8,289,286,881,280
        "lm_attention": 4 * T ** 2 * 4096 * 32,                                    # 214,748,364,800
        "lm_head": 2 * T * 4096 * 32064,                                           # 168,107,704,320
    }
    for k, v in hand.items():
        assert f[k] == v, k
    assert f["total"] == sum(hand.values()) == 9_078_220_357_632
    assert f["per_token"] == pytest.approx(9_078_220_357_632 / 640)           # ~14.18 GFLOP per LM token
    no_image = flops.flops_per_token(config, n_visual_tokens=0, n_text_tokens=64)
    assert no_image["vision_linear"] == no_image["projector"] == 0


def _linear_weights(model, prefix: str) -> int:
    return sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith(prefix))


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_flop_formula_matches_module_shapes(model, kv_heads):
    """The config arithmetic equals 2 x (weights of the modules) x tokens, on the 7B and on a small GQA model."""
    if kv_heads is None:
        m = model
    else:
        m = structure.meta_model(LlavaConfig(
            vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 28, "patch_size": 7},
            text_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
                         "num_attention_heads": 8, "num_key_value_heads": kv_heads, "vocab_size": 100},
            image_seq_length=16))
    nv, nt = 16, 5
    f = flops.flops_per_token(m.config, n_visual_tokens=nv, n_text_tokens=nt)
    tv = structure.vision_tokens_per_image(m.config)
    assert f["lm_linear"] == 2 * (nv + nt) * _linear_weights(m, "model.language_model.layers")
    assert f["vision_linear"] == 2 * tv * _linear_weights(m, "model.vision_tower")
    assert f["projector"] == 2 * nv * _linear_weights(m, "model.multi_modal_projector")
    assert f["lm_head"] == 2 * (nv + nt) * m.lm_head.weight.numel()


def test_unit_flops_ratio(model, config):
    lm_units = [r["name"] for r in structure.unit_table(model, include_vision=False)]
    dense = flops.unit_flops(model, {}, 576, 64)
    assert dense["ratio"] == 1.0 and dense["dense_total"] == flops.flops_per_token(config, 576, 64)["total"]
    half = flops.unit_flops(model, {u: 0.5 for u in lm_units}, 576, 64)
    assert 0.5 < half["ratio"] < 1.0                      # attention, vision, projector, head stay dense
    lm_linear = 2 * 640 * 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008)
    assert half["ratio"] == pytest.approx((9_078_220_357_632 - 0.5 * lm_linear) / 9_078_220_357_632)
    assert half["ratio"] == pytest.approx(0.54345, abs=1e-5)
    all_units = [r["name"] for r in structure.unit_table(model)]
    both = flops.unit_flops(model, {u: 0.5 for u in all_units}, 576, 64)
    assert 0.5 < both["ratio"] < half["ratio"]
    assert both["units"]["vision.3.mlp"]["tokens"] == TV and both["units"]["lm.3.mlp"]["tokens"] == 640
    with pytest.raises(KeyError):
        flops.unit_flops(model, {"lm.99.attn": 0.5})
    with pytest.raises(ValueError):
        flops.unit_flops(model, {"lm.0.attn": 1.5})
