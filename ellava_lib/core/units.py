"""The one module that knows LLaVA's layer names: prunable units and their linear layers.

A *unit* is a group of linear layers sharing one sparsity: per language-model decoder block
``lm.{i}.attn = {q,k,v,o}_proj`` and ``lm.{i}.mlp = {gate,up,down}_proj``; optionally per vision block
``vision.{i}.attn = {q,k,v,out}_proj`` and ``vision.{i}.mlp = {fc1,fc2}``. Works for every tier, because
each is a ``transformers`` ``LlavaForConditionalGeneration``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from torch import nn

LM_GROUPS = {"attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
             "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
VISION_GROUPS = {"attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
                 "mlp": ("mlp.fc1", "mlp.fc2")}


def is_vision_unit(unit: str) -> bool:
    """Whether ``unit`` names a block of the vision tower (``vision.{i}.attn`` / ``vision.{i}.mlp``)."""
    return unit.startswith("vision.")


def names_vision(units: Iterable[str]) -> bool:
    """Whether any of the unit names ``units`` (a policy's sparsities, budget weights, ...) is a vision-tower
    unit, i.e. whether the vision blocks must be walked too (``include_vision``)."""
    return any(is_vision_unit(u) for u in units)


def lm_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of the language model."""
    return model.model.language_model.layers


def vision_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder blocks of the CLIP vision tower (``transformers`` 5 flattens ``vision_model`` away)."""
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers


def unit_linears(model: nn.Module, include_vision: bool = False) -> "OrderedDict[str, dict[str, nn.Linear]]":
    """Units in depth order (vision first, then language model), each mapping a layer name to its Linear."""
    out: OrderedDict[str, dict[str, nn.Linear]] = OrderedDict()
    blocks = [("lm", lm_layers(model), LM_GROUPS)]
    if include_vision:
        blocks.insert(0, ("vision", vision_layers(model), VISION_GROUPS))
    for prefix, layers, groups in blocks:
        for i, block in enumerate(layers):
            for group, names in groups.items():
                out[f"{prefix}.{i}.{group}"] = {f"{prefix}.{i}.{n}": block.get_submodule(n) for n in names}
    return out


def list_units(model: nn.Module, include_vision: bool = False) -> "OrderedDict[str, int]":
    """Unit name -> number of prunable weights (sum of its linears' weight sizes)."""
    return OrderedDict((u, sum(lin.weight.numel() for lin in lins.values()))
                       for u, lins in unit_linears(model, include_vision).items())


def params_by_component(model: nn.Module) -> dict[str, int]:
    """Parameter counts of the vision tower, the projector and the language model (incl. embeddings
    and the LM head), and their total."""
    inner = model.model
    out = {"vision": sum(p.numel() for p in inner.vision_tower.parameters()),
           "projector": sum(p.numel() for p in inner.multi_modal_projector.parameters()),
           "language_model": sum(p.numel() for p in inner.language_model.parameters())
           + sum(p.numel() for p in model.lm_head.parameters())}
    out["total"] = sum(out.values())
    return out
