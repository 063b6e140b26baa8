"""Loading and saving LLaVA models: hub checkpoints, model folders (safetensors only), ``save`` of any model, with
one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import (
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from ellava_lib.core import files


def save(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out: Path, extra: dict | None = None) -> None:
    """Save weights (safetensors), config and processor into ``out``; ``extra`` goes to ``ellava.json``."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    if extra is not None:
        files.write_text(out / "ellava.json", json.dumps(extra, indent=2, sort_keys=True))


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """A model folder that cannot be loaded (missing config, corrupt weights, ...)."""


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


def load_folder(path: Path) -> tuple[LlavaForConditionalGeneration, object]:
    """Load a model folder's config, safetensors weights (never remote code) and processor."""
    try:
        config = LlavaConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {e}") from None
    # the model's own shards only (``save_pretrained`` names them model[-0000k-of-0000n].safetensors): not an
    # adapter (adapter_model.safetensors) or the parts a build ships (trained.safetensors) beside them
    weights = sorted(path.glob("model*.safetensors"))
    if not weights:
        raise ModelLoadError(f"model folder {path} has no model*.safetensors weights")
    state = {}
    for w in weights:
        try:
            state.update(load_file(w))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"corrupted weights file {w}: {e}") from None
    model = LlavaForConditionalGeneration(config)
    state = _remap(state, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    shared = _shared_keys(model)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq") and not shared.get(m, set()) & set(state)]
    if missing or unexpected:
        raise ModelLoadError(f"weights in {path} do not match its config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    model.eval()
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the processor in {path}: {e}") from None
    return model, processor


def _shared_keys(model) -> dict[str, set[str]]:
    """For each state-dict key whose tensor another key shares (tied weights, such as SmolLM2's output head and
    input embeddings, which ``save_pretrained`` writes once), the other keys; loading one of them loads it."""
    by_storage: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if tensor.numel():
            by_storage.setdefault(tensor.data_ptr(), []).append(key)
    return {k: set(keys) - {k} for keys in by_storage.values() if len(keys) > 1 for k in keys}


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


def random_weights(config: LlavaConfig, device: str | torch.device = "cpu", dtype: str = "float16",
                   seed: int = 0) -> LlavaForConditionalGeneration:
    """A LLaVA of ``config`` with random weights (``transformers``' own initialisation, drawn with ``seed``), built
    directly on ``device`` in ``dtype``: for dry runs that must not download anything.

    Every parameter is allocated and initialised on ``device`` in ``dtype`` (construction under
    ``torch.device(device)`` with the default dtype set to ``dtype``), so no full-size copy of the model, fp32 or
    otherwise, ever exists in host RAM. (Building on the ``meta`` device and calling ``to_empty`` would leave the
    non-persistent buffers, the rotary frequencies and CLIP's position ids, uninitialised.) Eval mode."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=DTYPES[dtype])
    model.eval()
    return model
