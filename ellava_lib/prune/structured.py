"""LLM-Pruner-style structured pruning (Ma et al., "LLM-Pruner: On the Structural Pruning of Large Language
Models", NeurIPS 2023; horseee/LLM-Pruner): attention groups and MLP channels ranked by first-order Taylor
importance, the same counts in every decoder layer, no recovery tuning.

**Structures.** Per decoder layer with ``H`` query heads, ``K`` key/value heads (``K = H`` without grouped-query
attention), ``G = H / K`` query heads per KV head, head width ``d_h``, hidden size ``d`` and ``F`` MLP channels:

- attention **group** ``j`` (``0 <= j < K``): KV head ``j`` and the ``G`` query heads that read it
  (``jG .. jG + G - 1``: transformers' ``repeat_kv`` gives query head ``h`` the KV head ``h // G``), i.e. rows
  ``j G d_h .. (j + 1) G d_h`` of ``q_proj``, rows ``j d_h .. (j + 1) d_h`` of ``k_proj`` and ``v_proj``, and
  columns ``j G d_h .. (j + 1) G d_h`` of ``o_proj``. Without GQA (``G = 1``) a group is one head.
- MLP **channel** ``c``: row ``c`` of ``gate_proj`` and ``up_proj`` and column ``c`` of ``down_proj``.

Grouped-query attention is handled as LLM-Pruner's GQA script does (``llama3.py``: the root of every attention
dependency group is ``k_proj`` with ``consecutive_groups = head_dim``, and the dependency graph's expand mapping
carries a removed KV head to the query heads that read it): a KV group is scored and removed **together with its
query heads** (removing query heads inside a group, each group keeping its KV head, would be finer, ``2 d_h d``
weights a head, but it is not what the reference prunes).

**Importance** (LLM-Pruner's ``TaylorImportance``, ``taylor = param_first``, group reduction ``sum``): from one
backward pass of the calibration loss ``L`` (here the answer cross-entropy of the calibration batch, HF's
``labels`` loss; LLM-Pruner uses the LM loss of its calibration text), the first-order Taylor salience of a
structure ``S``::

    I(S) = sum_{w in S} |w * dL/dw|

(element saliences summed over every weight of the group or channel, as listed above; :func:`group_scores`,
:func:`channel_scores`).

**Accounting** (weights of the decoder linears, biases not counted, as :func:`units.list_units`). A group frees
``P_g = (2 G + 2) d_h d`` weights (``G d_h d`` in ``q_proj`` and in ``o_proj``, ``d_h d`` in ``k_proj`` and in
``v_proj``) out of the attention unit's ``A = K P_g``, so removing ``n_g`` groups sets ``lm.{i}.attn`` to
sparsity ``n_g / K`` in each of its four linears; a channel frees ``P_c = 3 d`` of the MLP unit's ``M = F P_c``
(sparsity ``n_c / F``). The FLOP model (:mod:`ellava_lib.speed.flops`, ``2 n_u (1 - s_u)`` per unit) counts
exactly the zeroed weights; the attention-score FLOPs of removed heads stay counted (conservative). SmolLM2-135M
(``H = 9, K = 3, G = 3, d_h = 64, d = 576, F = 1536``): ``P_g = 294,912`` (a third of the attention unit),
``P_c = 1,728``, ``A + M = 3,538,944`` weights a layer. MHA (tiny, LLaVA-1.5-7B): a head frees ``4 d_h d``.

**Budget** at target ``r`` (the parameter-weighted mean sparsity of the decoder linears; every layer has the same
shapes, so meeting it in one layer meets it in all), :func:`prune_counts`:

1. ``n_g = floor(r K)`` groups per layer (LLM-Pruner's count: it keeps ``int(K d_h (1 - r))`` channels of
   ``k_proj`` and prunes whole multiples of ``d_h`` of the rest);
2. ``n_c = round_half_up((r (A + M) - n_g P_g) / P_c)`` channels, clipped to ``[0, F]``: the MLP takes up what
   the coarse attention groups leave (a deviation from LLM-Pruner, which gives the MLP the ratio ``r`` as well and
   so misses the budget by up to a group per layer).

The realised mean is then within ``P_c / (2 (A + M))`` of ``r`` (half a channel a layer: ``2.4e-4`` on SmolLM2,
the kit's budget tolerance is ``0.002``) unless the clip binds, which needs ``1 - r < P_g / M`` (``r > 0.889``
on SmolLM2). E.g.
SmolLM2 at ``r = 0.5``: 1 group (attention 1/3) and 853 channels (MLP 0.5553), mean 0.49984; at ``0.6``: 1 and
1058, 0.59994; at ``0.7``: 2 and 1092, 0.69987. The policy's unit sparsities are the realised ones and its
``meta`` records target and realised mean.

Pruning **zeroes** the structures (not removed: the model keeps its shapes and every tool of the kit reads it; a
zeroed group contributes nothing, its keys give uniform scores over zero values and its ``o_proj`` columns are
zero). Deviations from LLM-Pruner besides the MLP's share: its scripts prune only layers 4..30 of the 7B
(``--block_*_layer_start 4 --block_*_layer_end 30``) at a higher ratio there; here every decoder layer gets the
counts, so the parameter budget is the one the other baselines meet. The vision tower is not pruned (LLM-Pruner
prunes the LLM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ellava_lib.core.policy import DEFAULT_GRID, Policy, weighted_mean
from ellava_lib.core.units import list_units, lm_layers
from ellava_lib.model.losses import model_inputs

#: The method's name in the sweep and the CLI.
METHOD = "llm_pruner"
#: Slack for ``floor(r K)`` against binary rounding (``0.3 * 10`` is ``3.0000000000000004``).
_EPS = 1e-9


@dataclass(frozen=True)
class Shape:
    """One decoder layer's prunable structures (every layer has the same): ``heads`` ``H``, ``kv_heads`` ``K``,
    ``head_dim`` ``d_h``, ``hidden`` ``d``, ``channels`` ``F`` (module docstring)."""

    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    channels: int

    def __post_init__(self) -> None:
        if self.kv_heads < 1 or self.heads % self.kv_heads:
            raise ValueError(f"{self.heads} query heads cannot share {self.kv_heads} key/value heads evenly")

    @property
    def group(self) -> int:
        """``G = H / K``: the query heads that read one KV head."""
        return self.heads // self.kv_heads

    @property
    def group_params(self) -> int:
        """``P_g = (2 G + 2) d_h d``: the weights one attention group frees."""
        return (2 * self.group + 2) * self.head_dim * self.hidden

    @property
    def channel_params(self) -> int:
        """``P_c = 3 d``: the weights one MLP channel frees."""
        return 3 * self.hidden

    @property
    def layer_params(self) -> int:
        """``A + M = K P_g + F P_c``: the decoder linears' weights of one layer."""
        return self.kv_heads * self.group_params + self.channels * self.channel_params


