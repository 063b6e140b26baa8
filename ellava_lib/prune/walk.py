"""Run a LLaVA block by block on a calibration batch: the engine every pruning path shares.

:func:`capture_layer_inputs` is SparseGPT's *Catcher*: one forward pass of the whole model with a
pre-hook on decoder block 0 that records the block's hidden states and keyword arguments (causal
mask, position ids, rotary embeddings) and then stops the forward, so each block can be run
standalone (:meth:`BlockInputs.run`); :func:`capture_all_layer_inputs` records every decoder block's
inputs in one dense forward (ECoFLaP's perturbed forwards start at the perturbed block).
:func:`walk_blocks` is the block-by-block driver that pruning, OWL and the level database share: per
block, forward hooks feed the linears' inputs (padding excluded) into a per-layer statistic
(SparseGPT's Hessian, or :class:`InputNorms` for Wanda), a visitor uses them, and the block's
outputs become the next block's inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ellava_lib.core.units import lm_layers, names_vision, unit_kind, unit_linears, vision_layers
from ellava_lib.model.losses import model_inputs

# ---------------------------------------------------------------------------------------- block inputs


@dataclass
class BlockInputs:
    """What a decoder (or encoder) block is called with: ``layer(hidden, *args, **kwargs)``.

    ``token_mask`` (``(B, T)`` bool, or None = all) marks the rows that count for calibration
    statistics (padding is excluded).
    """

    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]
    token_mask: torch.Tensor | None = None

    @torch.no_grad()
    def run(self, layer: nn.Module) -> torch.Tensor:
        """The block's output hidden states on these inputs."""
        out = layer(self.hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def with_hidden(self, hidden: torch.Tensor) -> BlockInputs:
        """The same call with new hidden states (the next block's inputs)."""
        return replace(self, hidden=hidden)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (``(B, T, d)``) restricted to the counted tokens, flattened to ``(N, d)``."""
        if self.token_mask is None or x.dim() != 3:
            return x.reshape(-1, x.shape[-1])
        return x[self.token_mask]


class _StopForward(Exception):
    """Raised by the catcher hook once the block's inputs are recorded."""


@torch.no_grad()
def _catch(layer: nn.Module, run: Callable[[], Any]) -> tuple[torch.Tensor, tuple, dict[str, Any]]:
    """Run ``run()`` until ``layer`` is called; return its ``(hidden, other args, kwargs)``."""
    box: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        box["args"], box["kwargs"] = args, dict(kwargs)
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError("the forward pass never reached the block whose inputs are captured")
    args, kwargs = box["args"], box["kwargs"]
    if args:
        return args[0].detach(), tuple(args[1:]), kwargs
    return kwargs.pop("hidden_states").detach(), (), kwargs


def capture_layer_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> BlockInputs:
    """Inputs of language-model decoder block 0 on ``batch`` (image features already merged in).

    Runs ``model`` once (no cache, no labels) and stops at block 0. ``token_mask`` is the batch's
    attention mask (right padding is not counted in calibration statistics).
    """
    model.eval()
    hidden, args, kwargs = _catch(lm_layers(model)[0], lambda: model(**model_inputs(batch), use_cache=False))
    mask = batch.get("attention_mask")
    return BlockInputs(hidden, args, kwargs, None if mask is None else mask.bool())


@torch.no_grad()
def capture_all_layer_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[BlockInputs]:
    """Inputs of every language-model decoder block on ``batch``, from one dense forward.

    Pre-hooks on the decoder blocks record what each block is called with (its hidden states and keyword
    arguments, the causal mask, position ids and rotary embeddings being shared tensors); the forward stops
    at the last block, so that block, the final norm and the LM head do not run. Block ``i``'s entry runs
    blocks ``i..L-1`` standalone on exactly the inputs they had in the dense forward (``token_mask`` as
    :func:`capture_layer_inputs`)."""
    model.eval()
    layers = lm_layers(model)
    seen: list[tuple[tuple, dict[str, Any]]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        seen.append((args, dict(kwargs)))
        if module is layers[-1]:
            raise _StopForward

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        model(**model_inputs(batch), use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if len(seen) != len(layers):
        raise RuntimeError(f"the forward pass called {len(seen)} of the {len(layers)} decoder blocks")
    mask = batch.get("attention_mask")
    token_mask = None if mask is None else mask.bool()
    out = []
    for args, kwargs in seen:
        hidden, rest = (args[0], tuple(args[1:])) if args else (kwargs.pop("hidden_states"), ())
        out.append(BlockInputs(hidden.detach(), rest, kwargs, token_mask))
    return out


def capture_vision_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> BlockInputs:
    """Inputs of vision-tower encoder block 0 on the batch's ``pixel_values`` (every token counts)."""
    model.eval()
    return BlockInputs(*_catch(vision_layers(model)[0],
                               lambda: model.get_image_features(pixel_values=batch["pixel_values"])))


# ---------------------------------------------------------------------------------------- statistics


class InputNorms:
    """Wanda's statistic of one linear layer: the squared norm of every input feature over the tokens.

    ``sq_j = sum_i x_ij^2`` (fp64), so ``norms() = ||X_j||_2``; same ``add_batch`` interface as the
    SparseGPT Hessian.
    """

    def __init__(self, layer: nn.Linear) -> None:
        self.columns = layer.weight.shape[1]
        self.sq = torch.zeros(self.columns, dtype=torch.float64, device=layer.weight.device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None = None) -> None:
        x = inp.detach().reshape(-1, self.columns).to(torch.float64)
        self.sq += (x * x).sum(0)
        self.nsamples += x.shape[0]

    def norms(self) -> torch.Tensor:
        return self.sq.sqrt()

    def free(self) -> None:
        self.sq = torch.zeros(0)


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Wanda's importance ``S_ij = |W_ij| * ||X_j||_2`` (Sun et al. 2023), fp32, shape of ``weight``."""
    return weight.detach().abs().float() * norms.to(device=weight.device, dtype=torch.float32).unsqueeze(0)


# ---------------------------------------------------------------------------------------- block walk

#: ``visit(block, {unit: {layer: Linear}}, {layer: statistic}) -> weights changed?``
Visit = Callable[[str, dict[str, dict[str, nn.Linear]], dict[str, Any]], bool]


def offload_blocks(model: nn.Module, device: torch.device | str) -> torch.device:
    """Put everything but the language model's decoder blocks on ``device`` (embeddings, vision tower,
    projector, final norm, LM head); the blocks stay where they are. Returns the blocks' device (home).

    With a 7B model kept on the CPU this holds ~1 GB of non-block weights on the GPU, and
    :func:`walk_blocks` brings one decoder block at a time (``device=``)."""
    lm = model.model.language_model
    blocks = lm.layers
    home = next(blocks.parameters()).device
    lm.layers = nn.ModuleList()
    try:
        model.to(device)
    finally:
        lm.layers = blocks
    return home


def _last_wanted(prefix: str, n_blocks: int, wanted: set[str]) -> int:
    hits = [i for i in range(n_blocks) if any(u.startswith(f"{prefix}.{i}.") for u in wanted)]
    return max(hits, default=-1)


@torch.no_grad()
def walk_blocks(model: nn.Module, batch: dict[str, torch.Tensor], units: Sequence[str],
                make_stat: Callable[[nn.Linear], Any], visit: Visit, *, sequential: bool = True,
                progress: bool = True, desc: str = "blocks", device: torch.device | str | None = None) -> None:
    """Run the model block by block on the calibration batch (vision tower first, when a unit needs it).

    For every block up to the last one holding a unit of ``units`` (block or matrix units, one kind,
    :func:`units.unit_kind`): forward hooks feed each linear of
    those units into ``make_stat(linear)`` (``add_batch`` on the non-padding token rows), the block is
    run, then ``visit`` sees the statistics (and may prune). The next block's inputs are the block's
    outputs: recomputed on the visited weights when ``sequential`` (SparseGPT's sequential mode),
    else the dense outputs, and the language model's inputs are then captured before anything changes.

    ``device`` (e.g. ``"cuda"`` for a 7B model kept on the CPU): the non-block modules and the batch go
    to ``device`` (:func:`offload_blocks`), each decoder block is moved there for its turn and back
    afterwards, so one block at a time occupies the accelerator; statistics live on ``device``.
    """
    wanted = set(units)
    home = None
    if device is not None:
        home = offload_blocks(model, device)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    try:
        _walk(model, batch, wanted, make_stat, visit, sequential, progress, desc, device, home)
    finally:
        if home is not None:
            offload_blocks(model, home)


def _walk(model: nn.Module, batch: dict[str, torch.Tensor], wanted: set[str], make_stat: Callable[[nn.Linear], Any],
          visit: Visit, sequential: bool, progress: bool, desc: str, device: torch.device | str | None,
          home: torch.device | None) -> None:
    include_vision = names_vision(wanted)
    linears = unit_linears(model, include_vision, unit_kind(wanted))
    unknown = sorted(wanted - set(linears))
    if unknown:
        raise ValueError(f"unknown units {unknown}")
    stacks = [("lm", lm_layers(model), capture_layer_inputs)]
    if include_vision:
        stacks.insert(0, ("vision", vision_layers(model), capture_vision_inputs))
    lasts = {p: _last_wanted(p, len(layers), wanted) for p, layers, _ in stacks}
    lm_dense = None if sequential or lasts["lm"] < 0 else capture_layer_inputs(model, batch)
    bar = tqdm(total=sum(v + 1 for v in lasts.values()), desc=desc, disable=not progress, mininterval=1.0)
    for prefix, layers, capture in stacks:
        if lasts[prefix] < 0:
            continue
        inputs = lm_dense if (prefix == "lm" and lm_dense is not None) else capture(model, batch)
        for i in range(lasts[prefix] + 1):
            swap = device is not None and prefix == "lm"
            if swap:
                layers[i].to(device)
            try:
                block = {u: lins for u, lins in linears.items() if u in wanted and u.startswith(f"{prefix}.{i}.")}
                stats = {name: make_stat(lin) for lins in block.values() for name, lin in lins.items()}
                handles = [lin.register_forward_hook(_feeder(stats[name], inputs))
                           for lins in block.values() for name, lin in lins.items()]
                try:
                    out = inputs.run(layers[i])
                finally:
                    for h in handles:
                        h.remove()
                changed = visit(f"{prefix}.{i}", block, stats) if block else False
                if sequential and changed:
                    out = inputs.run(layers[i])
            finally:
                if swap:
                    layers[i].to(home)
            inputs = inputs.with_hidden(out)
            bar.update(1)
    bar.close()


def _feeder(stat: Any, inputs: BlockInputs) -> Callable:
    def hook(module: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        stat.add_batch(inputs.rows(inp[0]))
    return hook
