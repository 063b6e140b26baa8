"""Parameters and FLOPs of a LLaVA under a policy, for the two phases of generation: prefill and decode.

Every count comes from :mod:`ellava_lib.structure` (``flops_per_token``, ``unit_flops``); this module only
chooses the token counts of each phase and adds the one term the prefill formula has no slot for, the
attention of a new token over a KV cache. Conventions (multiply-add = 2 FLOPs, linear weights only per unit,
pruned weights cost nothing) are structure.py's.

- **prefill**: ``T = n_visual + n_text`` tokens through the decoder, ``n_images`` images through the vision
  tower, the projector, logits at every position: ``structure.unit_flops(model, s, n_visual, n_text)``.
- **decode**: one new text token with a KV cache of ``kv_len`` tokens: no vision tower, no projector;
  per decoder unit ``2 n_u (1 - s_u)``; LM head ``2 d V``; attention of the new query over ``kv_len + 1`` keys
  ``4 (kv_len + 1) d_attn`` per layer = ``unit_flops(model, s, 0, 1)`` (which counts ``4 d_attn`` per layer)
  plus ``4 kv_len d_attn L``.

Any LLaVA object works: the tiny models, or ``structure.meta_model(structure.load_config())`` (7B, no memory).
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
from torch import nn

from . import structure, units
from .policy import Policy

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
                n_visual_tokens: int | None = None, n_text_tokens: int = structure.DEFAULT_TEXT_TOKENS,
                kv_len: int | None = None) -> dict:
    """FLOPs of one sample in ``phase`` under ``policy`` (dense if ``None``), as ``structure.unit_flops``'s
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
        out = structure.unit_flops(model, sps, n_vis, n_text_tokens)
        terms = structure.flops_per_token(cfg, n_vis, n_text_tokens)
        return {**out, "phase": phase, "tokens": n_vis + n_text_tokens, "kv_len": 0,
                "lm_attention": terms["lm_attention"]}
    kv = n_vis + n_text_tokens if kv_len is None else int(kv_len)
    if kv < 0:
        raise ValueError(f"kv_len must be >= 0, got {kv}")
    out = structure.unit_flops(model, sps, 0, 1, n_images=0)
    _, d_attn, _, _, n_layers, _ = structure._text_dims(cfg)
    cache_attention = 4.0 * kv * d_attn * n_layers
    one = structure.flops_per_token(cfg, 0, 1, n_images=0)["lm_attention"]
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
                    n_visual_tokens: int | None = None, n_text_tokens: int = structure.DEFAULT_TEXT_TOKENS,
                    kv_len: int | None = None, include_vision: bool | None = None) -> pd.DataFrame:
    """One row per unit: ``unit, kind, params, sparsity, params_kept = round(params * (1 - s)),
    prefill_tokens, prefill_dense, prefill_pruned, decode_dense, decode_pruned`` (FLOPs of one sample /
    one decode step). Vision units are listed when the policy names one, or if ``include_vision``."""
    sps = _sparsities(policy)
    if include_vision is None:
        include_vision = any(u.startswith("vision.") for u in sps)
    pre = phase_flops(model, sps, "prefill", n_visual_tokens, n_text_tokens)["units"]
    dec = phase_flops(model, sps, "decode", n_visual_tokens, n_text_tokens, kv_len)["units"]
    rows = []
    for r in structure.unit_table(model, include_vision):
        u, s = r["name"], float(sps.get(r["name"], 0.0))
        rows.append({"unit": u, "kind": r["kind"], "params": r["params"], "sparsity": s,
                     "params_kept": round(r["params"] * (1.0 - s)), "prefill_tokens": pre[u]["tokens"],
                     "prefill_dense": pre[u]["dense"], "prefill_pruned": pre[u]["pruned"],
                     "decode_dense": dec[u]["dense"], "decode_pruned": dec[u]["pruned"]})
    return pd.DataFrame(rows)


def policy_accounting(model: nn.Module, policy: Policy | Mapping[str, float] | None = None,
                      n_visual_tokens: int | None = None, n_text_tokens: int = structure.DEFAULT_TEXT_TOKENS,
                      kv_len: int | None = None) -> dict:
    """Totals of one policy::

        {params_total, params_prunable, params_pruned = sum_u n_u s_u, params_kept = total - pruned,
         param_ratio = total / kept,
         prefill: {dense, pruned, ratio = dense / pruned}, decode: {dense, pruned, ratio, kv_len}}

    ``params_prunable`` counts the units of the language model (and of the vision tower when the policy
    names vision units), the convention of ``Policy.mean_sparsity``.
    """
    sps = _sparsities(policy)
    include_vision = any(u.startswith("vision.") for u in sps)
    sizes = units.list_units(model, include_vision)
    total = units.params_by_component(model)["total"]
    pruned = sum(n * float(sps.get(u, 0.0)) for u, n in sizes.items())
    out = {"params_total": total, "params_prunable": sum(sizes.values()), "params_pruned": pruned,
           "params_kept": total - pruned, "param_ratio": total / (total - pruned) if total > pruned else float("inf")}
    for phase in PHASES:
        f = phase_flops(model, sps, phase, n_visual_tokens, n_text_tokens, kv_len)
        out[phase] = {"dense": f["dense_total"], "pruned": f["pruned_total"],
                      "ratio": f["dense_total"] / f["pruned_total"], "tokens": f["tokens"], "kv_len": f["kv_len"]}
    return out
