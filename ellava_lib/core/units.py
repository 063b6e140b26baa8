"""The one module that knows LLaVA's layer names: prunable units and their linear layers.

A *unit* is a group of linear layers sharing one sparsity: per language-model decoder block
``lm.{i}.attn = {q,k,v,o}_proj`` and ``lm.{i}.mlp = {gate,up,down}_proj``; optionally per vision block
``vision.{i}.attn = {q,k,v,out}_proj`` and ``vision.{i}.mlp = {fc1,fc2}``. Works for every tier, because
each is a ``transformers`` ``LlavaForConditionalGeneration``; so does a user's llava-hf checkpoint whose decoder is
one of :data:`DECODERS`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig

LM_GROUPS = {"attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
             "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
#: Decoder architectures (``text_config.model_type``) whose blocks have :data:`LM_GROUPS`' layers: Llama (LLaVA-1.5,
#: SmolLM2), Mistral (the Mistral-based LLaVA variants) and Qwen2 (``llava-interleave-qwen``; its q/k/v biases are
#: kept, only the weights are pruned).
DECODERS = ("llama", "mistral", "qwen2")
VISION_GROUPS = {"attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
                 "mlp": ("mlp.fc1", "mlp.fc2")}


def is_vision_unit(unit: str) -> bool:
    """Whether ``unit`` names a block of the vision tower (``vision.{i}.attn`` / ``vision.{i}.mlp``)."""
    return unit.startswith("vision.")


def names_vision(units: Iterable[str]) -> bool:
    """Whether any of the unit names ``units`` (a policy's sparsities, budget weights, ...) is a vision-tower
    unit, i.e. whether the vision blocks must be walked too (``include_vision``)."""
    return any(is_vision_unit(u) for u in units)


def check_decoder(config: PretrainedConfig) -> None:
    """A one-line ``ValueError`` unless the LLaVA ``config``'s language model (``text_config.model_type``) is one
    of :data:`DECODERS`, whose blocks have the layer names of :data:`LM_GROUPS` (a GPT-2 or Phi decoder has
    others). The message names the supported architectures."""
    kind = getattr(getattr(config, "text_config", None), "model_type", None)
    if kind not in DECODERS:
        raise ValueError(f"unsupported language model {kind!r} in this LLaVA: ellava prunes decoders of the "
                         f"architectures {', '.join(DECODERS)} (text_config.model_type)")


def lm_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of the language model (:func:`check_decoder` first)."""
    check_decoder(model.config)
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
    and the LM head; an LM head tied to the input embeddings, as SmolLM2's, is one tensor and counted once),
    and their total."""
    inner = model.model
    out = {"vision": _numel(inner.vision_tower.parameters()),
           "projector": _numel(inner.multi_modal_projector.parameters()),
           "language_model": _numel([*inner.language_model.parameters(), *model.lm_head.parameters()])}
    out["total"] = sum(out.values())
    return out


def _numel(params: Iterable[nn.Parameter]) -> int:
    """Number of elements of the distinct tensors among ``params`` (a tensor listed twice counts once)."""
    return sum(p.numel() for p in {id(p): p for p in params}.values())
