"""Shipped testbed weights: what the kit trained, committed in git, checked by SHA-256 and loaded instead of
training.

A testbed (the tiny model, the smol model) is the kit's stand-in for a pretrained checkpoint: a newcomer prunes it
and should not wait for it to train. Its build (:func:`ellava_lib.model.specs.build_or_load`) is shipped as a folder
``weights/<name>/`` at the repository's root holding:

- ``manifest.json``: the model kind, the recipe's digest (:meth:`TrainConfig.digest`) and full train config, the
  build record (``ellava.json``'s fields) and, for every other file of the folder, its size in bytes and SHA-256;
- ``config.json`` and the processor's files, as ``save_pretrained`` writes them;
- the weights: for the tiny model the whole ``model.safetensors`` (it is all trained by the kit); for the smol model
  only what the kit trained, ``trained.safetensors`` (:func:`trained_parts`: vision tower, projector, the decoder's
  LoRA adapters and the embedding rows the kit added), since the decoder itself is SmolLM2 from its wheel.

:func:`find` picks the shipped folder whose digest is the recipe's; :func:`materialize` checks every file's size and
SHA-256 (a truncated or corrupted file is a one-line :class:`ModelLoadError` naming it and the command that rebuilds
it) and writes the model folder the build would have written; :func:`ship` writes a shipped folder from a built
one (``ellava build --preset NAME --force --ship``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ellava_lib.core import files
from ellava_lib.model import lora, smol, tiny
from ellava_lib.model.loading import ModelLoadError
from ellava_lib.model.train import TrainConfig, init_model

#: Where shipped testbeds live: ``weights/`` at the repository's root (beside ``ellava_lib/``).
ROOT = Path(__file__).resolve().parents[2] / "weights"
MANIFEST = "manifest.json"
#: The smol model's shipped weights: only what the kit trained (:func:`trained_parts`).
PARTS = "trained.safetensors"
#: The full model's weights (``save_pretrained``), shipped as they are for the tiny model.
FULL = "model.safetensors"
#: The key under which :func:`trained_parts` stores the embedding rows the kit added to the decoder's vocabulary.
NEW_ROWS = "new_embedding_rows"
#: Files of a built model folder that are never shipped (the build's log stays in the cache).
UNSHIPPED = ("train_log.csv",)


def rebuild_command(name: str) -> str:
    """The command that rebuilds a shipped folder from its recipe."""
    return f"ellava build --preset {name} --force --ship"


def trained_parts(model: torch.nn.Module, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """What the kit trained in a smol-shaped build whose LoRA adapters are not merged yet (``train(...,
    keep_adapters=True)``): every state entry outside the decoder (vision tower, projector), the decoder's adapter
    matrices (``lora_A`` / ``lora_B``), and under :data:`NEW_ROWS` the input-embedding rows past the pretrained
    vocabulary (``<image>``). The decoder's own weights are SmolLM2's and are not included."""
    if not cfg.lm:
        raise ValueError("trained_parts is for a pretrained decoder; the tiny model ships whole")
    state = model.state_dict()
    out = {k: v for k, v in state.items() if not k.startswith(("model.language_model.", "lm_head."))}
    out.update({k: v for k, v in state.items() if lora.MARK in k})
    embed = model.get_input_embeddings().weight
    out[NEW_ROWS] = embed[_pretrained_vocab(model):]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _pretrained_vocab(model) -> int:
    """The size of the pretrained decoder's vocabulary: the LLaVA's less the one ``<image>`` row it added."""
    return model.config.text_config.vocab_size - 1


def ship(model_dir: Path, name: str, root: Path | None = None) -> Path:
    """Write the shipped folder ``root/name`` from a built model folder (atomically, replacing it): the files
    listed in the module docstring and a manifest of their sizes and SHA-256."""
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "ellava.json").read_text())
    whole = meta["kind"] == "tiny"
    if not whole and not (model_dir / PARTS).is_file():
        raise ModelLoadError(f"{model_dir} has no {PARTS} (built before LoRA adapters were shipped): "
                             f"rebuild it with {rebuild_command(name)}")

    def fill(tmp: Path) -> None:
        for f in sorted(model_dir.iterdir()):
            if f.name in UNSHIPPED or f.name == "ellava.json" or (f.name == FULL and not whole):
                continue
            shutil.copy2(f, tmp / f.name)
        listed = {f.name: {"bytes": f.stat().st_size, "sha256": smol.file_sha256(f)} for f in sorted(tmp.iterdir())}
        files.write_json(tmp / MANIFEST, {"name": name, "kind": meta["kind"], "digest": meta["digest"],
                                          "build": meta, "files": listed})

    return files.write_dir(Path(root if root is not None else ROOT) / name, fill)


def find(cfg: TrainConfig, root: Path | None = None) -> Path | None:
    """The shipped folder (under ``root``, default :data:`ROOT`) built from ``cfg``'s recipe (its manifest's digest
    equals ``cfg.digest()``), or None."""
    for manifest in sorted(Path(root if root is not None else ROOT).glob(f"*/{MANIFEST}")):
        try:
            m = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if m.get("digest") == cfg.digest() and m.get("kind") == cfg.kind():
            return manifest.parent
    return None


def manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / MANIFEST).read_text())


def verify(folder: Path) -> dict:
    """Check every file the manifest of ``folder`` lists: present, of the listed size, of the listed SHA-256.
    Returns the manifest; the first failure is a one-line :class:`ModelLoadError` naming the file and the rebuild
    command."""
    m = manifest(folder)
    fix = f"rebuild it with {rebuild_command(m['name'])}"
    for name, want in m["files"].items():
        path = Path(folder) / name
        if not path.is_file():
            raise ModelLoadError(f"shipped file {path} is missing: restore it (git checkout -- {path}) or {fix}")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise ModelLoadError(f"shipped file {path} has {size:,} bytes, expected {want['bytes']:,} (truncated?): "
                                 f"restore it (git checkout -- {path}) or {fix}")
        if smol.file_sha256(path) != want["sha256"]:
            raise ModelLoadError(f"shipped file {path} is corrupted (sha256 differs from its manifest): restore it "
                                 f"(git checkout -- {path}) or {fix}")
    return m


def materialize(folder: Path, cfg: TrainConfig, out: Path) -> Path:
    """Write the model folder ``out`` (as the build writes it) from the shipped ``folder`` of ``cfg``'s recipe, after
    :func:`verify`. Tiny: the files are copied. Smol: the untrained model of the recipe (:func:`train.init_model`:
    SmolLM2 from its wheel, new tower and projector, LoRA adapters) takes the shipped parts, the adapters are merged
    (:func:`lora.merge_adapters`), and the model is saved; this equals the build's own merged model."""
    from ellava_lib.model import loading

    m = verify(folder)
    if m["digest"] != cfg.digest():
        raise ModelLoadError(f"{folder} holds recipe {m['digest']}, not {cfg.digest()}: {rebuild_command(m['name'])}")
    meta = {**m["build"], "shipped": str(Path(folder).name)}
    if m["kind"] == "tiny":
        def fill(tmp: Path) -> None:
            for name in m["files"]:
                shutil.copy2(Path(folder) / name, tmp / name)
            files.write_json(tmp / "ellava.json", meta)

        return files.write_dir(out, fill)
    if cfg.lm == "smollm2":
        smol.load_preflight()
    try:
        parts = load_file(Path(folder) / PARTS)
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {Path(folder) / PARTS} ({e}): {rebuild_command(m['name'])}") from None
    with tiny.torch_seeded(cfg.seed):
        model, processor = init_model(cfg)
    load_parts(model, parts)
    lora.merge_adapters(model)
    model.eval()
    return files.write_dir(out, lambda tmp: loading.save(model, processor, tmp, meta))


