"""Model specs: built-in names (trained by the kit and cached by config digest), hub names and folders.

:func:`load_model` turns any spec into ``(model, processor)``: a hub name of :data:`HUB_MODELS` through
:func:`loading.load_pretrained`, a built-in name of :data:`BUILTIN` through :func:`build_or_load` (built on first
use), a folder through :func:`loading.load_folder`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
from safetensors.torch import save_file
from transformers import LlavaConfig, LlavaForConditionalGeneration

from ellava_lib.core import files
from ellava_lib.model import loading, lora, shipped
from ellava_lib.model.loading import ModelLoadError, load_folder, load_pretrained
from ellava_lib.model.train import CHECKPOINT_EVERY, TrainConfig, recipe_config, train


def cache_root() -> Path:
    """Where built models are cached: ``$ELLAVA_CACHE`` or ``~/.cache/ellava``."""
    return Path(os.environ.get("ELLAVA_CACHE", Path.home() / ".cache" / "ellava"))


def build_dir(cfg: TrainConfig, cache: Path | None = None) -> Path:
    """The folder :func:`build_or_load` keeps the model of ``cfg`` in: ``<cache>/models/<kind>-<digest>``
    (``cache`` default :func:`cache_root`); it holds a model once its ``ellava.json`` is there."""
    cache = Path(cache) if cache is not None else cache_root()
    return cache / "models" / f"{cfg.kind()}-{cfg.digest()}"


def build_or_load(cfg: TrainConfig, cache: Path | None = None, progress: bool = True, force: bool = False,
                  checkpoint_every: int = CHECKPOINT_EVERY) -> Path:
    """Return the folder of the trained model for ``cfg``: cached, else made from the shipped weights of its recipe
    (:mod:`ellava_lib.model.shipped`, SHA-256-checked), else trained now and cached. ``force`` always trains.

    The folder is ``<cache>/models/<kind>-<digest>`` (``tiny`` or ``smol``, :meth:`TrainConfig.kind`) and holds
    ``model.safetensors``, ``config.json``, the processor files, ``ellava.json`` (train config, digest, wall
    time) and ``train_log.csv``; it is written atomically (:func:`files.write_dir`), so an interrupted build
    leaves nothing half-written there. While training, the build saves its state every ``checkpoint_every``
    steps and at each stage's end into the work folder ``<cache>/models/.building-<kind>-<digest>`` (see
    :func:`train`); a build that was killed continues from there on the next call, to the same weights, and
    the work folder is removed once the model folder is in place (``force`` discards a saved state too). A build
    with LoRA adapters also writes what it trained, unmerged (:data:`shipped.PARTS`), so it can be shipped.
    """
    out = build_dir(cfg, cache)
    work = out.with_name(f".building-{out.name}")
    if (out / "ellava.json").exists() and not force:
        return out
    if not force and (folder := shipped.find(cfg)) is not None:
        return shipped.materialize(folder, cfg, out)
    if force and work.exists():
        shutil.rmtree(work)
    t0 = time.time()
    model, processor, log = train(cfg, progress, work_dir=work, checkpoint_every=checkpoint_every, keep_adapters=True)
    parts = shipped.trained_parts(model, cfg) if lora.has_adapters(model) else None
    lora.merge_adapters(model)
    meta = {"kind": cfg.kind(), "train_config": cfg.to_dict(), "digest": cfg.digest(),
            "train_seconds": time.time() - t0, "params": sum(p.numel() for p in model.parameters())}

    def fill(tmp: Path) -> None:
        loading.save(model, processor, tmp, meta)
        files.write_csv(tmp / "train_log.csv", pd.DataFrame(log))
        if parts is not None:
            save_file(parts, tmp / shipped.PARTS)

    files.write_dir(out, fill)
    shutil.rmtree(work, ignore_errors=True)
    return out


def model_meta(model_dir: Path) -> dict:
    """The build record of a cached model (``ellava.json``)."""
    path = Path(model_dir) / "ellava.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a model built by ellava")
    return json.loads(path.read_text())

#: Models the kit trains itself, by name: the tiny default and the smol tier (SmolLM2-135M).
BUILTIN = {"tiny": TrainConfig, "smol": TrainConfig.smol}
#: Hub checkpoints the kit knows by a short name (the paper tier).
HUB_MODELS = {"llava-1.5-7b": "llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-7b-hf": "llava-hf/llava-1.5-7b-hf"}


def builtin_config(name: str, cache: Path | None = None) -> LlavaConfig:
    """The ``LlavaConfig`` of the built-in model ``name`` (:data:`BUILTIN`) without training or loading weights:
    the ``config.json`` of its cached build (:func:`build_dir`), else of its shipped folder
    (:func:`shipped.find`), else the recipe's (:func:`train.recipe_config`: for ``tiny`` the tiny vocabulary is
    generated, tens of seconds; for ``smol`` SmolLM2's shape, the GGUF is not read)."""
    cfg = BUILTIN[name]()
    folder = build_dir(cfg, cache)
    if not (folder / "ellava.json").is_file():
        folder = shipped.find(cfg)
    return LlavaConfig.from_pretrained(folder) if folder is not None else recipe_config(cfg)


def resolve_model_dir(spec: str | Path, progress: bool = True) -> Path:
    """``tiny`` / ``smol`` -> the cached model of that name (built if missing); anything else must be a model
    folder."""
    if str(spec) in BUILTIN:
        return build_or_load(BUILTIN[str(spec)](), progress=progress)
    path = Path(spec)
    if not path.is_dir():
        raise ModelLoadError(f"model {spec!r} is neither a built-in model ({', '.join(BUILTIN)}), a hub model "
                             f"({', '.join(sorted(HUB_MODELS))}) nor a folder")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder {path} has no config.json")
    return path


def load_model(spec: str | Path, progress: bool = True, dtype: str = "float16",
               revision: str | None = None) -> tuple[LlavaForConditionalGeneration, object]:
    """Load weights (safetensors only, never remote code) and the processor from a model spec: ``tiny``,
    a model folder, or a hub name of :data:`HUB_MODELS` (``llava-1.5-7b``; loaded in ``dtype``)."""
    if str(spec) in HUB_MODELS:
        return load_pretrained(HUB_MODELS[str(spec)], dtype, revision)
    return load_folder(resolve_model_dir(spec, progress))