def shape_of(model: nn.Module) -> Shape:
    """The :class:`Shape` of the language model's decoder layers (from its config)."""
    t = model.config.text_config
    heads = t.num_attention_heads
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // heads
    return Shape(heads, getattr(t, "num_key_value_heads", None) or heads, head_dim, t.hidden_size,
                 t.intermediate_size)


def prune_counts(shape: Shape, ratio: float) -> tuple[int, int]:
    """``(n_g, n_c)`` per layer at target ``ratio`` ``r``: ``n_g = floor(r K)`` groups, then
    ``n_c = round_half_up((r (A + M) - n_g P_g) / P_c)`` channels clipped to ``[0, F]`` (module docstring)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"structured pruning ratio must be in [0, 1], got {ratio}")
    groups = math.floor(ratio * shape.kv_heads + _EPS)
    need = ratio * shape.layer_params - groups * shape.group_params
    channels = math.floor(need / shape.channel_params + 0.5)
    return groups, min(shape.channels, max(0, channels))


def structured_policy(model: nn.Module, sparsity: float) -> Policy:
    """The policy LLM-Pruner at target ``sparsity`` realises (:func:`prune_counts`): ``lm.{i}.attn`` at
    ``n_g / K``, ``lm.{i}.mlp`` at ``n_c / F`` in every layer (language model only)."""
    shape = shape_of(model)
    groups, channels = prune_counts(shape, sparsity)
    sizes = list_units(model)
    sp = {u: (groups / shape.kv_heads if u.endswith(".attn") else channels / shape.channels) for u in sizes}
    meta = {"method": METHOD, "target": sparsity, "groups_pruned": groups, "groups": shape.kv_heads,
            "heads_pruned": groups * shape.group, "heads": shape.heads, "channels_pruned": channels,
            "channels": shape.channels, "mean_sparsity": weighted_mean(sp, sizes), "structured": True}
    return Policy(sp, tuple(sorted(set(DEFAULT_GRID) | set(sp.values()))), meta)


def group_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(K,)`` attention-group importances from the element saliences ``|w * dL/dw|`` of one layer's
    ``q_proj`` ``(H d_h, d)``, ``k_proj`` / ``v_proj`` ``(K d_h, d)`` and ``o_proj`` ``(d, H d_h)``: group ``j``
    sums its query rows, key and value rows and output columns (module docstring)."""
    rows = q.sum(1).view(kv_heads, -1).sum(1) + k.sum(1).view(kv_heads, -1).sum(1) + v.sum(1).view(kv_heads, -1).sum(1)
    return rows + o.sum(0).view(kv_heads, -1).sum(1)


