"""The one module that knows LLaVA's layer names: prunable units and their linear layers.

A *unit* is a group of linear layers sharing one sparsity. Two kinds (:data:`UNIT_KINDS`):

* ``block`` (the default): per language-model decoder block ``lm.{i}.attn = {q,k,v,o}_proj`` and
  ``lm.{i}.mlp = {gate,up,down}_proj``; optionally per vision block ``vision.{i}.attn = {q,k,v,out}_proj`` and
  ``vision.{i}.mlp = {fc1,fc2}``;
* ``matrix``: one unit per weight matrix, named by its linear layer (``lm.3.self_attn.q_proj``); its *block unit*
  (:func:`block_unit`) is the block unit holding it (``lm.3.attn``).

A policy names units of one kind; :func:`policy_linears` resolves it to linear layers, the one answer every
pruning, assembly and accounting path takes to "which sparsity does linear ``L`` get under policy ``P``". Works
for every tier, because each is a ``transformers`` ``LlavaForConditionalGeneration``; so does a user's llava-hf
checkpoint whose decoder is one of :data:`DECODERS`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
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
#: What a unit is: a block's group of linears (``lm.3.attn``) or one weight matrix (``lm.3.self_attn.q_proj``).
UNIT_KINDS: tuple[str, ...] = ("block", "matrix")


def is_vision_unit(unit: str) -> bool:
    """Whether ``unit`` names a block of the vision tower (``vision.{i}.attn`` / ``vision.{i}.mlp``)."""
    return unit.startswith("vision.")


def names_vision(units: Iterable[str]) -> bool:
    """Whether any of the unit names ``units`` (a policy's sparsities, budget weights, ...) is a vision-tower
    unit, i.e. whether the vision blocks must be walked too (``include_vision``)."""
    return any(is_vision_unit(u) for u in units)


def block_unit(unit: str) -> str:
    """The block unit a unit belongs to: a matrix unit ``lm.3.self_attn.q_proj`` -> ``lm.3.attn``,
    ``vision.0.mlp.fc2`` -> ``vision.0.mlp``; any other name (a block unit) is its own."""
    parts = unit.split(".", 2)
    if len(parts) == 3:
        prefix, i, rest = parts
        for group, names in {"lm": LM_GROUPS, "vision": VISION_GROUPS}.get(prefix, {}).items():
            if rest in names:
                return f"{prefix}.{i}.{group}"
    return unit


def is_matrix_unit(unit: str) -> bool:
    """Whether ``unit`` names one weight matrix (a linear layer of :data:`LM_GROUPS` / :data:`VISION_GROUPS`)."""
    return block_unit(unit) != unit


def unit_kind(units: Iterable[str]) -> str:
    """The kind (:data:`UNIT_KINDS`) of the unit names ``units`` (a policy's sparsities, budget weights, ...):
    ``matrix`` when they name weight matrices, ``block`` otherwise (and for none); ``ValueError`` for a mix."""
    kinds = {"matrix" if is_matrix_unit(u) else "block" for u in units}
    if len(kinds) > 1:
        raise ValueError("the units mix block units (lm.0.attn) and matrix units (lm.0.self_attn.q_proj); "
                         "a policy names units of one kind")
    return kinds.pop() if kinds else "block"


def unit_matrices(unit: str) -> list[str]:
    """The matrix units of ``unit``: for a block unit its linears' names in :data:`LM_GROUPS` /
    :data:`VISION_GROUPS` order (``lm.3.attn`` -> ``lm.3.self_attn.q_proj``, ..., ``lm.3.self_attn.o_proj``), for
    a matrix unit itself."""
    prefix, _, rest = unit.partition(".")
    i, _, group = rest.partition(".")
    names = {"lm": LM_GROUPS, "vision": VISION_GROUPS}.get(prefix, {}).get(group)
    return [f"{prefix}.{i}.{n}" for n in names] if names else [unit]


def to_kind(sparsities: Mapping[str, float], kind: str) -> dict[str, float]:
    """A block-unit allocation (``{unit: s}``) as units of ``kind``: unchanged for ``block``, and for ``matrix``
    every matrix of a unit at the unit's sparsity (:func:`unit_matrices`; the weighted mean, hence the budget, is
    the block policy's)."""
    _check_kind(kind)
    if kind == "block":
        return dict(sparsities)
    return {m: s for u, s in sparsities.items() for m in unit_matrices(u)}


def _check_kind(kind: str) -> str:
    if kind not in UNIT_KINDS:
        raise ValueError(f"unit kind must be one of {', '.join(UNIT_KINDS)}, got {kind!r}")
    return kind


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


def unit_linears(model: nn.Module, include_vision: bool = False,
                 kind: str = "block") -> "OrderedDict[str, dict[str, nn.Linear]]":
    """Units of ``kind`` (:data:`UNIT_KINDS`) in depth order (vision first, then language model), each mapping a
    layer name to its Linear: ``block`` units map their group's linears, ``matrix`` units their one linear (the
    unit name is the layer name)."""
    _check_kind(kind)
    out: OrderedDict[str, dict[str, nn.Linear]] = OrderedDict()
    blocks = [("lm", lm_layers(model), LM_GROUPS)]
    if include_vision:
        blocks.insert(0, ("vision", vision_layers(model), VISION_GROUPS))
    for prefix, layers, groups in blocks:
        for i, block in enumerate(layers):
            for group, names in groups.items():
                lins = {f"{prefix}.{i}.{n}": block.get_submodule(n) for n in names}
                if kind == "block":
                    out[f"{prefix}.{i}.{group}"] = lins
                else:
                    out.update((name, {name: lin}) for name, lin in lins.items())
    return out


def list_units(model: nn.Module, include_vision: bool = False, kind: str = "block") -> "OrderedDict[str, int]":
    """Unit name -> number of prunable weights (sum of its linears' weight sizes), units of ``kind`` in depth
    order (:func:`unit_linears`)."""
    return OrderedDict((u, sum(lin.weight.numel() for lin in lins.values()))
                       for u, lins in unit_linears(model, include_vision, kind).items())


def policy_linears(model: nn.Module, sparsities: Iterable[str]) -> "OrderedDict[str, dict[str, nn.Linear]]":
    """The units of the kind the names ``sparsities`` (a policy's) are of (:func:`unit_kind`), the vision tower's
    too when they name one, each mapping its layers to their Linear (:func:`unit_linears`): under a policy ``P``
    every linear of ``policy_linears(model, P.sparsities)[u]`` gets ``P.sparsities[u]``."""
    names = list(sparsities)
    return unit_linears(model, names_vision(names), unit_kind(names))


def policy_units(model: nn.Module, sparsities: Iterable[str]) -> "OrderedDict[str, int]":
    """Unit name -> prunable weights of the units :func:`policy_linears` resolves ``sparsities`` to: what a policy
    is validated against and its budget weighs (:meth:`Policy.validate`, :meth:`Policy.mean_sparsity`)."""
    return OrderedDict((u, sum(lin.weight.numel() for lin in lins.values()))
                       for u, lins in policy_linears(model, sparsities).items())


def layer_sparsities(model: nn.Module, sparsities: Mapping[str, float]) -> dict[str, float]:
    """``{layer name: its sparsity}`` under the policy ``sparsities`` (:func:`policy_linears`), in depth order."""
    return {name: float(sparsities[u]) for u, lins in policy_linears(model, sparsities).items() for name in lins}


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
