"""Parameters and FLOPs of a LLaVA under a policy, for the two phases of generation: prefill and decode.

Per-token FLOPs come from :func:`flops_per_token` and :func:`unit_flops` below (shapes from
:mod:`ellava_lib.model.structure`); the phase functions choose the token counts of each phase and add the one term
the prefill formula has no slot for, the attention of a new token over a KV cache. Conventions: multiply-add =
2 FLOPs, linear weights only per unit, pruned weights cost nothing.

- **prefill**: ``T = n_visual + n_text`` tokens through the decoder, ``n_images`` images through the vision
  tower, the projector, logits at every position: ``unit_flops(model, s, n_visual, n_text)``.
- **decode**: one new text token with a KV cache of ``kv_len`` tokens: no vision tower, no projector;
  per decoder unit ``2 n_u (1 - s_u)``; LM head ``2 d V``; attention of the new query over ``kv_len + 1`` keys
  ``4 (kv_len + 1) d_attn`` per layer = ``unit_flops(model, s, 0, 1)`` (which counts ``4 d_attn`` per layer)
  plus ``4 kv_len d_attn L``.

Any LLaVA object works: the tiny models, or ``structure.meta_model(structure.load_config())`` (7B, no memory).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd
from torch import nn
from transformers import LlavaConfig

from ellava_lib.core import units
from ellava_lib.core.policy import Policy
from ellava_lib.model import structure
from ellava_lib.model.structure import unit_table, vision_tokens_per_image

#: Default number of text tokens per sample in the FLOP model (a short question prompt; pass the real one).
DEFAULT_TEXT_TOKENS = 64


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
                    n_images: int | None = None, logits_tokens: float | None = None) -> dict[str, float]:
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

    Every unit (language model, and vision if the model has them; block units, or matrix units when
    ``sparsities`` names those, :func:`units.unit_kind`) gets ``dense_u = 2 * n_u * tokens_u`` with
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
    table = unit_table(model, include_vision=True, units=units.unit_kind(sparsities))
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

PHASES: tuple[str, ...] = ("prefill", "decode")
SCOPES: tuple[str, ...] = ("model", "decoder", "units")


def _sparsities(policy: Policy | Mapping[str, float] | None) -> dict[str, float]:
    """``{unit: s}`` of a ``Policy``, a mapping, or ``{}`` for the dense model (``None``)."""
    if policy is None:
        return {}
    return dict(policy.sparsities if isinstance(policy, Policy) else policy)


def default_visual_tokens(model: nn.Module) -> int:
    """Visual tokens per image in the decoder: ``config.image_seq_length`` (576 for llava-1.5)."""
    return int(model.config.image_seq_length)


def phase_flops(model: nn.Module, policy: Policy | Mapping[str, float] | None = None, phase: str = "prefill",
                n_visual_tokens: int | None = None, n_text_tokens: int = DEFAULT_TEXT_TOKENS,
                kv_len: int | None = None) -> dict:
    """FLOPs of one sample in ``phase`` under ``policy`` (dense if ``None``), as ``unit_flops``'s
    dict (``units, prunable_dense, prunable_pruned, fixed, dense_total, pruned_total, ratio, speedup``) plus
    ``phase``, ``tokens`` (decoder tokens computed), ``kv_len`` and ``lm_attention`` (dense attention FLOPs).

    Decode: ``kv_len`` defaults to the prefill length ``n_visual + n_text``; the cache attention
    ``4 kv_len d_attn L`` is added to ``fixed``, ``dense_total`` and ``pruned_total``.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")
    sps = _sparsities(policy)
    n_vis = default_visual_tokens(model) if n_visual_tokens is None else int(n_visual_tokens)
    cfg = model.config
    if phase == "prefill":
        out = unit_flops(model, sps, n_vis, n_text_tokens)
        terms = flops_per_token(cfg, n_vis, n_text_tokens)
        return {**out, "phase": phase, "tokens": n_vis + n_text_tokens, "kv_len": 0,
                "lm_attention": terms["lm_attention"]}
    kv = n_vis + n_text_tokens if kv_len is None else int(kv_len)
    if kv < 0:
        raise ValueError(f"kv_len must be >= 0, got {kv}")
    out = unit_flops(model, sps, 0, 1, n_images=0)
    _, d_attn, _, _, n_layers, _ = _text_dims(cfg)
    cache_attention = 4.0 * kv * d_attn * n_layers
    one = flops_per_token(cfg, 0, 1, n_images=0)["lm_attention"]
    out = {**out, "fixed": out["fixed"] + cache_attention, "dense_total": out["dense_total"] + cache_attention,
           "pruned_total": out["pruned_total"] + cache_attention}
    out["ratio"] = out["pruned_total"] / out["dense_total"]
    out["speedup"] = 1.0 / out["ratio"] if out["ratio"] > 0 else float("inf")
    return {**out, "phase": phase, "tokens": 1, "kv_len": kv, "lm_attention": one + cache_attention}