def channel_scores(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``(F,)`` MLP-channel importances from the element saliences of ``gate_proj`` / ``up_proj`` ``(F, d)`` and
    ``down_proj`` ``(d, F)``: channel ``c`` sums row ``c``, row ``c`` and column ``c``."""
    return gate.sum(1) + up.sum(1) + down.sum(0)


def _layer_weights(layer: nn.Module) -> list[torch.Tensor]:
    a, m = layer.self_attn, layer.mlp
    return [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight, m.gate_proj.weight,
            m.up_proj.weight, m.down_proj.weight]


def _gradients(model: nn.Module, batch: dict[str, torch.Tensor], params: list[torch.Tensor]) -> tuple:
    """``dL/dw`` of the calibration loss for ``params`` only (one backward in eval mode); the model's
    ``requires_grad`` flags and mode are restored and no ``.grad`` is left behind."""
    was = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.eval()
        with torch.enable_grad():
            loss = model(**model_inputs(batch), labels=batch["labels"], use_cache=False).loss
            return torch.autograd.grad(loss, params)
    finally:
        for p in model.parameters():
            p.requires_grad_(was[id(p)])
        model.train(was_training)


def taylor_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per unit: ``lm.{i}.attn`` -> ``(K,)`` group scores (:func:`group_scores`; one per head without GQA),
    ``lm.{i}.mlp`` -> ``(F,)`` channel scores (:func:`channel_scores`), each ``sum |w * dL/dw|`` over the
    structure's weights, from one backward pass. Only the decoder linears get gradients."""
    kv = shape_of(model).kv_heads
    layers = lm_layers(model)
    params = [w for layer in layers for w in _layer_weights(layer)]
    grads = _gradients(model, batch, params)
    out: dict[str, torch.Tensor] = {}
    for i in range(len(layers)):
        sal = [(w.detach().float() * g.float()).abs() for w, g in zip(params[7 * i:7 * i + 7], grads[7 * i:7 * i + 7])]
        out[f"lm.{i}.attn"] = group_scores(*sal[:4], kv)
        out[f"lm.{i}.mlp"] = channel_scores(*sal[4:])
    return out


def _lowest(scores: torch.Tensor, k: int) -> list[int]:
    """The ``k`` lowest scores' indices (ties by index), ascending."""
    return sorted(torch.argsort(scores, stable=True)[:k].tolist())


def zero_group(layer: nn.Module, shape: Shape, j: int) -> None:
    """Zero attention group ``j`` of ``layer`` in place: its query rows, key and value rows (and biases) and its
    ``o_proj`` columns."""
    a = layer.self_attn
    qs = slice(j * shape.group * shape.head_dim, (j + 1) * shape.group * shape.head_dim)
    kvs = slice(j * shape.head_dim, (j + 1) * shape.head_dim)
    for lin, rows in ((a.q_proj, qs), (a.k_proj, kvs), (a.v_proj, kvs)):
        lin.weight[rows] = 0
        if lin.bias is not None:
            lin.bias[rows] = 0
    a.o_proj.weight[:, qs] = 0


def zero_channels(layer: nn.Module, channels: list[int]) -> None:
    """Zero MLP ``channels`` of ``layer`` in place: their ``gate_proj`` / ``up_proj`` rows (and biases) and
    ``down_proj`` columns."""
    m = layer.mlp
    for lin in (m.gate_proj, m.up_proj):
        lin.weight[channels] = 0
        if lin.bias is not None:
            lin.bias[channels] = 0
    m.down_proj.weight[:, channels] = 0


@torch.no_grad()
def structured_prune(model: nn.Module, policy: Policy, batch: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Zero, in every layer, the lowest-scoring attention groups and MLP channels (:func:`taylor_scores`): as many
    as the policy's unit sparsity times the layer's ``K`` groups / ``F`` channels (rounded). Returns the zeroed
    indices per unit (groups for ``lm.{i}.attn``: query heads ``jG .. jG + G - 1`` each)."""
    shape = shape_of(model)
    scores = taylor_scores(model, batch)
    removed: dict[str, list[int]] = {}
    for i, layer in enumerate(lm_layers(model)):
        attn, mlp = f"lm.{i}.attn", f"lm.{i}.mlp"
        groups = _lowest(scores[attn], round(policy.sparsities[attn] * shape.kv_heads))
        channels = _lowest(scores[mlp], round(policy.sparsities[mlp] * shape.channels))
        for j in groups:
            zero_group(layer, shape, j)
        zero_channels(layer, channels)
        removed[attn], removed[mlp] = groups, channels
    return removed
