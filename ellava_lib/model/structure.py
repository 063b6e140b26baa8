"""The structure of a LLaVA model without its weights: config, meta-device model, units and parameter counts.

The 7B model's ``config.json`` is shipped in the package (``ellava_lib/configs/llava-1.5-7b-hf.json``) so that
layer names, unit counts and parameter counts (and :mod:`ellava_lib.speed.flops`' FLOP counts) are checked offline, on a
model instantiated on the ``meta`` device (shapes only, no memory, no hub access). Layer names come from
:mod:`ellava_lib.core.units`.

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
from importlib import resources

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

from ellava_lib.core import units as _units

#: Shipped configs, and the names that resolve to them.
CONFIG_ALIASES = {"llava-1.5-7b-hf": "llava-1.5-7b-hf", "llava-1.5-7b": "llava-1.5-7b-hf",
                  "llava-hf/llava-1.5-7b-hf": "llava-1.5-7b-hf"}


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
    """``LlavaForConditionalGeneration(config)`` on the ``meta`` device: every shape, no weights, no memory.
    The same object for an equal config (the last :data:`_META_CACHE_SIZE` configs, keyed by their JSON; building
    one takes tens of milliseconds and the cost models ask hundreds of times): treat it as read-only."""
    key = config.to_json_string(use_diff=False)
    model = _META_CACHE.pop(key, None)
    if model is None:
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config)
    _META_CACHE[key] = model  # most recent last
    while len(_META_CACHE) > _META_CACHE_SIZE:
        _META_CACHE.pop(next(iter(_META_CACHE)))
    return model


_META_CACHE: dict[str, LlavaForConditionalGeneration] = {}
_META_CACHE_SIZE = 8


def scaled_config(config: LlavaConfig, hidden: int = 256, layers: int | None = 2, vocab: int = 1000,
                  vision_hidden: int = 64, vision_layers: int = 2) -> LlavaConfig:
    """``config`` shrunk to ``hidden`` with its architecture and layouts kept: the head dimension (so
    ``hidden / head_dim`` heads, and the same query-per-KV-head ratio), the MLP ratio (``intermediate / hidden``,
    rounded up to a multiple of 32 words of the bitmask), ``layers`` decoder layers (``None``: as many), a
    ``vocab``-word vocabulary (the image and pad tokens at its end), and a small vision tower (``vision_hidden``,
    ``vision_layers``, its head dimension kept) that still sees the full image: ``image_seq_length`` is
    unchanged (576 positions for LLaVA-1.5). For tests and the seconds-long mode of the 7B benchmarks."""
    d = config.to_dict()
    t, v = d["text_config"], d["vision_config"]
    head_dim = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
    group = t["num_attention_heads"] // t.get("num_key_value_heads", t["num_attention_heads"])
    heads = max(group, hidden // head_dim // group * group)
    inter = -(-round(t["intermediate_size"] * hidden / t["hidden_size"]) // 32) * 32
    t.update(hidden_size=heads * head_dim, intermediate_size=inter, num_attention_heads=heads,
             num_key_value_heads=heads // group, vocab_size=vocab, pad_token_id=vocab - 1)
    if layers is not None:
        t["num_hidden_layers"] = layers
    v_head = v["hidden_size"] // v["num_attention_heads"]
    v.update(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden, num_hidden_layers=vision_layers,
             num_attention_heads=max(1, vision_hidden // v_head), projection_dim=vision_hidden)
    d.update(vocab_size=vocab, image_token_index=vocab - 2, pad_token_id=vocab - 1)
    return LlavaConfig.from_dict(d)


# ---------------------------------------------------------------------------------------------------- units


def unit_table(model: nn.Module, include_vision: bool = True, units: str = "block") -> list[dict]:
    """One row per unit of the kind ``units`` (``block`` or ``matrix``, :data:`units.UNIT_KINDS`) in depth order:
    ``{name, params, kind}``.

    ``params`` = sum of the unit's linear **weight** sizes (``d_out * d_in`` each, biases not counted, as in
    ``units.list_units``); ``kind`` is the name of its block unit without the block index, e.g. ``lm.attn``,
    ``vision.mlp`` (for the matrix unit ``lm.0.mlp.up_proj`` too).
    """
    rows = []
    for name, lins in _units.unit_linears(model, include_vision, units).items():
        prefix, _, group = _units.block_unit(name).split(".")
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
                         "load real weights with ellava_lib.model.specs.load_model and pass the model")
    return inspect_model_obj(meta_model(load_config(spec)), include_vision)


def vision_tokens_per_image(config: LlavaConfig) -> int:
    """Tokens inside the CLIP tower for one image: ``(image_size / patch_size)^2 + 1`` (patches + CLS) = 577."""
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2 + 1
