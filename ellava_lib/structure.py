"""The structure of a LLaVA model without its weights: config, meta-device model, units, parameter and FLOP counts.

The 7B model's ``config.json`` is shipped in the package (``ellava_lib/configs/llava-1.5-7b-hf.json``) so that
layer names, unit counts, parameter counts and FLOP counts are checked offline, on a model instantiated on the
``meta`` device (shapes only, no memory, no hub access). Layer names come from :mod:`ellava_lib.units`.

Sources of the shipped values (checked against public copies of the files):

- ``llava-hf/llava-1.5-7b-hf`` ``config.json`` (as mirrored on huggingface.co, e.g. ``mohitsha/llava-1.5-7b-hf``,
  ``edbeeching/vsft-llava-1.5-7b-hf``, whose ``_name_or_path`` is ``llava-hf/llava-1.5-7b-hf``; and the hub
  discussion #15 diff of the original file): ``image_token_index`` 32000, ``pad_token_id`` 32001,
  ``projector_hidden_act`` "gelu", ``vision_feature_layer`` -2, ``vision_feature_select_strategy`` "default",
  ``tie_word_embeddings`` false, ``vocab_size`` 32064 (text_config too), text ``max_position_embeddings`` 4096,
  ``rms_norm_eps`` 1e-5; vision ``hidden_size`` 1024, ``intermediate_size`` 4096, ``num_hidden_layers`` 24,
  ``num_attention_heads`` 16, ``image_size`` 336, ``patch_size`` 14, ``projection_dim`` 768.
- The hub file leaves the Llama architecture to ``LlamaConfig`` defaults; written out here from
  ``lmsys/vicuna-7b-v1.5`` ``config.json``: hidden 4096, intermediate 11008, 32 layers, 32 heads, 32 KV heads,
  ``silu``, ``rope_theta`` 10000.
- CLIP fields left to defaults, from ``openai/clip-vit-large-patch14-336``: ``hidden_act`` "quick_gelu",
  ``layer_norm_eps`` 1e-5, ``num_channels`` 3.
- ``image_seq_length`` = (336 / 14)^2 = 576 (newer llava-hf configs state it; it is also the library default).

Parameter convention: unit sizes (``units.list_units``) count **linear weights only** (no biases): the Llama
linears have no bias, the CLIP ones do (q/k/v/out/fc1/fc2 biases are not prunable and not counted in units).
Component totals (``units.params_by_component``) count every parameter, biases and norms included.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import Mapping

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

from . import units as _units

#: Shipped configs, and the names that resolve to them.
CONFIG_ALIASES = {"llava-1.5-7b-hf": "llava-1.5-7b-hf", "llava-1.5-7b": "llava-1.5-7b-hf",
                  "llava-hf/llava-1.5-7b-hf": "llava-1.5-7b-hf"}

#: Default number of text tokens per sample in the FLOP model (a short question prompt; pass the real one).
DEFAULT_TEXT_TOKENS = 64


# --------------------------------------------------------------------------------------------------- config


def load_config(name: str = "llava-1.5-7b-hf") -> LlavaConfig:
    """The shipped ``config.json`` of ``name`` as a ``LlavaConfig`` (keys starting with ``_ellava`` dropped)."""
    key = CONFIG_ALIASES.get(name, name)
    path = resources.files("ellava_lib.configs") / f"{key}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped config {name!r}; known: {sorted(CONFIG_ALIASES)}")
    data = json.loads(path.read_text())
    data = {k: v for k, v in data.items() if not k.startswith("_ellava")}
    return LlavaConfig(**data)


def meta_model(config: LlavaConfig) -> LlavaForConditionalGeneration:
    """``LlavaForConditionalGeneration(config)`` on the ``meta`` device: every shape, no weights, no memory."""
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


# ---------------------------------------------------------------------------------------------------- units


def unit_table(model: nn.Module, include_vision: bool = True) -> list[dict]:
    """One row per unit in depth order: ``{name, params, kind}``.

    ``params`` = sum of the unit's linear **weight** sizes (``d_out * d_in`` each, biases not counted, as in
    ``units.list_units``); ``kind`` is the unit name without its block index, e.g. ``lm.attn``, ``vision.mlp``.
    """
    rows = []
    for name, lins in _units.unit_linears(model, include_vision).items():
        prefix, _, group = name.split(".")
        rows.append({"name": name, "params": sum(lin.weight.numel() for lin in lins.values()),
                     "kind": f"{prefix}.{group}"})
    return rows


def inspect_model_obj(model: nn.Module, include_vision: bool = False) -> dict:
    """Structure summary of a built model (any tier, meta or real weights)::

        {n_units, units: [{name, params}], params_total,
         params_by_component: {vision, projector, language_model}}

    ``units`` are the language-model units (plus the vision ones if ``include_vision``); ``params_total`` counts
    every parameter of the model (= the sum of the three components).
    """
    rows = unit_table(model, include_vision)
    comp = _units.params_by_component(model)
    return {"n_units": len(rows), "units": [{"name": r["name"], "params": r["params"]} for r in rows],
            "params_total": comp["total"],
            "params_by_component": {k: comp[k] for k in ("vision", "projector", "language_model")}}


def inspect_model(spec: str | nn.Module, meta: bool = True, include_vision: bool = False) -> dict:
    """:func:`inspect_model_obj` for a shipped config name (``llava-1.5-7b``, built on the meta device) or for
    an already built model. Other specs (``tiny``, folders) are resolved by the caller."""
    if isinstance(spec, nn.Module):
        return inspect_model_obj(spec, include_vision)
    if spec not in CONFIG_ALIASES:
        raise ValueError(f"inspect_model knows {sorted(CONFIG_ALIASES)} (or a built model), not {spec!r}")
    if not meta:
        raise ValueError(f"{spec}: only the meta-device structure is available offline (meta=True); "
                         "load real weights with ellava_lib.loading and pass the model")
    return inspect_model_obj(meta_model(load_config(spec)), include_vision)


# ---------------------------------------------------------------------------------------------------- FLOPs


def vision_tokens_per_image(config: LlavaConfig) -> int:
    """Tokens inside the CLIP tower for one image: ``(image_size / patch_size)^2 + 1`` (patches + CLS) = 577."""
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2 + 1


def _text_dims(config: LlavaConfig) -> tuple[int, int, int, int, int, int]:
    """``(d, d_attn, d_kv, d_ff, n_layers, vocab)`` of the language model; ``d_attn = heads * head_dim``,
    ``d_kv = kv_heads * head_dim``."""
    t = config.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    kv_heads = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
    return (t.hidden_size, t.num_attention_heads * head_dim, kv_heads * head_dim, t.intermediate_size,
            t.num_hidden_layers, t.vocab_size)


def _projector_in(config: LlavaConfig) -> int:
    """Input width of the projector: ``d_v`` times the number of selected vision layers."""
    layers = config.vision_feature_layer
    return config.vision_config.hidden_size * (len(layers) if isinstance(layers, (list, tuple)) else 1)


def flops_per_token(config: LlavaConfig, n_visual_tokens: int = 576, n_text_tokens: int = DEFAULT_TEXT_TOKENS,
                    n_images: int | None = None, logits_tokens: int | None = None) -> dict[str, float]:
    """Forward FLOPs of one sample (``n_images`` images + text), by component, and per language-model token.

    FLOP model (multiply-add = 2 FLOPs; biases, norms, activations, softmax, rotary are ignored, < 1%):

    - a linear with weight ``d_out x d_in`` costs ``2 * d_out * d_in`` per token that passes it;
    - ``T = n_visual_tokens + n_text_tokens`` tokens pass the decoder; per layer
      ``lm_linear = 2 * T * (d*d_attn + 2*d*d_kv + d_attn*d + 3*d*d_ff)`` (q, k, v, o, gate, up, down);
    - decoder attention scores and values: ``4 * T * d_attn`` per layer per token (``Q K^T`` and ``A V``, full
      ``T x T``, no causal discount), i.e. ``lm_attention = 4 * T^2 * d_attn * n_layers``;
    - vision tower, ``T_v = (image/patch)^2 + 1 = 577`` tokens per image through **all** ``L_v`` blocks (they all
      run, though feature layer -2 leaves the last one unused): ``vision_linear = 2 * T_v * L_v *
      (4 d_v^2 + 2 d_v d_vff)``, ``vision_attention = 4 * T_v^2 * d_v * L_v``; the patch embedding is a linear
      over the patches: ``vision_embed = 2 * (T_v - 1) * 3 * p^2 * d_v``;
    - projector on the ``n_visual_tokens``: ``2 * n_visual * (d_v_in * d + d * d)``;
    - LM head: ``2 * d * vocab`` per logit position, ``logits_tokens`` positions (default ``T``: ``transformers``
      computes logits for every position unless ``logits_to_keep`` is set).

    ``n_images`` defaults to 1 when there are visual tokens, else 0. Returns the terms, ``total`` and
    ``per_token = total / T``. For llava-1.5-7b with 576 visual tokens the decoder linears alone are
    ``2 * 6,476,005,376 = 12.95 GFLOP`` per token.
    """
    d, d_attn, d_kv, d_ff, n_layers, vocab = _text_dims(config)
    v = config.vision_config
    n_img = (1 if n_visual_tokens > 0 else 0) if n_images is None else n_images
    t_v = vision_tokens_per_image(config)
    T = n_visual_tokens + n_text_tokens
    lm_layer_params = d * d_attn + 2 * d * d_kv + d_attn * d + 3 * d * d_ff
    terms = {
        "vision_embed": 2.0 * n_img * (t_v - 1) * v.num_channels * v.patch_size ** 2 * v.hidden_size,
        "vision_linear": 2.0 * n_img * t_v * v.num_hidden_layers
        * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size),
        "vision_attention": 4.0 * n_img * t_v ** 2 * v.hidden_size * v.num_hidden_layers,
        "projector": 2.0 * n_visual_tokens * (_projector_in(config) * d + d * d),
        "lm_linear": 2.0 * T * n_layers * lm_layer_params,
        "lm_attention": 4.0 * T ** 2 * d_attn * n_layers,
        "lm_head": 2.0 * (T if logits_tokens is None else logits_tokens) * d * vocab,
    }
    total = sum(terms.values())
    return {**terms, "total": total, "per_token": total / T if T else 0.0, "tokens": float(T)}


def unit_flops(model: nn.Module, sparsities: Mapping[str, float], n_visual_tokens: int = 576,
               n_text_tokens: int = DEFAULT_TEXT_TOKENS, n_images: int | None = None) -> dict:
    """FLOPs of one forward sample under a policy, and its ratio to the dense model.

    Every unit (language model, and vision if the model has them) gets ``dense_u = 2 * n_u * tokens_u`` with
    ``n_u`` its weight count and ``tokens_u = T`` (LM) or ``n_images * T_v`` (vision), and
    ``pruned_u = dense_u * (1 - s_u)`` (``s_u`` = 0 for units absent from ``sparsities``; sparse weights are
    assumed to cost nothing, the FLOP-ratio convention, not a latency). Everything else (attention scores,
    embeddings, projector, LM head, unpruned linears) is ``fixed = dense_total - sum_u dense_u`` with
    ``dense_total`` from :func:`flops_per_token`. Returns::

        {units: {name: {tokens, dense, pruned, sparsity}}, prunable_dense, prunable_pruned, fixed,
         dense_total, pruned_total, ratio = pruned_total / dense_total, speedup = 1 / ratio}
    """
    cfg = model.config
    n_img = (1 if n_visual_tokens > 0 else 0) if n_images is None else n_images
    T = n_visual_tokens + n_text_tokens
    table = unit_table(model, include_vision=True)
    known = {r["name"] for r in table}
    unknown = sorted(set(sparsities) - known)
    if unknown:
        raise KeyError(f"unknown units {unknown[:5]}")
    bad = {u: s for u, s in sparsities.items() if not 0.0 <= float(s) <= 1.0}
    if bad:
        raise ValueError(f"sparsities outside [0, 1]: {bad}")
    per_unit = {}
    for r in table:
        tokens = T if r["kind"].startswith("lm.") else n_img * vision_tokens_per_image(cfg)
        s = float(sparsities.get(r["name"], 0.0))
        dense = 2.0 * r["params"] * tokens
        per_unit[r["name"]] = {"tokens": tokens, "dense": dense, "pruned": dense * (1.0 - s), "sparsity": s}
    dense_total = flops_per_token(cfg, n_visual_tokens, n_text_tokens, n_images=n_img)["total"]
    prunable_dense = sum(u["dense"] for u in per_unit.values())
    prunable_pruned = sum(u["pruned"] for u in per_unit.values())
    fixed = dense_total - prunable_dense
    if fixed < -1e-6 * dense_total:
        raise RuntimeError("unit FLOPs exceed the model's FLOP count: the FLOP model does not fit this model")
    pruned_total = fixed + prunable_pruned
    ratio = pruned_total / dense_total if dense_total else 1.0
    return {"units": per_unit, "prunable_dense": prunable_dense, "prunable_pruned": prunable_pruned,
            "fixed": fixed, "dense_total": dense_total, "pruned_total": pruned_total, "ratio": ratio,
            "speedup": 1.0 / ratio if ratio > 0 else math.inf}
