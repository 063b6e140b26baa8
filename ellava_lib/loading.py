"""Resolve a model spec (``tiny`` or a folder) to a ``(model, processor)`` pair, with one-line errors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

from .train import TrainConfig, build_or_load

BUILTIN = {"tiny": TrainConfig}
#: Hub checkpoints the kit knows by a short name (the paper tier).
HUB_MODELS = {"llava-1.5-7b": "llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-7b-hf": "llava-hf/llava-1.5-7b-hf"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """A model folder that cannot be loaded (missing config, corrupt weights, ...)."""


def resolve_model_dir(spec: str | Path, progress: bool = True) -> Path:
    """``tiny`` -> the cached tiny model (built if missing); anything else must be a model folder."""
    if str(spec) in BUILTIN:
        return build_or_load(BUILTIN[str(spec)](), progress=progress)
    path = Path(spec)
    if not path.is_dir():
        raise ModelLoadError(f"model {spec!r} is neither a built-in model ({', '.join(BUILTIN)}), a hub model "
                             f"({', '.join(sorted(HUB_MODELS))}) nor a folder")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder {path} has no config.json")
    return path


def load_pretrained(repo: str, dtype: str = "float16", revision: str | None = None,
                    device_map: str | None = None) -> tuple[LlavaForConditionalGeneration, object]:
    """A hub (or local ``save_pretrained``) LLaVA checkpoint in ``dtype``: safetensors only, never remote code.

    The weights stay on the CPU unless ``device_map`` says otherwise: pruning and database building then
    move one decoder block at a time to the GPU (``device=`` of :func:`prune.prune_model`,
    :func:`leveldb.build_level_db`), and Hessians are accumulated in fp32 whatever ``dtype``.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            repo, revision=revision, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=False,
            low_cpu_mem_usage=True, device_map=device_map)
        processor = AutoProcessor.from_pretrained(repo, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load {repo!r} (needs the Hugging Face hub or a local copy): {first}") from None
    model.eval()
    return model, processor


def load_model(spec: str | Path, progress: bool = True, dtype: str = "float16",
               revision: str | None = None) -> tuple[LlavaForConditionalGeneration, object]:
    """Load weights (safetensors only, never remote code) and the processor from a model spec: ``tiny``,
    a model folder, or a hub name of :data:`HUB_MODELS` (``llava-1.5-7b``; loaded in ``dtype``)."""
    if str(spec) in HUB_MODELS:
        return load_pretrained(HUB_MODELS[str(spec)], dtype, revision)
    path = resolve_model_dir(spec, progress)
    try:
        config = LlavaConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {e}") from None
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(f"model folder {path} has no .safetensors weights")
    state = {}
    for w in weights:
        try:
            state.update(load_file(w))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"corrupted weights file {w}: {e}") from None
    model = LlavaForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(_remap(state, model), strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ModelLoadError(f"weights in {path} do not match its config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    model.eval()
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the processor in {path}: {e}") from None
    return model, processor


# transformers 5 ``save_pretrained`` writes LLaVA in the legacy 4.x key layout: map those prefixes back.
_LEGACY_PREFIXES = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."))


def _remap(state: dict, model) -> dict:
    """Accept both the saved key layout and the model's own (``save_pretrained`` may rename keys)."""
    own = set(model.state_dict())
    if set(state) <= own:
        return state
    out = {}
    for k, v in state.items():
        legacy = [new + k[len(old):] for old, new in _LEGACY_PREFIXES if k.startswith(old)]
        for cand in (k, f"model.{k}", k.replace("model.", "", 1), *legacy):
            if cand in own:
                out[cand] = v
                break
        else:
            out[k] = v
    return out
