"""LLM-Pruner-style structured pruning (Ma et al. 2023, horseee/LLM-Pruner): attention heads and MLP channels
ranked by first-order Taylor importance, the same ratio in every decoder layer, no recovery tuning.

Importance (LLM-Pruner's ``TaylorImportance``, ``taylor = param_first``, group reduction ``sum``): from one
backward pass of the calibration loss ``L`` (here the answer cross-entropy :func:`losses.calibration_loss`
computes; LLM-Pruner uses the LM loss of its calibration text), the element salience ``|w * dL/dw|`` summed
over every weight of a structure:

- head ``h`` of layer ``l``: the ``head_dim`` rows of head ``h`` in ``q_proj``, ``k_proj``, ``v_proj`` and the
  ``head_dim`` columns of head ``h`` in ``o_proj``;
- MLP channel ``c``: row ``c`` of ``gate_proj`` and ``up_proj`` and column ``c`` of ``down_proj``.

Pruning at ratio ``r``: in every layer, the ``round(r * H)`` heads and ``round(r * F)`` channels with the lowest
scores (ties by index) are **zeroed** -- not removed, so the model keeps its shapes and every tool of the kit
reads it. The unit sparsities are the realised ones (``k / H`` for ``lm.{i}.attn``, ``k / F`` for
``lm.{i}.mlp``; every weight of a zeroed structure is zero, so the measured sparsity equals them exactly) and
the FLOP model (:mod:`ellava_lib.speed.flops`, ``2 n_u (1 - s_u)`` per unit) counts them as they are; the
attention-score FLOPs of removed heads stay counted (conservative). The mean sparsity can miss the target by up
to half a head / channel per layer; the policy's ``meta`` records target and realised mean.

Deviations from LLM-Pruner: its scripts prune only layers 4..30 of the 7B (``--block_*_layer_start 4
--block_*_layer_end 30``) at a higher ratio there; here every decoder layer gets the ratio, so the parameter
budget is the one the other baselines meet. The vision tower is not pruned (LLM-Pruner prunes the LLM).
Grouped-query attention (fewer KV heads than heads) is not supported: the tiny models and LLaVA-1.5-7B have
``num_key_value_heads == num_attention_heads``.
"""

from __future__ import annotations

import torch
from torch import nn

from ellava_lib.core.policy import DEFAULT_GRID, Policy, weighted_mean
from ellava_lib.core.units import list_units, lm_layers
from ellava_lib.model.losses import model_inputs

#: The method's name in the sweep and the CLI.
METHOD = "llm_pruner"


def _heads(model: nn.Module) -> tuple[int, int]:
    """``(num_heads, head_dim)`` of the language model; raises for grouped-query attention."""
    t = model.config.text_config
    heads = t.num_attention_heads
    kv = getattr(t, "num_key_value_heads", None) or heads
    if kv != heads:
        raise NotImplementedError(f"grouped-query attention ({kv} KV heads for {heads} heads) is not supported")
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // heads
    return heads, head_dim


def _counts(model: nn.Module, ratio: float) -> tuple[int, int, int, int]:
    """``(H, k_heads, F, k_channels)``: heads and channels per layer and how many ``ratio`` zeroes."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"structured pruning ratio must be in [0, 1], got {ratio}")
    heads, _ = _heads(model)
    ff = model.config.text_config.intermediate_size
    return heads, int(round(ratio * heads)), ff, int(round(ratio * ff))


def structured_policy(model: nn.Module, sparsity: float) -> Policy:
    """The policy LLM-Pruner at ratio ``sparsity`` realises: ``lm.{i}.attn`` at ``round(r H) / H``,
    ``lm.{i}.mlp`` at ``round(r F) / F`` in every layer (language model only)."""
    heads, kh, ff, kc = _counts(model, sparsity)
    sizes = list_units(model)
    sp = {u: (kh / heads if u.endswith(".attn") else kc / ff) for u in sizes}
    meta = {"method": METHOD, "target": sparsity, "heads_pruned": kh, "heads": heads, "channels_pruned": kc,
            "channels": ff, "mean_sparsity": weighted_mean(sp, sizes), "structured": True}
    return Policy(sp, tuple(sorted(set(DEFAULT_GRID) | set(sp.values()))), meta)


def taylor_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per unit: ``lm.{i}.attn`` -> ``(H,)`` head scores, ``lm.{i}.mlp`` -> ``(F,)`` channel scores,
    ``sum |w * dL/dw|`` over each structure's weights (see the module docstring), from one backward pass.
    Only the decoder linears get gradients; the gradients are dropped afterwards."""
    heads, hd = _heads(model)
    layers = lm_layers(model)
    params = [p for layer in layers for p in (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                                              layer.self_attn.v_proj.weight, layer.self_attn.o_proj.weight,
                                              layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight,
                                              layer.mlp.down_proj.weight)]
    was = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.eval()
        loss = model(**model_inputs(batch), labels=batch["labels"], use_cache=False).loss
        grads = torch.autograd.grad(loss, params)
    finally:
        for p in model.parameters():
            p.requires_grad_(was[id(p)])
        model.train(was_training)
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        g = grads[7 * i:7 * i + 7]
        sal = [(w.detach().float() * gw.float()).abs() for w, gw in zip(params[7 * i:7 * i + 7], g)]
        q, k, v, o, gate, up, down = sal
        per_head = (q.sum(1) + k.sum(1) + v.sum(1)).view(heads, hd).sum(1) + o.sum(0).view(heads, hd).sum(1)
        out[f"lm.{i}.attn"] = per_head
        out[f"lm.{i}.mlp"] = gate.sum(1) + up.sum(1) + down.sum(0)
    return out


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.argsort(scores, stable=True)[:k]


@torch.no_grad()
def structured_prune(model: nn.Module, policy: Policy, batch: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Zero, in every layer, the lowest-scoring heads and MLP channels (:func:`taylor_scores`): as many as the
    policy's unit sparsity times the layer's heads / channels (rounded). Returns the zeroed indices per unit."""
    heads, hd = _heads(model)
    ff = model.config.text_config.intermediate_size
    with torch.enable_grad():
        scores = taylor_scores(model, batch)
    removed: dict[str, list[int]] = {}
    for i, layer in enumerate(lm_layers(model)):
        attn, mlp = f"lm.{i}.attn", f"lm.{i}.mlp"
        kh = int(round(policy.sparsities[attn] * heads))
        kc = int(round(policy.sparsities[mlp] * ff))
        hs = _lowest(scores[attn], kh).tolist()
        for h in hs:
            rows = slice(h * hd, (h + 1) * hd)
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.weight[rows] = 0
                if lin.bias is not None:
                    lin.bias[rows] = 0
            layer.self_attn.o_proj.weight[:, rows] = 0
        cs = _lowest(scores[mlp], kc)
        layer.mlp.gate_proj.weight[cs] = 0
        layer.mlp.up_proj.weight[cs] = 0
        layer.mlp.down_proj.weight[:, cs] = 0
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
            if lin.bias is not None:
                lin.bias[cs] = 0
        removed[attn], removed[mlp] = sorted(hs), sorted(cs.tolist())
    return removed

