"""Resumable training: everything a staged build holds between two optimizer steps, in one safetensors file.

A build is a sequence of stages (:mod:`ellava_lib.model.train`), each a fresh AdamW + schedule run for a number
of steps. Its state between two steps is: the weights of every trained module (the model and the vision stage's
cell heads), the optimizer's and scheduler's state of the stage under way, the state of every random source the
steps draw from (torch's global generator, the batch generator, Python ``random.Random`` streams), the batches
drawn but not yet served (:class:`encoding.LengthGroupedBatches`) and the log rows so far. :class:`Checkpointer`
writes all of it to ``<folder>/train_state.safetensors`` atomically (:func:`files.write_atomic`): tensors as
safetensors entries, everything else as JSON in the file's metadata, so nothing is unpickled on load. Restoring it
and running the remaining steps gives bit-identical weights to a build that never stopped (same machine, same
thread count: CPU kernels are deterministic at a fixed thread count).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ellava_lib.core import files
from ellava_lib.data.encoding import LengthGroupedBatches
from ellava_lib.model.loading import ModelLoadError

FILE = "train_state.safetensors"


@dataclass
class Resumable:
    """The objects whose state a build saves and restores, each under a name."""

    modules: dict[str, nn.Module]
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    batchers: dict[str, LengthGroupedBatches] = field(default_factory=dict)
    rngs: dict[str, random.Random] = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)


@dataclass
class Position:
    """Where a restored build stands: ``stage`` is the index of the stage under way (those before it are done)
    and ``step`` the steps of it already taken; ``optimizer`` / ``scheduler`` are that stage's state dicts
    (``None`` at a stage boundary, where the next stage starts a fresh optimizer)."""

    stage: int
    step: int
    optimizer: dict | None = None
    scheduler: dict | None = None


class Checkpointer:
    """Saves a build's state into ``folder`` every ``every`` steps and at stage ends, and restores it.

    ``identity`` (JSON: the train config's digest and fields) is stored beside the state; a saved state with
    another identity is refused (one-line :class:`ModelLoadError`), never silently continued. ``folder=None``
    turns checkpointing off (a plain in-memory build)."""

    def __init__(self, folder: Path | None, parts: Resumable, identity: dict, every: int = 50) -> None:
        if every < 1:
            raise ValueError(f"checkpoint interval must be >= 1 step, got {every}")
        self.folder = Path(folder) if folder is not None else None
        self.parts, self.identity, self.every = parts, identity, every

    @property
    def path(self) -> Path | None:
        return self.folder / FILE if self.folder is not None else None

    def due(self, steps_done: int, total: int) -> bool:
        """A mid-stage checkpoint after ``steps_done`` of ``total`` steps (the stage end is saved anyway)."""
        return self.folder is not None and steps_done % self.every == 0 and 0 < steps_done < total

    def save(self, stage: int, step: int, optimizer: torch.optim.Optimizer | None = None,
             scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
        """Write the state at (``stage``, ``step``) atomically, replacing the previous one."""
        if self.folder is None:
            return
        tensors, aliases = {}, {}
        for name, module in self.parts.modules.items():
            kept, dropped = _unique_tensors(module.state_dict())
            tensors.update({f"{name}.{k}": v for k, v in kept.items()})
            aliases[name] = dropped
        for name, gen in self.parts.generators.items():
            tensors[f"generator.{name}"] = gen.get_state()
        tensors["torch_rng"] = torch.get_rng_state()
        meta: dict = {"identity": self.identity, "stage": stage, "step": step, "aliases": aliases,
                      "batchers": {k: b.state_dict() for k, b in self.parts.batchers.items()},
                      "rngs": {k: _rng_to_json(r) for k, r in self.parts.rngs.items()}, "log": self.parts.log}
        if optimizer is not None:
            opt = optimizer.state_dict()
            for index, state in opt["state"].items():
                tensors.update({f"optimizer.{index}.{k}": v for k, v in state.items()})
            meta["optimizer"] = {"param_groups": opt["param_groups"], "state": {str(i): sorted(s) for i, s in
                                                                                opt["state"].items()}}
        if scheduler is not None:
            meta["scheduler"] = scheduler.state_dict()
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        files.write_atomic(self.path, lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(meta)}))

    def restore(self) -> Position | None:
        """Load the saved state into the parts and return where the build stands; ``None`` when nothing is saved."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            with safe_open(self.path, framework="pt") as f:
                meta = json.loads(f.metadata()["state"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise ModelLoadError(f"cannot resume from {self.path} ({e}): delete {self.folder} to start over") from None
        if meta["identity"] != self.identity:
            raise ModelLoadError(f"{self.path} belongs to another build (digest {meta['identity'].get('digest')}, "
                                 f"this one {self.identity.get('digest')}): delete {self.folder} to start over")
        for name, module in self.parts.modules.items():
            prefix = f"{name}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            state.update({dropped: state[kept] for dropped, kept in meta["aliases"][name].items()})
            module.load_state_dict(state, strict=True)
        for name, gen in self.parts.generators.items():
            gen.set_state(tensors[f"generator.{name}"])
        torch.set_rng_state(tensors["torch_rng"])
        for name, batcher in self.parts.batchers.items():
            batcher.load_state_dict(meta["batchers"][name])
        for name, rng in self.parts.rngs.items():
            rng.setstate(_rng_from_json(meta["rngs"][name]))
        self.parts.log[:] = meta["log"]
        return Position(meta["stage"], meta["step"], _optimizer_state(meta.get("optimizer"), tensors),
                        meta.get("scheduler"))


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state`` without the keys whose tensor an earlier key shares (tied weights; safetensors refuses shared
    storage), and a map from each dropped key to the key kept for it."""
    kept: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    first: dict[int, str] = {}
    for k, v in state.items():
        ptr = v.data_ptr() if v.numel() else None
        if ptr is not None and ptr in first:
            dropped[k] = first[ptr]
            continue
        if ptr is not None:
            first[ptr] = k
        kept[k] = v
    return kept, dropped


def _optimizer_state(meta: dict | None, tensors: dict[str, torch.Tensor]) -> dict | None:
    """The optimizer state dict saved as ``optimizer.<index>.<name>`` tensors plus JSON param groups (JSON turned
    the ``betas`` tuples into lists: back to tuples)."""
    if meta is None:
        return None
    state = {int(i): {k: tensors[f"optimizer.{i}.{k}"] for k in names} for i, names in meta["state"].items()}
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_to_json(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from_json(state: list) -> tuple:
    return state[0], tuple(state[1]), state[2]
