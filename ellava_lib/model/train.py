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
version), which pays for the 1000 text-stage steps. Training runs in one process with ``threads`` intra-op threads.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ellava_lib.core.schema import SUITES
from ellava_lib.data import scenes, synth
from ellava_lib.data.encoding import (
    Batchable,
    LengthGroupedBatches,
    collate,
    encode_pair,
    pad_right,
    pixel_values,
)
from ellava_lib.data.prompts import chat_prompt, question_text
from ellava_lib.model import tiny
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
from ellava_lib.model.tiny import TinyConfig

PRECISIONS = ("bf16", "fp32")


@dataclass
class TrainConfig:
    """Everything that determines the trained model (its hash names the cache entry).

    ``processes`` is kept only so the digests (cache names) of existing configs stay what they were: training
    runs in one process, and :func:`train` refuses any other value.
    """

    model: TinyConfig = field(default_factory=TinyConfig)
    seed: int = 0
    data_seed: int = 0
    n_train: dict[str, int] = field(default_factory=lambda: {"sqa": 8000, "vizwiz": 6000, "mmvet": 6000,
                                                             "llavabench": 6000})
    induction_steps: int = 1500
    induction_lr: float = 3e-3
    text_steps: int = 1000
    drill_frac: float = 0.3
    value_layer: int = 3
    value_weight: float = 1.0
    joint_value_weight: float = 0.0
    vision_steps: int = 150
    vision_lr: float = 2e-3
    align_steps: int = 150
    joint_steps: int = 1700
    lr: float = 2e-3
    batch_size: int = 32
    warmup: int = 50
    aux_weight: float = 0.3
    weight_decay: float = 0.01
    precision: str = "bf16"  # "bf16": matmuls under CPU autocast (fp32 master weights); "fp32": none
    length_group: int = 8  # text and joint batches drawn in groups of this many, sorted by length (1 = off)
    threads: int = 2  # intra-op threads of the training process (0 = torch default)
    processes: int = 1  # must be 1 (hashed, see above); one process with two threads was faster than the
    # former two data-parallel processes with one thread each on the 2-core machine this kit is built on

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown training precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["model"] = TinyConfig(**d.get("model", {}))
        return cls(**d)

    def digest(self) -> str:
        """Short stable hash of the config (names the cache folder). A disabled lever (induction stage,
        drills, value loss) trains exactly as before it existed, so it hashes as before."""
        d = self.to_dict()
        if d["precision"] == "fp32":  # full precision trains exactly as before the option existed
            d.pop("precision")
        if d["length_group"] == 1:  # so do ungrouped batches
            d.pop("length_group")
        for switch, fields in _OPTIONAL_LEVERS.items():
            if not d[switch]:
                for f in fields:
                    d.pop(f)
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]

    @classmethod
    def micro(cls) -> "TrainConfig":
        """A model trained in seconds, for tests (it learns little)."""
        return cls(model=TinyConfig.micro(), n_train={s: 64 for s in SUITES}, induction_steps=0, text_steps=5,
                   vision_steps=10, align_steps=5, joint_steps=20, batch_size=16, warmup=5,
                   drill_frac=0.0, value_layer=0)

    @classmethod
    def ci(cls) -> "TrainConfig":
        """The tiny architecture trained briefly (about a minute): for the CI profile of the notebooks."""
        return cls(n_train={s: 600 for s in SUITES}, induction_steps=0, text_steps=40, vision_steps=40, align_steps=30,
                   joint_steps=120, warmup=20, drill_frac=0.0, value_layer=0)


# switch field -> the fields it makes meaningful (dropped from the digest when the switch is off)
_OPTIONAL_LEVERS = {"induction_steps": ("induction_steps", "induction_lr"), "drill_frac": ("drill_frac",),
                    "value_layer": ("value_layer", "value_weight", "joint_value_weight")}


PRESETS = {"tiny": TrainConfig, "ci": TrainConfig.ci, "micro": TrainConfig.micro}


