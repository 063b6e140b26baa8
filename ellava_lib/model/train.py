"""Build the tiny LLaVA from scratch on the synthetic suite's train split, in stages.

Stage -1 (induction pretraining, ``induction_steps``): the decoder alone copies random word sequences
(``w_1..w_n w_1..w_n``, loss on the copy), which forms induction heads; without them the option-letter lookup
of ``sqa`` ("which option holds the answer?") sits on a plateau for over a thousand steps.
Stage 0 (language pretraining, standing in for LLaVA's pretrained LLM): the decoder alone learns the same
tasks with the scene *described in words* instead of shown (``synth.describe``), so lookup, counting, option
matching and reading are learned on explicit tokens first; loss = answer-token cross-entropy. A share
``drill_frac`` of the rows are option-matching drills (:func:`lm_tasks.drill_text`: the value is given, only
the letter is asked), and on ``sqa`` rows a logit-lens *value loss* (:func:`lm_tasks.value_loss`, weight
``value_weight``) asks decoder layer ``value_layer``'s state at the answer position to name the correct
option's words, so the answer value is formed before the layers that match it to a letter
(``benchmarks/sqa_probe.py`` measured each lever).
Stage 1 (vision pretraining): the CLIP tower learns the generator's per-cell attribute labels (colour and
kind of the object in each patch) with two linear heads, loss ``CE(colour) + CE(kind)``.
Stage 2 (projector alignment, as LLaVA's stage 1): the projector (and the word embeddings) learn to map each
patch next to the words naming its content: with ``z`` the projected patch and ``E`` the input-embedding
matrix, logits ``z E^T`` and loss ``CE(colour word) + CE(shape or glyph word)``.
Stage 3 (joint): everything on the instruction data of all four suites, loss = answer-token cross-entropy
+ ``aux_weight`` x (stage-1 loss + stage-2 loss), which keeps the tower grounded and the patches aligned
(+ ``joint_value_weight`` x the value loss on the ``sqa`` rows; off by default: at weight 1 it lowered every
suite's dense score, ``sqa`` included, in the build that tried it).
All stages use AdamW with linear warm-up and cosine decay; everything is seeded. The forward passes run under
CPU bfloat16 autocast (``precision``; weights, optimizer state and losses stay fp32) with eager attention,
and the text and joint batches are drawn in length-sorted groups (``length_group``, less padding): together
1.56x the steps/s of the former fp32 recipe (two data-parallel processes of one thread each, since removed) on
the build machine (``benchmarks/cpu_speed.py``; its results file was not kept: not measured in this
version), which pays for the text-stage steps. Training runs in one process with ``threads`` intra-op threads.

The smol recipe (``lm`` set: a pretrained decoder, :mod:`ellava_lib.model.smol`) keeps the language model's
pretraining, so it has no induction or text stage: the vision stage as above; the alignment stage trains the
projector alone (``align_embeddings=False``: the decoder, its embeddings included, stays frozen, as in LLaVA's
stage 1); the joint stage is the instruction tuning, the decoder at ``lm_lr`` and the new parts (vision tower,
projector, cell heads) at ``lr``. The decoder is fully fine-tuned, not through LoRA adapters: 135M parameters
with fp32 master weights and AdamW take about 2.2 GB, the pruning that follows acts on the plain dense weights
(adapters would have to be merged first), and no adapter library is needed.

A build is resumable (:mod:`ellava_lib.model.train_state`): given a work folder, :func:`train` saves its whole
state every ``checkpoint_every`` steps and at each stage's end, and continues from a saved state to the same
final weights, bit for bit, as a build that never stopped.

The configuration, :class:`TrainConfig` and its presets (:data:`PRESETS`, :func:`preset`), lives in
:mod:`ellava_lib.model.train_config`; this module re-exports those names, so ``from ellava_lib.model.train import
TrainConfig`` still works.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LlavaConfig

from ellava_lib.core.schema import SUITES
from ellava_lib.data import scenes, synth
from ellava_lib.data.encoding import (
    Batchable,
    LengthGroupedBatches,
    collate,
    encode_pairs,
    pad_right,
    pixel_values,
)
from ellava_lib.data.prompts import chat_prompt, question_text
from ellava_lib.model import lora, smol, tiny
from ellava_lib.model.lm_tasks import (
    content_word_ids,
    drill_text,
    induction_batch,
    value_ids,
    value_loss,
)
from ellava_lib.model.losses import (
    CellHeads,
    alignment_loss,
    answer_loss,
    cell_word_ids,
    patch_features,
)
from ellava_lib.model.train_config import PRECISIONS, PRESETS, TrainConfig, preset  # noqa: F401 (re-exported)
from ellava_lib.model.train_state import Checkpointer, Position, Resumable


def encode_train(cfg: TrainConfig, processor) -> Batchable:
    """Generate, render and tokenise the train split: ``prompt + answer + eos``, ``<image>`` expanded; the
    described-scene text items and the ``sqa`` drills beside them when the build has a text stage. The texts
    are collected first and tokenised in batches (:func:`encoding.encode_pairs`: the same ids as one call per
    text)."""
    tok = processor.tokenizer
    with_text = cfg.text_steps > 0
    out = Batchable(torch.empty(0), [], [], torch.empty(0), torch.empty(0))
    images, colour, kind = [], [], []
    texts: dict[str, tuple[list[str], list[str]]] = {"image": ([], []), "text": ([], []), "drill": ([], [])}

    def add(kind_: str, prompt: str, answer: str) -> None:
        texts[kind_][0].append(prompt)
        texts[kind_][1].append(answer)

    for suite in SUITES:
        for i, item in enumerate(synth.generate_items(suite, "train", cfg.n_train[suite], cfg.data_seed)):
            sample = synth.to_sample(item, suite, "train", i, render=False)
            value = value_ids(tok, item) if suite == "sqa" else []
            add("image", chat_prompt(question_text(sample)), item.answer)
            out.value.append(value)
            if with_text and not item.scene.degrade:
                text = f"{synth.describe(item.scene)}\n{question_text(sample)}"
                add("text", chat_prompt(text, with_image=False), item.answer)
                out.text_value.append(value)
                if value:
                    add("drill", chat_prompt(drill_text(item), with_image=False), item.answer)
                    out.drill_value.append(value)
            images.append(np.asarray(scenes.render(item.scene)))
            c, k = scenes.cell_labels(item.scene)
            colour.append(c)
            kind.append(k)
    for kind_, (ids, n_prompt) in {"image": (out.ids, out.n_prompt), "text": (out.text_ids, out.text_n_prompt),
                                   "drill": (out.drill_ids, out.drill_n_prompt)}.items():
        for seq, n_p in encode_pairs(tok, *texts[kind_]):
            ids.append(seq)
            n_prompt.append(n_p)
    out.images, out.colour, out.kind = torch.from_numpy(np.stack(images)), torch.tensor(colour), torch.tensor(kind)
    return out


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


StepFn = Callable[[int], dict[str, torch.Tensor]]


@dataclass
class Stage:
    """One training stage: AdamW over ``params`` (parameters, or parameter groups that may carry their own
    ``lr``) for ``steps`` steps of ``step_fn(step) -> {name: loss}`` at peak learning rate ``lr``. The
    ``frozen`` parameters have ``requires_grad`` off during the stage, so no gradient is computed for them."""

    name: str
    steps: int
    params: list
    lr: float
    step_fn: StepFn
    frozen: list[torch.nn.Parameter] = field(default_factory=list)


def _flat(params: list) -> list[torch.nn.Parameter]:
    """The parameters of a parameter list or of a list of parameter groups, in order."""
    return [q for g in params for q in g["params"]] if params and isinstance(params[0], dict) else list(params)


def _unique(params) -> list[torch.nn.Parameter]:
    """``params`` without repeats (a tied output head is the input embedding), first occurrence kept."""
    seen: set[int] = set()
    return [q for q in params if not (id(q) in seen or seen.add(id(q)))]


@contextlib.contextmanager
def _frozen(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """``requires_grad`` off for ``params`` within the block, restored on exit."""
    before = [q.requires_grad for q in params]
    for q in params:
        q.requires_grad_(False)
    try:
        yield
    finally:
        for q, b in zip(params, before):
            q.requires_grad_(b)


SaveFn = Callable[[int, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler], None]


def _run_stage(stage: Stage, cfg: TrainConfig, log: list[dict], progress: bool, start: Position | None = None,
               save: SaveFn | None = None) -> None:
    """AdamW + warm-up/cosine schedule + gradient clipping at 1. With ``cfg.precision == "bf16"`` the forward
    pass runs under CPU autocast (matmuls in bfloat16, about 4x the fp32 matmul throughput on CPUs with
    AVX512-BF16 or AMX; weights, optimizer state and losses stay fp32). ``start`` (a restored mid-stage
    position) sets the optimizer and scheduler state and the first step; ``save(steps_done, opt, sched)`` is
    called after every step."""
    opt = torch.optim.AdamW(stage.params, lr=stage.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, stage.steps, cfg.warmup))
    first = 0
    if start is not None:
        opt.load_state_dict(start.optimizer)
        sched.load_state_dict(start.scheduler)
        first = start.step
    params = _flat(stage.params)
    bar = tqdm(range(first, stage.steps), initial=first, total=stage.steps, desc=stage.name, disable=not progress,
               mininterval=2.0)
    with _frozen(stage.frozen):
        for step in bar:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                losses = stage.step_fn(step)
            losses = {k: v.float() for k, v in losses.items()}  # a zero placeholder term may still be bf16
            total = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            row = {"stage": stage.name, "step": step, **{k: round(float(v.detach()), 5) for k, v in losses.items()}}
            log.append(row)
            if step % 20 == 0:
                bar.set_postfix({k: f"{row[k]:.3f}" for k in losses})
            if save is not None:
                save(step + 1, opt, sched)


#: Steps between two mid-stage checkpoints of a resumable build (stage ends are always saved).
CHECKPOINT_EVERY = 50


def train(cfg: TrainConfig, progress: bool = True, work_dir: Path | None = None,
          checkpoint_every: int = CHECKPOINT_EVERY, keep_adapters: bool = False):
    """Train a LLaVA in this process (``cfg.threads`` intra-op threads); returns (model, processor, log rows).

    ``cfg.lm == ""``: the tiny LLaVA from scratch. Otherwise the pretrained decoder ``cfg.lm``
    (:func:`smol.load_lm`; for ``smollm2`` the GGUF, the loaders and the machine's memory are checked first,
    :func:`smol.preflight`, each failure a one-line :class:`ModelLoadError`) in a LLaVA with new vision tower
    and projector (:func:`smol.init_smol_model`). The model's random initialisation and every later draw from
    torch's global generator (the cell heads' initialisation) run under :func:`tiny.torch_seeded` ``(cfg.seed)``:
    the draws of ``torch.manual_seed(cfg.seed)``, with the caller's generator state restored afterwards; the
    batches come from generators of their own. ``cfg.processes`` other than 1 is a ``ValueError``.

    With ``work_dir``, the build saves its state there every ``checkpoint_every`` steps and at each stage's end
    (:class:`train_state.Checkpointer`) and, if a state is saved there already, continues from it: the result
    equals an uninterrupted build's bit for bit. The caller removes ``work_dir`` once the model is saved.

    With ``cfg.lora_rank``, LoRA adapters are added to the decoder right after the model is made (still under the
    seed, :func:`lora.add_adapters`), the decoder's own weights stay frozen throughout, and the adapters are merged
    into them at the end (:func:`lora.merge_adapters`), so the returned model is a plain LLaVA; ``keep_adapters``
    returns it unmerged (the build extracts the adapters to ship them, then merges)."""
    if cfg.processes != 1:
        raise ValueError(f"training runs in one process (the data-parallel path was removed); got processes="
                         f"{cfg.processes}: use threads instead")
    if cfg.lm == "smollm2":
        smol.preflight(cfg.batch_size, smol.TRAIN_TOKENS)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with tiny.torch_seeded(cfg.seed):
            model, processor = init_model(cfg)
            model, processor, log = _fit(cfg, model, processor, progress, work_dir, checkpoint_every)
    finally:  # the caller's thread count back (a test session, a notebook kernel that trains and then evaluates)
        torch.set_num_threads(threads)
    if not keep_adapters:
        lora.merge_adapters(model)
    return model, processor, log


def init_model(cfg: TrainConfig):
    """The untrained model and processor of ``cfg``, drawn from torch's global generator as it stands (:func:`train`
    seeds it): the tiny LLaVA, or the pretrained decoder ``cfg.lm`` in a LLaVA with a new vision tower and projector
    (and LoRA adapters when ``cfg.lora_rank``). Loading shipped weights (:mod:`ellava_lib.model.shipped`) starts
    from the same model."""
    if not cfg.lm:
        processor = tiny.build_processor(tiny.vocabulary(cfg.data_seed))
        return tiny.init_model(cfg.model, processor.tokenizer), processor
    lm, tokenizer = smol.load_lm(cfg.lm)
    processor = smol.smol_processor(tokenizer)
    model = smol.init_smol_model(lm, processor.tokenizer, cfg.model)
    del lm  # its weights are in the LLaVA now
    if cfg.lora_rank:
        lora.add_adapters(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets())
    return model, processor


def recipe_config(cfg: TrainConfig) -> LlavaConfig:
    """The ``LlavaConfig`` of the model :func:`init_model` would build for ``cfg``, without building, loading or
    training anything: the tiny LLaVA (:func:`tiny.text_config` over the tiny vocabulary,
    :func:`tiny.vocabulary`, tens of seconds) or, for ``lm="smollm2"``, SmolLM2's shape
    (:func:`smol.llava_config`, the GGUF is not read) behind the vision tower of ``cfg.model``. The test-size
    ``micro-llama`` decoder has no recipe config: a ``ValueError``."""
    if not cfg.lm:
        tokenizer = tiny.build_tokenizer(tiny.vocabulary(cfg.data_seed))
        return tiny.llava_config(tiny.vision_config(cfg.model), tiny.text_config(cfg.model, tokenizer), tokenizer)
    if cfg.lm == "smollm2":
        return smol.llava_config(smol.SMOLLM2, cfg.model)
    raise ValueError(f"no recipe config for the language model {cfg.lm!r} (only the tiny decoder and smollm2)")


def _fit(cfg: TrainConfig, model, processor, progress: bool, work_dir: Path | None, checkpoint_every: int):
    """:func:`train` after the model: draw the cell heads from torch's global generator as it stands, encode the
    train split, then run the stages (from the state saved in ``work_dir``, if there is one)."""
    attn = model.config.text_config._attn_implementation
    if cfg.precision == "bf16":  # CPU SDPA's bfloat16 backward is slower than eager attention's two matmuls
        model.set_attn_implementation("eager")
    data = encode_train(cfg, processor)
    heads = CellHeads(cfg.model.vit_hidden)
    n = len(data.ids)
    gen = torch.Generator().manual_seed(cfg.seed)
    pad = processor.tokenizer.pad_token_id
    log: list[dict] = []
    model.train()
    # the decoder's trainable parameters (all of them, or its LoRA adapters when the rest is frozen)
    lm_params = [q for q in _unique(list(model.model.language_model.parameters()) + list(model.lm_head.parameters()))
                 if q.requires_grad]
    induction_rng = random.Random(f"induction/{cfg.seed}")
    induction_words = content_word_ids(processor.tokenizer) if cfg.induction_steps else []
    text_batches = LengthGroupedBatches([len(t) for t in data.text_ids], cfg.batch_size, cfg.length_group, gen)
    joint_batches = LengthGroupedBatches([len(t) for t in data.ids], cfg.batch_size, cfg.length_group, gen)
    words = cell_word_ids(processor.tokenizer)

    def _value_term(out, answer_pos: list[int], values: list[list[int]], weight: float) -> dict[str, torch.Tensor]:
        """``{"value": weight x value_loss}`` over the batch's rows (zero when the batch has no sqa row, so every
        logged row of the stage has the same keys); ``{}`` when the value loss is off."""
        if not cfg.value_layer or not weight:
            return {}
        v = value_loss(model, out.hidden_states[cfg.value_layer], answer_pos, values)
        return {"value": weight * v if v is not None else out.logits.new_zeros(())}

    def induction_step(step: int) -> dict[str, torch.Tensor]:
        batch = induction_batch(induction_words, cfg.batch_size, induction_rng, processor.tokenizer.bos_token_id,
                                pad)
        labels = batch.pop("labels")
        return {"copy": answer_loss(model(**batch).logits, labels)}

    def text_step(step: int) -> dict[str, torch.Tensor]:
        idx = text_batches.next()
        rows = [(data.text_ids[i], data.text_n_prompt[i], data.text_value[i]) for i in idx]
        if cfg.drill_frac > 0 and data.drill_ids:
            is_drill = (torch.rand(cfg.batch_size, generator=gen) < cfg.drill_frac).tolist()
            didx = torch.randint(0, len(data.drill_ids), (cfg.batch_size,), generator=gen).tolist()
            rows = [(data.drill_ids[j], data.drill_n_prompt[j], data.drill_value[j]) if d else r
                    for r, d, j in zip(rows, is_drill, didx)]
        batch = pad_right([r[0] for r in rows], [r[1] for r in rows], pad)
        labels = batch.pop("labels")
        out = model(**batch, output_hidden_states=bool(cfg.value_layer and cfg.value_weight))
        return {"text": answer_loss(out.logits, labels),
                **_value_term(out, [r[1] - 1 for r in rows], [r[2] for r in rows], cfg.value_weight)}

    def vision_step(step: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, n, (cfg.batch_size * 2,), generator=gen).tolist()
        feats = patch_features(model, pixel_values(data.images[idx]))
        return {"cells": heads.loss(feats, data.colour[idx], data.kind[idx])}

    def align_step(step: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, n, (cfg.batch_size * 2,), generator=gen).tolist()
        with torch.no_grad():
            feats = patch_features(model, pixel_values(data.images[idx]))
        return {"align": alignment_loss(model, feats, data.colour[idx], data.kind[idx], words)}

    def joint_step(step: int) -> dict[str, torch.Tensor]:
        idx = joint_batches.next()
        batch = collate(data, idx, pad)
        labels = batch.pop("labels")
        out = model(**batch, output_hidden_states=bool(cfg.value_layer and cfg.joint_value_weight))
        losses = {"answer": answer_loss(out.logits, labels),
                  **_value_term(out, [data.n_prompt[i] - 1 for i in idx], [data.value[i] for i in idx],
                                cfg.joint_value_weight)}
        if cfg.aux_weight > 0:
            feats = patch_features(model, batch["pixel_values"])
            colour, kind = data.colour[idx], data.kind[idx]
            losses["cells"] = cfg.aux_weight * heads.loss(feats, colour, kind)
            losses["align"] = cfg.aux_weight * alignment_loss(model, feats, colour, kind, words)
        return losses

    embeddings = model.get_input_embeddings().weight
    projector = list(model.model.multi_modal_projector.parameters())
    all_params = [q for q in _unique(list(model.parameters()) + list(heads.parameters())) if q.requires_grad]
    stages = [
        Stage("induction", cfg.induction_steps, lm_params, cfg.induction_lr, induction_step),
        Stage("text", cfg.text_steps, lm_params, cfg.lr, text_step),
        Stage("vision", cfg.vision_steps, list(model.model.vision_tower.parameters()) + list(heads.parameters()),
              cfg.vision_lr, vision_step),
        Stage("align", cfg.align_steps, projector + [embeddings] if cfg.align_embeddings else projector, cfg.lr,
              align_step, frozen=[] if cfg.align_embeddings else [embeddings]),
        Stage("joint", cfg.joint_steps, _joint_params(all_params, lm_params, cfg), cfg.lr, joint_step),
    ]
    stages = [s for s in stages if s.steps > 0]
    parts = Resumable({"model": model, "heads": heads}, {"batches": gen},
                      {"text": text_batches, "joint": joint_batches}, {"induction": induction_rng}, log)
    ckpt = Checkpointer(work_dir, parts, {"digest": cfg.digest()}, checkpoint_every)
    at = ckpt.restore()
    for i, stage in enumerate(stages):
        if at is not None and i < at.stage:
            continue
        start = at if at is not None and i == at.stage and at.step else None

        def save(done: int, opt, sched, i: int = i, total: int = stage.steps) -> None:
            if ckpt.due(done, total):
                ckpt.save(i, done, opt, sched)

        _run_stage(stage, cfg, log, progress, start, save)
        ckpt.save(i + 1, 0)
    model.set_attn_implementation(attn)
    model.eval()
    return model, processor, log


def _joint_params(all_params: list, lm_params: list, cfg: TrainConfig) -> list:
    """The joint stage's parameters: one list at ``cfg.lr``, or with ``cfg.lm_lr`` two groups, the decoder's
    (embeddings and output head included) at ``lm_lr`` and the rest (vision tower, projector, cell heads) at
    ``lr``."""
    if not cfg.lm_lr:
        return all_params
    lm_ids = {id(q) for q in lm_params}
    return [{"params": lm_params, "lr": cfg.lm_lr}, {"params": [q for q in all_params if id(q) not in lm_ids]}]
