"""Dense (or pruned) evaluation: batched greedy generation, predictions as JSONL, metrics as CSV.

``metrics.csv`` has the columns ``suite,metric,score,n,judge,judge_model,split``; ``score`` is on a 0-100 scale and
each suite's headline number is its ``overall`` row; ``judge`` is the judge requested, ``judge_model`` the model(s)
that answered (the GPT server's reply), ``split`` the split scored (VizWiz: ``val``). ``predictions.jsonl`` holds one
record per item with its score and, for judged suites, the model that answered.

Inputs: each sample becomes ``prompts.sample_prompt(sample, prompt_format)`` and
``real_image.prepare_image(image, processor, image_mode)``; :class:`EvalConfig` defaults both by data kind (real:
LLaVA-1.5's ``vicuna_v1`` conversation and pad-to-square; synthetic: the ``hf`` template, images unchanged).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from ellava_lib.core import files
from ellava_lib.core.schema import SUITES, Sample
from ellava_lib.data import synth
from ellava_lib.data.prompts import PROMPT_FORMATS, default_prompt_format, sample_prompt
from ellava_lib.data.real_image import IMAGE_MODES, default_image_mode, prepare_image
from ellava_lib.eval import metrics
from ellava_lib.eval.judge import Judge, LocalJudge
from ellava_lib.model.kernels import onednn_linears

MAX_NEW_TOKENS = {"sqa": 4, "vizwiz": 6, "mmvet": 8, "llavabench": 64}
#: Real benchmarks: a letter / a word or phrase for ScienceQA and VizWiz; open answers up to 1024 new tokens for
#: MM-Vet and LLaVA-Bench (LLaVA-1.5's ``model_vqa`` default; lmms-eval's mmvet task uses 1024 too).
REAL_MAX_NEW_TOKENS = {"sqa": 16, "vizwiz": 16, "mmvet": 1024, "llavabench": 1024}


DATA_KINDS: tuple[str, ...] = ("synthetic", "real")


@dataclass
class EvalConfig:
    """What to evaluate: suites, split, items per suite (``None`` = the suite's default size), batch.

    ``data="real"`` reads the real benchmarks through ``ellava_lib/data/manifests/`` (their evaluation split; ``split``
    is then ignored) from the hub, or from local parquet copies under ``data_dir/<benchmark>/``.
    ``prompt_format`` (:data:`prompts.PROMPT_FORMATS`) and ``image_mode`` (:data:`real_image.IMAGE_MODES`): ``None``
    = the data kind's default (:meth:`input_format`).
    """

    suites: tuple[str, ...] = SUITES
    split: str = "test"
    limit: int | None = None
    n_items: int = 500
    data_seed: int = 0
    batch_size: int = 32
    data: str = "synthetic"
    data_dir: str | None = None
    prompt_format: str | None = None
    image_mode: str | None = None

    def __post_init__(self) -> None:
        if self.prompt_format is not None and self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        if self.image_mode is not None and self.image_mode not in IMAGE_MODES:
            raise ValueError(f"image mode must be one of {', '.join(IMAGE_MODES)}, got {self.image_mode!r}")
        self.suites = tuple(self.suites)
        if self.data not in DATA_KINDS:
            raise ValueError(f"data must be one of {', '.join(DATA_KINDS)}, got {self.data!r}")
        for s in self.suites:
            if self.data == "synthetic":
                synth.check_suite_split(s, self.split)
            elif s not in SUITES:
                raise ValueError(f"unknown suite {s!r}; known: {', '.join(SUITES)}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"--limit must be a positive integer, got {self.limit}")
        if self.batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {self.batch_size}")

    def size(self) -> int:
        return min(self.n_items, self.limit) if self.limit is not None else self.n_items

    def input_format(self) -> dict[str, str]:
        """``{"prompt_format", "image_mode"}``: the fields, or the data kind's defaults where ``None``."""
        return {"prompt_format": self.prompt_format or default_prompt_format(self.data),
                "image_mode": self.image_mode or default_image_mode(self.data)}


def input_format(data: str) -> dict[str, str]:
    """The default ``{"prompt_format", "image_mode"}`` of a data kind (``real``: vicuna_v1 + pad)."""
    return EvalConfig(suites=(), data=data).input_format()


def generation_budget(data: str) -> dict[str, int]:
    """Maximum new tokens per suite for ``synthetic`` or ``real`` data."""
    return REAL_MAX_NEW_TOKENS if data == "real" else MAX_NEW_TOKENS


def load_samples(cfg: EvalConfig, suite: str, reports: dict | None = None) -> list[Sample]:
    """The evaluation items of one suite: generated (synthetic), or loaded from its manifest (real; the
    load report, with every skipped row and the data's source and revision, goes into ``reports[suite]``)."""
    if cfg.data == "synthetic":
        return synth.generate(suite, cfg.split, cfg.size(), cfg.data_seed)
    from ellava_lib.data.manifest import SUITE_BENCHMARKS

    report = _real_split(SUITE_BENCHMARKS[suite], cfg.limit, cfg.data_dir)
    if reports is not None:
        reports[suite] = report.summary()
    return list(report.samples)


@functools.lru_cache(maxsize=8)
def _real_split(benchmark: str, limit: int | None, data_dir: str | None):
    """One benchmark's evaluation split, loaded (and its images decoded) once per process: a sweep evaluates
    every job on the same items, and VizWiz val alone is ~2 GB of JPEGs."""
    from ellava_lib.data.real import benchmark_dir, load_real_suite

    return load_real_suite(benchmark, limit=limit, data_dir=benchmark_dir(data_dir, benchmark))


@contextlib.contextmanager
def padding_side(tokenizer, side: str) -> Iterator[None]:
    """``tokenizer.padding_side = side`` within the block; the previous side is restored on exit (also on an
    exception)."""
    before = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = before


@torch.no_grad()
def generate_answers(model, processor, samples: list[Sample], max_new_tokens: int, batch_size: int = 32,
                     progress: bool = True, desc: str = "generate", prompt_format: str = "hf",
                     image_mode: str = "crop") -> list[str]:
    """Greedy answers for ``samples``: prompts in ``prompt_format``, images prepared by ``image_mode``, left-padded
    batches through the processor (the tokenizer's padding side is restored afterwards), the model's CPU fp32
    linears through oneDNN (:func:`kernels.onednn_linears`)."""
    model.eval()
    tok = processor.tokenizer
    prompts = [sample_prompt(s, prompt_format) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    answers: dict[int, str] = {}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with padding_side(tok, "left"), onednn_linears(model):
        for idx in tqdm(batches, desc=desc, disable=not progress, mininterval=2.0):
            images = [prepare_image(samples[i].image, processor, image_mode) for i in idx]
            enc = processor(text=[prompts[i] for i in idx], images=images,
                            return_tensors="pt", padding=True).to(model.device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, t in zip(idx, texts):
                answers[i] = t.strip()
    return [answers[i] for i in range(len(samples))]


def evaluate_samples(model, processor, samples: dict[str, list[Sample]], judge: Judge | None = None,
                     batch_size: int = 32, progress: bool = True,
                     max_new_tokens: dict[str, int] | None = None, prompt_format: str = "hf",
                     image_mode: str = "crop") -> tuple[pd.DataFrame, list[dict]]:
    """Score given samples (suite -> samples): the metric rows of every suite and one prediction record
    per sample (``id, suite, split, category, question, answer, prediction, score`` and, judged suites,
    ``judge, judge_model, judge_failed``; llavabench also ``reference_score``). ``max_new_tokens`` per suite
    defaults to :data:`MAX_NEW_TOKENS` (the synthetic suites)."""
    judge = judge or LocalJudge()
    max_new_tokens = max_new_tokens or MAX_NEW_TOKENS
    rows: list[metrics.MetricRow] = []
    preds_out: list[dict] = []
    for suite, items in samples.items():
        preds = generate_answers(model, processor, items, max_new_tokens[suite], batch_size, progress,
                                 desc=f"eval {suite}", prompt_format=prompt_format, image_mode=image_mode)
        suite_rows, item_scores = metrics.suite_scores(suite, items, preds, judge)
        rows += suite_rows
        judged = {"judge": judge.name} if suite in metrics.JUDGED_SUITES else {}
        preds_out += [{"id": s.id, "suite": suite, "split": s.split, "category": s.category, "question": s.question,
                       "answer": s.answer, "prediction": p, **judged, **scored}
                      for s, p, scored in zip(items, preds, item_scores)]
    return metrics.rows_to_frame(rows), preds_out


def evaluate(model, processor, cfg: EvalConfig, out_dir: Path | None = None, judge: Judge | None = None,
             progress: bool = True) -> pd.DataFrame:
    """Evaluate on every suite of ``cfg``; write ``predictions.jsonl`` and ``metrics.csv`` into ``out_dir``."""
    judge = judge or LocalJudge()
    t0 = time.time()
    reports: dict[str, dict] = {}
    samples = {suite: load_samples(cfg, suite, reports) for suite in cfg.suites}
    fmt = cfg.input_format()
    frame, preds_out = evaluate_samples(model, processor, samples, judge, cfg.batch_size, progress,
                                        generation_budget(cfg.data), **fmt)
    if out_dir is not None:
        out_dir = Path(out_dir)
        files.write_jsonl(out_dir / "predictions.jsonl", preds_out)
        files.write_csv(out_dir / "metrics.csv", frame)
        top = frame[frame["metric"] == "overall"].set_index("suite")
        record = {"config": {**cfg.__dict__, "suites": list(cfg.suites), **fmt},
                  "seconds": round(time.time() - t0, 2), "judge": judge.name,
                  "judge_models": {s: str(top.loc[s, "judge_model"]) for s in top.index
                                   if s in metrics.JUDGED_SUITES},
                  "splits": {s: str(top.loc[s, "split"]) for s in top.index}}
        if reports:
            record["data"] = reports
        files.write_json(out_dir / "eval.json", record)
    return frame


def headline(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per suite (its ``overall`` score) plus the unweighted ``mean`` of the suites."""
    return compare({"score": frame}).set_index("method").T.rename_axis(columns=None)


def compare(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per method: each suite's ``overall`` score and their unweighted mean (0-100)."""
    rows = []
    for name, frame in frames.items():
        top = frame[frame["metric"] == "overall"].set_index("suite")["score"]
        rows.append({"method": name, **{s: float(top[s]) for s in top.index}, "mean": float(top.mean())})
    return pd.DataFrame(rows)


def item_contributions(records: list[dict]) -> list[float]:
    """Each scored item's share ``c_i`` of the unweighted suite mean (:func:`compare`'s ``mean``), in record order,
    so that ``mean_i c_i`` is exactly that mean over these items (0-100). With ``R`` records, ``K`` suites among
    them and ``n_k`` items of suite ``k``, an item of suite ``k`` with score ``s_i`` contributes::

        c_i = 100 * R / (K * n_k) * s_i                   (sqa, vizwiz, mmvet: the overall is 100 * mean(s))
        c_i = 100 * R / (K * n_k) * s_i / mean_k(ref)     (llavabench: 100 * mean(s) / mean(reference_score))

    since ``mean_i c_i = (1/K) sum_k overall_k``. ``records`` are :func:`evaluate_samples`' prediction records
    (``suite``, ``score``, and ``reference_score`` for llavabench). Per-item contributions let two models scored on
    the same items be compared by a paired difference (:func:`ellava_lib.core.stats.paired_mean_se`).
    ``ValueError`` on no records or a llavabench reference mean of 0."""
    if not records:
        raise ValueError("no scored items")
    counts: dict[str, int] = {}
    refs: dict[str, float] = {}
    for r in records:
        counts[r["suite"]] = counts.get(r["suite"], 0) + 1
        refs[r["suite"]] = refs.get(r["suite"], 0.0) + float(r.get("reference_score") or 0.0)
    scale = {k: 100.0 * len(records) / (len(counts) * n) for k, n in counts.items()}
    for k in counts:
        if k == "llavabench":
            if refs[k] == 0:
                raise ValueError("mean reference score is 0; relative score undefined")
            scale[k] /= refs[k] / counts[k]
    return [scale[r["suite"]] * float(r["score"]) for r in records]


def task_scores(model, processor, samples: list[Sample], judge: Judge | None = None, batch_size: int = 32,
                max_new_tokens: dict[str, int] | None = None, prompt_format: str = "hf",
                image_mode: str = "crop") -> list[float]:
    """Generate and score ``samples`` (any suites, in any order; :func:`evaluate_samples` per suite) and return
    each one's contribution to the unweighted suite mean, in the samples' order (:func:`item_contributions`): their
    mean is what :func:`compare` reports for these items."""
    by_suite: dict[str, list[Sample]] = {}
    for s in samples:
        by_suite.setdefault(s.suite, []).append(s)
    _, records = evaluate_samples(model, processor, by_suite, judge, batch_size, False, max_new_tokens,
                                  prompt_format, image_mode)
    values = dict(zip(((r["suite"], r["id"]) for r in records), item_contributions(records)))
    return [values[(s.suite, s.id)] for s in samples]