def _scoped(flops: dict, scope: str, named: set[str]) -> tuple[float, float]:
    """``(dense, pruned)`` FLOPs of a scope: ``model`` (everything), ``decoder`` (language-model unit linears +
    decoder attention, what one timed decoder layer runs), ``units`` (the linears of the decoder units in
    ``named``, all decoder units if it is empty: what timing those linears alone runs)."""
    if scope == "model":
        return flops["dense_total"], flops["pruned_total"]
    lm = {k: v for k, v in flops["units"].items() if k.startswith("lm.")}
    if scope == "units":
        lm = {k: v for k, v in lm.items() if not named or k in named}
        return sum(u["dense"] for u in lm.values()), sum(u["pruned"] for u in lm.values())
    if scope == "decoder":
        attn = flops["lm_attention"]
        return attn + sum(u["dense"] for u in lm.values()), attn + sum(u["pruned"] for u in lm.values())
    raise ValueError(f"unknown scope {scope!r}; choose from {', '.join(SCOPES)}")


def flop_ratio(model: nn.Module, policy: Policy | Mapping[str, float] | None = None, phase: str = "prefill",
               scope: str = "model", **tokens: int | None) -> float:
    """``dense FLOPs / pruned FLOPs`` of ``phase`` over ``scope`` (the counted speedup; 1.0 for ``None``).

    ``tokens``: ``n_visual_tokens``, ``n_text_tokens``, ``kv_len`` as in :func:`phase_flops`. ``scope``:
    ``model`` (the whole forward), ``decoder`` (decoder linears + attention), ``units`` (the linears of the
    decoder units the policy names; all of them for ``None``).
    """
    dense, pruned = _scoped(phase_flops(model, policy, phase, **tokens), scope, set(_sparsities(policy)))
    return dense / pruned if pruned > 0 else float("inf")


def unit_accounting(model: nn.Module, policy: Policy | Mapping[str, float] | None = None,
                    n_visual_tokens: int | None = None, n_text_tokens: int = DEFAULT_TEXT_TOKENS,
                    kv_len: int | None = None, include_vision: bool | None = None) -> pd.DataFrame:
    """One row per unit: ``unit, kind, params, sparsity, params_kept = round(params * (1 - s)),
    prefill_tokens, prefill_dense, prefill_pruned, decode_dense, decode_pruned`` (FLOPs of one sample /
    one decode step). Vision units are listed when the policy names one, or if ``include_vision``."""
    sps = _sparsities(policy)
    if include_vision is None:
        include_vision = units.names_vision(sps)
    pre = phase_flops(model, sps, "prefill", n_visual_tokens, n_text_tokens)["units"]
    dec = phase_flops(model, sps, "decode", n_visual_tokens, n_text_tokens, kv_len)["units"]
    rows = []
    for r in structure.unit_table(model, include_vision, units.unit_kind(sps)):
        u, s = r["name"], float(sps.get(r["name"], 0.0))
        rows.append({"unit": u, "kind": r["kind"], "params": r["params"], "sparsity": s,
                     "params_kept": round(r["params"] * (1.0 - s)), "prefill_tokens": pre[u]["tokens"],
                     "prefill_dense": pre[u]["dense"], "prefill_pruned": pre[u]["pruned"],
                     "decode_dense": dec[u]["dense"], "decode_pruned": dec[u]["pruned"]})
    return pd.DataFrame(rows)


def policy_accounting(model: nn.Module, policy: Policy | Mapping[str, float] | None = None,
                      n_visual_tokens: int | None = None, n_text_tokens: int = DEFAULT_TEXT_TOKENS,
                      kv_len: int | None = None) -> dict:
    """Totals of one policy::

        {params_total, params_prunable, params_pruned = sum_u n_u s_u, params_kept = total - pruned,
         param_ratio = total / kept,
         prefill: {dense, pruned, ratio = dense / pruned}, decode: {dense, pruned, ratio, kv_len}}

    ``params_prunable`` counts the units of the language model (and of the vision tower when the policy
    names vision units), the convention of ``Policy.mean_sparsity``.
    """
    sps = _sparsities(policy)
    include_vision = units.names_vision(sps)
    sizes = units.list_units(model, include_vision, units.unit_kind(sps))
    total = units.params_by_component(model)["total"]
    pruned = sum(n * float(sps.get(u, 0.0)) for u, n in sizes.items())
    out = {"params_total": total, "params_prunable": sum(sizes.values()), "params_pruned": pruned,
           "params_kept": total - pruned, "param_ratio": total / (total - pruned) if total > pruned else float("inf")}
    for phase in PHASES:
        f = phase_flops(model, sps, phase, n_visual_tokens, n_text_tokens, kv_len)
        out[phase] = {"dense": f["dense_total"], "pruned": f["pruned_total"],
                      "ratio": f["dense_total"] / f["pruned_total"], "tokens": f["tokens"], "kv_len": f["kv_len"]}
    return out
