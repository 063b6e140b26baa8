"""Dense (or pruned) evaluation: batched greedy generation, predictions as JSONL, metrics as CSV.

``metrics.csv`` has the columns ``suite,metric,score,n,judge``; ``score`` is on a 0-100 scale and each
suite's headline number is its ``overall`` row.
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
from ellava_lib.data.prompts import sample_prompt
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
    """

    suites: tuple[str, ...] = SUITES
    split: str = "test"
    limit: int | None = None
    n_items: int = 500
    data_seed: int = 0
    batch_size: int = 32
    data: str = "synthetic"
    data_dir: str | None = None

    def __post_init__(self) -> None:
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
                     progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy answers for ``samples``: left-padded batches through the processor (the tokenizer's padding side
    is restored afterwards), the model's CPU fp32 linears through oneDNN (:func:`kernels.onednn_linears`)."""
    model.eval()
    tok = processor.tokenizer
    prompts = [sample_prompt(s) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    answers: dict[int, str] = {}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with padding_side(tok, "left"), onednn_linears(model):
        for idx in tqdm(batches, desc=desc, disable=not progress, mininterval=2.0):
            enc = processor(text=[prompts[i] for i in idx], images=[samples[i].image for i in idx],
                            return_tensors="pt", padding=True).to(model.device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, t in zip(idx, texts):
                answers[i] = t.strip()
    return [answers[i] for i in range(len(samples))]


def evaluate_samples(model, processor, samples: dict[str, list[Sample]], judge: Judge | None = None,
                     batch_size: int = 32, progress: bool = True,
                     max_new_tokens: dict[str, int] | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """Score given samples (suite -> samples): the metric rows of every suite and one prediction record
    per sample (``id, suite, category, question, answer, prediction``). ``max_new_tokens`` per suite
    defaults to :data:`MAX_NEW_TOKENS` (the synthetic suites)."""
    judge = judge or LocalJudge()
    max_new_tokens = max_new_tokens or MAX_NEW_TOKENS
    rows: list[metrics.MetricRow] = []
    preds_out: list[dict] = []
    for suite, items in samples.items():
        preds = generate_answers(model, processor, items, max_new_tokens[suite], batch_size, progress,
                                 desc=f"eval {suite}")
        rows += metrics.suite_metrics(suite, items, preds, judge)
        preds_out += [{"id": s.id, "suite": suite, "category": s.category, "question": s.question,
                       "answer": s.answer, "prediction": p} for s, p in zip(items, preds)]
    return metrics.rows_to_frame(rows), preds_out


def evaluate(model, processor, cfg: EvalConfig, out_dir: Path | None = None, judge: Judge | None = None,
             progress: bool = True) -> pd.DataFrame:
    """Evaluate on every suite of ``cfg``; write ``predictions.jsonl`` and ``metrics.csv`` into ``out_dir``."""
    judge = judge or LocalJudge()
    t0 = time.time()
    reports: dict[str, dict] = {}
    samples = {suite: load_samples(cfg, suite, reports) for suite in cfg.suites}
    frame, preds_out = evaluate_samples(model, processor, samples, judge, cfg.batch_size, progress,
                                        generation_budget(cfg.data))
    if out_dir is not None:
        out_dir = Path(out_dir)
        files.write_jsonl(out_dir / "predictions.jsonl", preds_out)
        files.write_csv(out_dir / "metrics.csv", frame)
        record = {"config": {**cfg.__dict__, "suites": list(cfg.suites)}, "seconds": round(time.time() - t0, 2),
                  "judge": judge.name}
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