def preset(name: str) -> TrainConfig:
    """The train config of a named preset: ``tiny`` (the embedded default), ``ci`` or ``micro``."""
    if name not in PRESETS:
        raise ValueError(f"unknown train preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]()


def encode_train(cfg: TrainConfig, processor) -> Batchable:
    """Generate, render and tokenise the train split: ``prompt + answer + </s>``, ``<image>`` expanded; the
    described-scene text items and the ``sqa`` drills beside them."""
    tok = processor.tokenizer
    out = Batchable(torch.empty(0), [], [], torch.empty(0), torch.empty(0))
    images, colour, kind = [], [], []
    for suite in SUITES:
        for i, item in enumerate(synth.generate_items(suite, "train", cfg.n_train[suite], cfg.data_seed)):
            sample = synth.to_sample(item, suite, "train", i, render=False)
            value = value_ids(tok, item) if suite == "sqa" else []
            seq, n_p = encode_pair(tok, chat_prompt(question_text(sample)), item.answer)
            out.ids.append(seq)
            out.n_prompt.append(n_p)
            out.value.append(value)
            if not item.scene.degrade:
                text = f"{synth.describe(item.scene)}\n{question_text(sample)}"
                seq, n_p = encode_pair(tok, chat_prompt(text, with_image=False), item.answer)
                out.text_ids.append(seq)
                out.text_n_prompt.append(n_p)
                out.text_value.append(value)
                if value:
                    seq, n_p = encode_pair(tok, chat_prompt(drill_text(item), with_image=False), item.answer)
                    out.drill_ids.append(seq)
                    out.drill_n_prompt.append(n_p)
                    out.drill_value.append(value)
            images.append(np.asarray(scenes.render(item.scene)))
            c, k = scenes.cell_labels(item.scene)
            colour.append(c)
            kind.append(k)
    out.images, out.colour, out.kind = torch.from_numpy(np.stack(images)), torch.tensor(colour), torch.tensor(kind)
    return out


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def _run_stage(params, steps: int, lr: float, cfg: TrainConfig, step_fn, desc: str, log: list[dict],
               progress: bool) -> None:
    """AdamW + warm-up/cosine schedule + gradient clipping at 1. With ``cfg.precision == "bf16"`` the forward
    pass runs under CPU autocast (matmuls in bfloat16, about 4x the fp32 matmul throughput on CPUs with
    AVX512-BF16 or AMX; weights, optimizer state and losses stay fp32)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, cfg.warmup))
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=2.0)
    for step in bar:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            losses = step_fn(step)
        losses = {k: v.float() for k, v in losses.items()}  # a zero placeholder term may still be bf16
        total = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        row = {"stage": desc, "step": step, **{k: round(float(v.detach()), 5) for k, v in losses.items()}}
        log.append(row)
        if step % 20 == 0:
            bar.set_postfix({k: f"{row[k]:.3f}" for k in losses})


def train(cfg: TrainConfig, progress: bool = True):
    """Train a tiny LLaVA from scratch in this process (``cfg.threads`` intra-op threads); returns (model,
    processor, log rows). The model's initialisation and every later draw from torch's global generator (the
    cell heads' initialisation) run under :func:`tiny.torch_seeded` ``(cfg.seed)``: the draws of
    ``torch.manual_seed(cfg.seed)``, with the caller's generator state restored afterwards; the batches come
    from generators of their own. ``cfg.processes`` other than 1 is a ``ValueError``."""
    if cfg.processes != 1:
        raise ValueError(f"training runs in one process (the data-parallel path was removed); got processes="
                         f"{cfg.processes}: use threads instead")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    processor = tiny.build_processor(tiny.vocabulary(cfg.data_seed))
    with tiny.torch_seeded(cfg.seed):
        return _fit(cfg, processor, progress)


def _fit(cfg: TrainConfig, processor, progress: bool):
    """:func:`train` after the processor: initialise the model from torch's global generator as it stands,
    then run the stages."""
    model = tiny.init_model(cfg.model, processor.tokenizer)
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
    lm_params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())

    def _value_term(out, answer_pos: list[int], values: list[list[int]], weight: float) -> dict[str, torch.Tensor]:
        """``{"value": weight x value_loss}`` over the batch's rows (zero when the batch has no sqa row, so every
        logged row of the stage has the same keys); ``{}`` when the value loss is off."""
        if not cfg.value_layer or not weight:
            return {}
        v = value_loss(model, out.hidden_states[cfg.value_layer], answer_pos, values)
        return {"value": weight * v if v is not None else out.logits.new_zeros(())}

    if cfg.induction_steps:
        words = content_word_ids(processor.tokenizer)
        rng = random.Random(f"induction/{cfg.seed}")
        bos = processor.tokenizer.bos_token_id

        def induction_step(step: int) -> dict[str, torch.Tensor]:
            batch = induction_batch(words, cfg.batch_size, rng, bos, pad)
            labels = batch.pop("labels")
            return {"copy": answer_loss(model(**batch).logits, labels)}

        _run_stage(lm_params, cfg.induction_steps, cfg.induction_lr, cfg, induction_step, "induction", log,
                   progress)

    text_batches = LengthGroupedBatches([len(t) for t in data.text_ids], cfg.batch_size, cfg.length_group, gen)

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

    _run_stage(lm_params, cfg.text_steps, cfg.lr, cfg, text_step, "text", log, progress)

    def vision_step(step: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, n, (cfg.batch_size * 2,), generator=gen).tolist()
        feats = patch_features(model, pixel_values(data.images[idx]))
        return {"cells": heads.loss(feats, data.colour[idx], data.kind[idx])}

    vision_params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    _run_stage(vision_params, cfg.vision_steps, cfg.vision_lr, cfg, vision_step, "vision", log, progress)

    words = cell_word_ids(processor.tokenizer)

    def align_step(step: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, n, (cfg.batch_size * 2,), generator=gen).tolist()
        with torch.no_grad():
            feats = patch_features(model, pixel_values(data.images[idx]))
        return {"align": alignment_loss(model, feats, data.colour[idx], data.kind[idx], words)}

    align_params = list(model.model.multi_modal_projector.parameters()) + [model.get_input_embeddings().weight]
    _run_stage(align_params, cfg.align_steps, cfg.lr, cfg, align_step, "align", log, progress)

    joint_batches = LengthGroupedBatches([len(t) for t in data.ids], cfg.batch_size, cfg.length_group, gen)

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

    all_params = list(model.parameters()) + list(heads.parameters())
    _run_stage(all_params, cfg.joint_steps, cfg.lr, cfg, joint_step, "joint", log, progress)
    model.set_attn_implementation(attn)
    model.eval()
    return model, processor, log
