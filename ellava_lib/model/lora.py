"""LoRA adapters on a LLaVA decoder's linear layers (through ``peft``), and their merge back into plain weights.

A LoRA adapter (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3) leaves a frozen
weight ``W`` (``d_out x d_in``) and learns ``B`` (``d_out x r``, initialised to zero) and ``A`` (``r x d_in``,
Kaiming-uniform), so the layer computes ``y = W x + (alpha / r) B A x``. Merging writes

    W' = W + (alpha / r) B A

into the weight and drops ``A`` and ``B``: the merged layer is a plain ``nn.Linear`` computing the same function.
The smol tier (:meth:`ellava_lib.model.train_config.TrainConfig.smol`) tunes SmolLM2 this way and merges before anything
is pruned, so pruning and evaluation see a plain ``LlamaForCausalLM`` inside the LLaVA; the adapters (a few MB)
are what ships in git (:mod:`ellava_lib.model.shipped`), not the 135M tuned weights.

``peft`` is the smol extra's; it is imported only when adapters are added or merged.
"""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration

#: Every linear layer of a Llama decoder block (attention and MLP): the modules the smol recipe adapts.
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: The substring peft gives every adapter parameter's name.
MARK = "lora_"


def add_adapters(model: LlavaForConditionalGeneration, rank: int, alpha: float,
                 modules: tuple[str, ...] = DECODER_LINEARS) -> list[torch.nn.Parameter]:
    """Inject rank-``rank`` LoRA adapters with scale ``alpha / rank`` into the decoder's ``modules`` (in place,
    ``peft.inject_adapter_in_model``; no dropout, no bias). ``A`` is drawn from torch's global generator as it
    stands (the caller seeds it). Every other decoder parameter, the embeddings included, is frozen
    (``requires_grad`` off); the vision tower and projector are untouched. Returns the adapter parameters."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    unknown = sorted(set(modules) - set(DECODER_LINEARS))
    if unknown:
        raise ValueError(f"unknown LoRA target modules {unknown}; choose from {', '.join(DECODER_LINEARS)}")
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(modules), lora_dropout=0.0, bias="none")
    inject_adapter_in_model(config, model.model.language_model)
    return adapter_parameters(model)


def adapter_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The adapter parameters of ``model``, in module order (empty when it has none)."""
    return [p for n, p in model.named_parameters() if MARK in n]


def has_adapters(model: torch.nn.Module) -> bool:
    return any(MARK in n for n, _ in model.named_parameters())


def merge_adapters(model: torch.nn.Module) -> int:
    """Merge every LoRA adapter of ``model`` into its base weight (``W' = W + (alpha / r) B A``, peft's
    ``LoraLayer.merge``) and put the plain base ``nn.Linear`` back in its place; every parameter trainable again.
    Returns the number of layers merged (0 when there were no adapters)."""
    if not has_adapters(model):
        return 0
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
            merged += 1
    for p in model.parameters():
        p.requires_grad_(True)
    return merged