def load_parts(model: torch.nn.Module, parts: dict[str, torch.Tensor]) -> None:
    """Copy :func:`trained_parts` into an untrained model of the same recipe (adapters not merged). Every part
    must name a tensor of the model of the same shape, and every trainable tensor outside the decoder must be
    given; otherwise a one-line :class:`ModelLoadError`."""
    state = model.state_dict()
    rows = parts.get(NEW_ROWS)
    named = {k: v for k, v in parts.items() if k != NEW_ROWS}
    unknown = [k for k in named if k not in state or state[k].shape != named[k].shape]
    needed = [k for k in state if not k.startswith(("model.language_model.", "lm_head.")) or lora.MARK in k]
    missing = [k for k in needed if k not in named]
    if unknown or missing or rows is None:
        raise ModelLoadError(f"shipped parts do not fit the model: unknown or misshapen {unknown[:3]}, missing "
                             f"{missing[:3]}{'' if rows is not None else ', no ' + NEW_ROWS}")
    with torch.no_grad():
        for k, v in named.items():
            state[k].copy_(v)
        embed = model.get_input_embeddings().weight
        embed[_pretrained_vocab(model):].copy_(rows)


#: The docs block (docs/tiers.md) that lists what every shipped file weighs (:func:`sizes_markdown`).
SIZES_MARKER = "shipped-sizes"


def sizes_markdown(root: Path | None = None) -> str:
    """A Markdown table of every shipped file (from the manifests under ``root``, default :data:`ROOT`): folder,
    file, size in bytes and MB, and the total of all folders (the repository's budget is 60 MB)."""
    lines = ["| folder | file | bytes | MB |", "| --- | --- | --- | --- |"]
    total = 0
    for path in sorted(Path(root if root is not None else ROOT).glob(f"*/{MANIFEST}")):
        listed = {**json.loads(path.read_text())["files"], MANIFEST: {"bytes": path.stat().st_size}}
        for name, entry in sorted(listed.items()):
            lines.append(f"| weights/{path.parent.name} | {name} | {entry['bytes']:,} | {entry['bytes'] / 1e6:.2f} |")
            total += entry["bytes"]
    lines.append(f"| total | | {total:,} | {total / 1e6:.2f} |")
    return "\n".join(lines)
