"""Measured latency of pruned models next to their FLOP ratio: is the counted speedup delivered?

For every case it times the dense (unpruned) module and the pruned one under each backend, and records
``measured_ratio = dense time / pruned time`` next to ``flop_ratio = dense FLOPs / pruned FLOPs``
(:func:`ellava_lib.speed.flops.flop_ratio`). Times are medians of ``--repeats`` runs after ``--warmup`` runs.

Cases:

- ``layer``: one Llama decoder layer (attention + MLP) with random weights at SmolLM2-135M shapes (hidden 576,
  intermediate 1536, 9 heads / 3 KV heads) and LLaVA-1.5-7B shapes (4096 / 11008 / 32 heads); ``mlp``: the
  7B MLP alone (``--quick`` times only this 7B case, at 64 prefill tokens). Prefill = ``--tokens`` tokens
  (default 600 = 576 visual + 24 text), causal; decode = one token over a KV cache of ``--tokens`` entries.
- ``model``: the tiny LLaVA given with ``--model DIR``: prefill of one encoded sample, then greedy decode steps.

Masks: magnitude, unstructured at 50/70/90%, and 2:4 (both on all seven linears; ``--patterns`` picks).
Backends: ``dense`` (the masked weights run as dense matmuls: what a pruned checkpoint gives as is), ``csr``
(every pruned linear a :class:`~ellava_lib.speed.sparse.SparseLinear`), ``bitmask`` (every pruned linear a
:class:`~ellava_lib.speed.bitmask.BitmaskLinear`, CPU), ``auto``
(:func:`~ellava_lib.speed.sparse.sparsify_model`: per layer the fastest of bitmask / CSR / dense measured on
one decode row and the prefill rows), and ``semi`` (2:4 on CUDA only). ``--dtypes float32,bfloat16`` repeats
the layer cases per dtype (the tiny model runs in float32).

Memory bandwidth: :func:`read_bandwidth` (the faster of a sum and a dot product over a 512 MiB tensor, bytes
read / time, best of 9) and the copy rate of the same tensor (read + write bytes / time), same threads. Each
decode record of a layer case has ``bytes_read`` (weights bytes the kernels read: :func:`weight_bytes`) and
``bw_fraction = bytes_read / time / read bandwidth``: how close the decode step runs to the machine's
memory-bandwidth limit.

Usage::

    python benchmarks/latency.py --out benchmarks/results/latency_quick.json --quick
    python benchmarks/latency.py --out benchmarks/results/latency.json --model ~/.cache/ellava/models/tiny-...
    python benchmarks/latency.py --out benchmarks/results/latency.json --threads 2 --cases llava7b:mlp \
        --patterns 0.5:unstructured,0.7:unstructured,0.5:2:4 --dtypes float32,bfloat16 --tiny-untrained \
        --readme README.md                                   # the table of docs/speed.md
    python benchmarks/latency.py --results benchmarks/results/latency.json --markdown latency.md  # table only
    python benchmarks/latency.py --out /tmp/prefill_bf16.json --threads 2 --cases llava7b:mlp --dtypes bfloat16 \
        --patterns 0.5:unstructured,0.7:unstructured --tile-kib 4096     # bf16 prefill: bitmask tile decode vs dense

The bitmask prefill rows time the tile decode (:meth:`~ellava_lib.speed.bitmask.BitmaskLinear._tiled`, no dense
copy; ``--tile-kib`` sets the tile size, recorded as ``tile_kib``); the ``auto`` rows time whatever ``auto`` chose.

``--markdown FILE`` writes :func:`to_markdown` of the records (this script holds the table function).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRotaryEmbedding,
)

from ellava_lib.model import structure
from ellava_lib.prune.masks import magnitude_mask
from ellava_lib.speed import bitmask, flops, sparse
from ellava_lib.speed.timing import interleaved_ms, sync

SHAPES = {  # name: (model, hidden, intermediate, heads, kv_heads)
    "smollm2": ("SmolLM2-135M", 576, 1536, 9, 3),
    "llava7b": ("llava-1.5-7b", 4096, 11008, 32, 32),
}
#: Prefill tokens of the 7B MLP under ``--quick`` (600 tokens take ~2 s per dense MLP call on 2 cores).
QUICK_7B_TOKENS = 64
PATTERNS = [(0.5, "unstructured"), (0.7, "unstructured"), (0.9, "unstructured"), (0.5, "2:4")]
#: The paper's headline speedup over dense LLaVA-1.5-7B (abstract; hardware and runtime not stated).
PAPER_SPEEDUP = 1.8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------- bandwidth


def read_bandwidth(mib: int = 512, repeats: int = 9) -> dict[str, float]:
    """``{"read_gbs", "copy_gbs"}`` in GB/s (1e9 bytes), best of ``repeats`` (the capacity, not a typical run), over
    a ``mib`` MiB float32 tensor ``t`` with torch's threads: read = bytes read / time, the faster of ``t.sum()``
    and ``torch.dot(t, t)`` (each element read once); copy = (read + write bytes) / time of ``u.copy_(t)``."""
    t = torch.ones(mib * 2**20 // 4)
    u = torch.empty_like(t)
    n = t.numel() * 4
    read = min(_best_s(lambda: t.sum(), repeats), _best_s(lambda: torch.dot(t, t), repeats))
    return {"read_gbs": n / read / 1e9, "copy_gbs": 2 * n / _best_s(lambda: u.copy_(t), repeats) / 1e9}


def _best_s(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of weights (and sparse index data) a forward reads from memory, summed over the linears:
    dense ``n b``; CSR ``nnz (b + i) + (d_out + 1) i`` (``i`` index bytes); bitmask ``nnz b + d_out R +
    8 (d_out + 1)`` (``R`` mask bytes per row, :func:`bitmask.row_bytes`). Biases are left out (``d_out b``)."""
    total = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, sparse.SparseLinear):
            total += sum(t.numel() * t.element_size() for t in (m.values, m.col_indices, m.crow_indices))
        elif isinstance(m, bitmask.BitmaskLinear):
            total += sum(t.numel() * t.element_size() for t in (m.values, m.mask, m.offsets))
    return total


# ---------------------------------------------------------------------------------------------- timing


def paired_ms(dense: Callable[[], object], pruned: Callable[[], object], device: torch.device, warmup: int,
              repeats: int) -> tuple[float, float]:
    """Median wall times (ms) of ``dense()`` and ``pruned()`` over ``repeats`` runs each, after ``warmup`` runs
    each, **alternating** the two so that drift in machine load hits both alike."""
    td, tp = interleaved_ms((dense, pruned), device, repeats, warmup)
    return statistics.median(td), statistics.median(tp)


# -------------------------------------------------------------------------------------------- pruning


def kth_smallest_abs(weight: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest ``|w|`` (1-based), as ``weight.abs().flatten().kthvalue(k).values``. For 16-bit floats
    exactly that value from a histogram of the magnitude bit patterns (sign bit cleared, a non-negative float's
    bits order as its value): ``bincount`` + ``cumsum``, several times faster than ``kthvalue`` on a 7B layer."""
    if weight.dtype not in (torch.bfloat16, torch.float16):
        return weight.abs().flatten().kthvalue(k).values
    codes = (weight.detach().reshape(-1).view(torch.int16) & 0x7FFF).to(torch.int32)
    code = int(torch.searchsorted(torch.bincount(codes, minlength=2**15).cumsum(0), k))
    return torch.tensor(code, dtype=torch.int16).view(weight.dtype)


@torch.no_grad()
def mask_linears(module: nn.Module, sparsity: float, pattern: str) -> None:
    """Magnitude masks on every ``nn.Linear`` of ``module`` (in place): ``N:M`` via ``masks.magnitude_mask``;
    unstructured as ``|w| <= k-th smallest |w|`` (:func:`kth_smallest_abs`), ``k = round(s * numel)`` (same
    mask up to ties, and 10x faster than the library's sort on 45M weights; timing needs only the density and
    its spread)."""
    for m in module.modules():
        if type(m) is not nn.Linear:
            continue
        if ":" in pattern:
            m.weight[magnitude_mask(m.weight, sparsity, *(int(v) for v in pattern.split(":")))] = 0
        elif sparsity > 0:
            m.weight[m.weight.abs() <= kth_smallest_abs(m.weight, max(1, round(sparsity * m.weight.numel())))] = 0


def apply_backend(module: nn.Module, backend: str, rows: list[int], cache: dict,
                  policy=None) -> tuple[nn.Module, int, int]:
    """A copy of the masked ``module`` run by ``backend``; returns ``(module, swapped, pruned linears)``."""
    out = copy.deepcopy(module)
    if backend == "dense":
        n = len(sparse._targets(out, policy))
        return out, 0, n
    force = {"csr": 0.0, "semi": 0.0, "bitmask": 0.0}.get(backend, sparse.MIN_SPEEDUP)
    table = sparse.sparsify_model(out, policy, backend="auto" if backend == "auto" else backend,
                                  example_inputs=rows, min_speedup=force, cache=cache, min_time_s=0.0)
    return out, int((table["backend_chosen"] != "dense").sum()), len(table)


# -------------------------------------------------------------------------------------- decoder layers


class FrozenKV:
    """A KV cache that returns ``cache ++ new`` without keeping ``new``: every timed step sees ``kv_len``."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        return torch.cat([self.k, k], dim=-2), torch.cat([self.v, v], dim=-2)


def layer_config(hidden: int, inter: int, heads: int, kv_heads: int) -> LlamaConfig:
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, num_hidden_layers=1, vocab_size=32)
    cfg._attn_implementation = "sdpa"
    return cfg


def meta_llava(text: LlamaConfig) -> nn.Module:
    """A 1-layer LLaVA on the meta device with ``text``'s decoder: the FLOP model of one decoder layer."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    return structure.meta_model(LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1))


def layer_cases(name: str, component: str, tokens: int, device: torch.device, dtype: torch.dtype,
                backends: list[str], warmup: int, repeats: int, cache: dict, patterns: list | None = None,
                bandwidth: float | None = None) -> list[dict]:
    """Records of one decoder layer (``component='layer'``) or its MLP alone (``'mlp'``)."""
    model_name, hidden, inter, heads, kv_heads = SHAPES[name]
    cfg = layer_config(hidden, inter, heads, kv_heads)
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, 0).to(device=device, dtype=dtype).eval()
    module: nn.Module = layer.mlp if component == "mlp" else layer
    head_dim = hidden // heads
    gen = torch.Generator().manual_seed(0)
    x_pre = torch.randn(1, tokens, hidden, generator=gen).to(device, dtype)
    x_dec = torch.randn(1, 1, hidden, generator=gen).to(device, dtype)
    rope = LlamaRotaryEmbedding(cfg).to(device)
    pos_pre = rope(x_pre, torch.arange(tokens, device=device)[None])
    pos_dec = rope(x_dec, torch.tensor([[tokens]], device=device))
    kv = FrozenKV(torch.randn(1, kv_heads, tokens, head_dim, generator=gen).to(device, dtype),
                  torch.randn(1, kv_heads, tokens, head_dim, generator=gen).to(device, dtype))

    def runners(m: nn.Module) -> dict[str, Callable[[], object]]:
        if component == "mlp":
            return {"prefill": lambda: m(x_pre), "decode": lambda: m(x_dec)}
        return {"prefill": lambda: m(x_pre, position_embeddings=pos_pre),
                "decode": lambda: m(x_dec, position_embeddings=pos_dec, past_key_values=kv)}

    meta = meta_llava(cfg)
    units = ["lm.0.mlp"] if component == "mlp" else ["lm.0.attn", "lm.0.mlp"]
    scope = "units" if component == "mlp" else "decoder"
    shape = f"d={hidden},ff={inter},h={heads},kv={kv_heads}"
    records = []
    dense_bytes = weight_bytes(module)
    with torch.no_grad():
        base = runners(module)
        for sparsity, pattern in patterns or PATTERNS:
            masked = copy.deepcopy(module)
            mask_linears(masked, sparsity, pattern)
            for backend in backends:
                if backend == "semi" and (pattern != "2:4" or device.type != "cuda"):
                    continue
                if backend == "csr" and device.type == "cpu" and dtype not in (torch.float32, torch.float64):
                    continue  # torch's CPU CSR matmul is float32/float64 only
                run_mod, swapped, n_lin = apply_backend(masked, backend, [1, tokens], cache)
                for phase, fn in runners(run_mod).items():
                    dense_ms, ms = paired_ms(base[phase], fn, device, warmup, repeats)
                    fr = flops.flop_ratio(meta, {u: sparsity for u in units}, phase, scope,
                                               n_visual_tokens=0, n_text_tokens=tokens, kv_len=tokens)
                    records.append({"model": model_name, "component": component, "shape": shape, "phase": phase,
                                    "tokens": tokens if phase == "prefill" else 1,
                                    "kv_len": tokens if phase == "decode" and component == "layer" else 0,
                                    "sparsity": sparsity, "pattern": pattern, "backend": backend,
                                    "swapped": f"{swapped}/{n_lin}", "dense_ms": dense_ms, "pruned_ms": ms,
                                    "tokens_per_s": 1e3 / ms if phase == "decode" else None,
                                    "flop_ratio": fr, "measured_ratio": dense_ms / ms,
                                    **_bytes_fields(phase, dense_bytes, weight_bytes(run_mod), dense_ms, ms,
                                                    bandwidth)})
                del run_mod
            del masked
            print(f"  {model_name} {component} {sparsity:.0%} {pattern}", file=sys.stderr, flush=True)
    return records


def _bytes_fields(phase: str, dense_bytes: int, pruned_bytes: int, dense_ms: float, ms: float,
                  bandwidth: float | None) -> dict:
    """Decode only: bytes read, the memory-bound limit ``dense bytes / pruned bytes`` and the fraction of the
    read bandwidth reached (``bytes / time / bandwidth``), dense and pruned."""
    if phase != "decode" or not bandwidth:
        return {}
    return {"bytes_read": pruned_bytes, "bw_limit_ratio": dense_bytes / pruned_bytes,
            "bw_fraction": pruned_bytes / (ms * 1e-3) / (bandwidth * 1e9),
            "dense_bw_fraction": dense_bytes / (dense_ms * 1e-3) / (bandwidth * 1e9)}


# ----------------------------------------------------------------------------------------- tiny LLaVA


def untrained_tiny(out: Path) -> Path:
    """The tiny tier's architecture (:class:`~ellava_lib.model.tiny.TinyConfig` defaults) with its processor and
    random weights (seed 0), saved into ``out``: decode time does not depend on the weights' values, and this
    takes seconds instead of the trained build."""
    from ellava_lib.model import loading, tiny

    proc = tiny.build_processor(tiny.vocabulary())
    loading.save(tiny.build_model(tiny.TinyConfig(), proc.tokenizer, seed=0), proc, out)
    return out


def model_cases(model_dir: Path, device: torch.device, backends: list[str], warmup: int, repeats: int,
                new_tokens: int, cache: dict, patterns: list | None = None) -> list[dict]:
    """Records of a built tiny LLaVA: prefill of one sample, then ``new_tokens`` greedy decode steps."""
    from ellava_lib.core import units
    from ellava_lib.core.policy import Policy
    from ellava_lib.data import calibration
    from ellava_lib.data.prompts import sample_prompt
    from ellava_lib.model.specs import load_model

    model, proc = load_model(model_dir, progress=False)
    model.to(device)
    sample = calibration.draw_calibration(1, 0)[0]
    enc = proc(text=[sample_prompt(sample)], images=[sample.image], return_tensors="pt").to(device)
    n_vis = int(model.config.image_seq_length)
    n_text = int(enc["input_ids"].shape[1]) - n_vis

    def one_run(m: nn.Module) -> tuple[float, float]:
        """``(prefill s, decode s per token)`` of one greedy generation."""
        sync(device)
        t0 = time.perf_counter()
        out = m(**enc, use_cache=True)
        sync(device)
        t1 = time.perf_counter()
        kv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = m(input_ids=tok, past_key_values=kv, use_cache=True)
            kv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        return t1 - t0, (time.perf_counter() - t1) / new_tokens

    def timings(a: nn.Module, b: nn.Module) -> tuple[dict[str, float], dict[str, float]]:
        """Medians (ms) of ``a`` and ``b`` per phase, runs alternating after ``warmup`` runs each."""
        runs: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
        for i in range(warmup + repeats):
            for k, m in enumerate((a, b)):
                t = one_run(m)
                if i >= warmup:
                    runs[k].append(t)
        return tuple({ph: 1e3 * statistics.median(r[j] for r in runs[k]) for j, ph in enumerate(("prefill", "decode"))}
                     for k in (0, 1))

    records = []
    with torch.no_grad():
        for sparsity, pattern in patterns or PATTERNS:
            policy = Policy.uniform(units.list_units(model), sparsity)
            masked = copy.deepcopy(model)
            for lins in units.unit_linears(masked).values():
                for lin in lins.values():
                    mask_linears(lin, sparsity, pattern)
            for backend in backends:
                if backend == "semi" and (pattern != "2:4" or device.type != "cuda"):
                    continue
                run_mod, swapped, n_lin = apply_backend(masked, backend, [1, int(enc["input_ids"].numel())],
                                                        cache, policy)
                dense_ms, ms = timings(model, run_mod)
                for phase in ("prefill", "decode"):
                    fr = flops.flop_ratio(model, policy, phase, "model", n_visual_tokens=n_vis,
                                               n_text_tokens=n_text)
                    records.append({"model": "tiny", "component": "model", "shape": str(Path(model_dir).name),
                                    "phase": phase, "tokens": n_vis + n_text if phase == "prefill" else 1,
                                    "kv_len": n_vis + n_text if phase == "decode" else 0, "sparsity": sparsity,
                                    "pattern": pattern, "backend": backend, "swapped": f"{swapped}/{n_lin}",
                                    "dense_ms": dense_ms[phase], "pruned_ms": ms[phase],
                                    "tokens_per_s": 1e3 / ms[phase] if phase == "decode" else None,
                                    "flop_ratio": fr, "measured_ratio": dense_ms[phase] / ms[phase]})
                del run_mod
    return records


# -------------------------------------------------------------------------------------------- report


def _pct(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.0%}"


def to_markdown(records: list[dict]) -> str:
    """One row per (model, component, dtype, phase, sparsity, pattern, backend): FLOP ratio and measured ratio
    side by side (``measured / FLOP`` = the fraction of the counted speedup that was delivered); for decode of
    the layer cases also the memory-bound limit (dense bytes / pruned bytes) and the fraction of the read
    bandwidth reached."""
    head = ("| model | component | dtype | phase | sparsity | pattern | backend | swapped | dense ms | pruned ms | "
            "FLOP ratio | measured ratio | delivered | bandwidth limit | of read bandwidth |")
    lines = [head, "|" + "---|" * 15]
    for r in records:
        limit = f"{r['bw_limit_ratio']:.2f}x" if r.get("bw_limit_ratio") else ""
        lines.append(f"| {r['model']} | {r['component']} | {r.get('dtype', '')} | {r['phase']} | "
                     f"{r['sparsity']:.0%} | {r['pattern']} | {r['backend']} | {r.get('swapped', '')} | "
                     f"{r['dense_ms']:.3f} | {r['pruned_ms']:.3f} | {r['flop_ratio']:.2f}x | "
                     f"{r['measured_ratio']:.2f}x | {r['measured_ratio'] / r['flop_ratio']:.0%} | {limit} | "
                     f"{_pct(r.get('bw_fraction'))} |")
    return "\n".join(lines) + "\n"


#: Tiers with no measurement in the records, and why (shown as rows of the summary).
NOT_MEASURED = {
    "smol (SmolLM2-135M LLaVA)": "not measured in this table: end-to-end decode below (benchmarks/e2e_decode.py)",
    "GPU 2:4 (semi-structured)": "not measured: no GPU",
}


def summary_markdown(records: list[dict]) -> str:
    """Per tier and sparsity: the FLOP ratio (counted), the measured ratio (timed here) and the paper's claimed
    speedup, three different things side by side. Rows: the tiny model end to end (``auto`` and ``bitmask``,
    decode tokens/s), the 7B-shaped MLP (decode with ``bitmask``, prefill with ``auto``), and the tiers not
    measured (:data:`NOT_MEASURED`)."""
    head = ("| tier | what is timed | dtype | phase | sparsity | backend | FLOP ratio (counted) | "
            "measured ratio (this CPU) | tokens/s dense -> pruned | paper's claim | bandwidth limit | "
            "of read bandwidth |")
    lines = [head, "|" + "---|" * 12]
    keep = [r for r in records if (r["component"] == "model" and r["backend"] in ("auto", "bitmask")) or
            (r["component"] == "mlp" and ((r["phase"] == "decode" and r["backend"] == "bitmask") or
                                          (r["phase"] == "prefill" and r["backend"] == "auto")))]
    for r in keep:
        tier, timed = (("tiny (untrained weights)" if "untrained" in str(r.get("shape")) else "tiny", "whole model")
                       if r["component"] == "model" else ("paper (LLaVA-1.5-7B shapes)", "MLP layers"))
        tps = (f"{1e3 / r['dense_ms']:.1f} -> {1e3 / r['pruned_ms']:.1f}" if r["phase"] == "decode" and
               r["component"] == "model" else "")
        limit = f"{r['bw_limit_ratio']:.2f}x" if r.get("bw_limit_ratio") else ""
        lines.append(f"| {tier} | {timed} | {r.get('dtype', '')} | {r['phase']} | {r['sparsity']:.0%} "
                     f"{r['pattern']} | {r['backend']} ({r.get('swapped', '')}) | {r['flop_ratio']:.2f}x | "
                     f"**{r['measured_ratio']:.2f}x** | {tps} | x{PAPER_SPEEDUP} | {limit} | "
                     f"{_pct(r.get('bw_fraction'))} |")
    for tier, why in NOT_MEASURED.items():
        lines.append(f"| {tier} | {why} | | | | | | | | x{PAPER_SPEEDUP} | | |")
    return "\n".join(lines) + "\n"


def splice_readme(readme: Path, records: list[dict], source: Path) -> None:
    """Put :func:`summary_markdown`, the setup line and :func:`to_markdown` of ``records`` into the ``latency``
    block of the project whose README is ``readme`` (:func:`report.update_readme`: today docs/speed.md)."""
    from ellava_lib.run.report import update_readme

    r = records[0] if records else {}
    bw = (f" Memory bandwidth {r['read_gbs']:.1f} GB/s read (sum / dot), {r['copy_gbs']:.1f} GB/s copy "
          f"(read + write), best of 9."
          if r.get("read_gbs") else "")
    build = (f" Bitmask kernel: {r['bitmask_paths']} path, extension loaded in {r['bitmask_load_s']:.1f} s."
             if r.get("bitmask_paths") else "")
    setup = (f"*Generated by `python benchmarks/latency.py` from `{source}`: device {r.get('device')}, "
             f"{r.get('threads')} torch thread(s), torch {r.get('torch')}, median of "
             f"{r.get('repeats')} runs after {r.get('warmup')} warm-up{' (--quick)' if r.get('quick') else ''}, "
             f"dense timed in the same process, alternating with the pruned module.{bw}{build}*")
    note = (f"FLOP ratio = dense FLOPs / pruned FLOPs (counted); measured ratio = dense time / pruned time "
            f"(timed here); paper's claim = the x{PAPER_SPEEDUP} over dense LLaVA-1.5-7B in EfficientLLaVA's "
            f"abstract (whole model, its hardware and runtime not stated): a different quantity, shown for "
            f"reference. Bandwidth limit = dense weight bytes / pruned weight bytes (the best a memory-bound "
            f"decode can do); of read bandwidth = bytes read / time / measured read bandwidth.")
    update_readme(readme, "latency", summary_markdown(records) + "\n" + note + "\n\n" + setup + "\n\n"
                  + to_markdown(records))


def _patterns(text: str | None) -> list[tuple[float, str]] | None:
    """``"0.5:unstructured,0.5:2:4"`` -> ``[(0.5, "unstructured"), (0.5, "2:4")]``."""
    if not text:
        return None
    out = []
    for item in text.split(","):
        s, _, pattern = item.partition(":")
        out.append((float(s), pattern))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="JSON file of the records")
    ap.add_argument("--quick", action="store_true",
                    help=f"SmolLM2 layer + the 7B MLP at {QUICK_7B_TOKENS} prefill tokens, 3 repeats (< 2 min)")
    ap.add_argument("--model", type=Path, help="a built tiny LLaVA folder to time end to end")
    ap.add_argument("--tiny-untrained", action="store_true",
                    help="time the tiny architecture end to end with random weights (untrained_tiny)")
    ap.add_argument("--tokens", type=int, default=600, help="prefill tokens / KV length (576 visual + 24 text)")
    ap.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per run (--model)")
    ap.add_argument("--repeats", type=int, help="timed runs (default 10, --quick 3)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", help="comma list of layer-case dtypes (default: float16 on CUDA, float32 on CPU)")
    ap.add_argument("--patterns", help="comma list of SPARSITY:PATTERN, e.g. 0.5:unstructured,0.5:2:4 "
                                       "(default: 50/70/90%% unstructured and 50%% 2:4)")
    ap.add_argument("--cases", help="comma list of SHAPE:layer|mlp[:TOKENS] (default: smollm2:layer,llava7b:layer; "
                    "--quick: smollm2:layer,llava7b:mlp:64)")
    ap.add_argument("--tile-kib", type=int, help="bitmask prefill: KiB of W decoded per tile (bitmask.TILE_BYTES, "
                                                 f"default {bitmask.TILE_BYTES // 1024}); recorded as tile_kib")
    ap.add_argument("--markdown", type=Path, help="also write the Markdown table (to_markdown) here")
    ap.add_argument("--results", type=Path, help="make the Markdown table of an existing JSON; time nothing")
    ap.add_argument("--readme", type=Path, help="splice the tables (with the measurement setup) between the "
                                                "<!-- latency:start/end --> markers of this README or of the "
                                                "docs/*.md page beside it that holds them")
    args = ap.parse_args(argv)
    if args.results is not None:
        if args.markdown is None and args.readme is None:
            ap.error("--results needs --markdown or --readme")
        records = json.loads(args.results.read_text())
        if args.markdown is not None:
            args.markdown.write_text(to_markdown(records))
        if args.readme is not None:
            splice_readme(args.readme, records, args.results)
        return 0
    if args.out is None:
        ap.error("--out is required")
    try:
        patterns = _patterns(args.patterns)
        dtypes = [DTYPES[d] for d in (args.dtypes or "").split(",") if d]
    except (ValueError, KeyError) as e:
        ap.error(f"bad --patterns or --dtypes: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tile_kib:
        bitmask.TILE_BYTES = args.tile_kib * 1024
    device = torch.device(args.device)
    dtypes = dtypes or [torch.float16 if device.type == "cuda" else torch.float32]
    repeats = args.repeats or (3 if args.quick else 10)
    info = bitmask.extension_info() if device.type == "cpu" else {"available": False}
    backends = (["dense", "csr"] + (["bitmask"] if info["available"] else []) + ["auto"]
                + (["semi"] if device.type == "cuda" else []))
    if args.cases:
        cases = [tuple(c.split(":")) for c in args.cases.split(",")]
        bad = [c for c in cases if len(c) not in (2, 3) or c[0] not in SHAPES or c[1] not in ("layer", "mlp")]
        if bad:
            ap.error(f"--cases takes SHAPE:layer|mlp[:TOKENS] with SHAPE in {sorted(SHAPES)}, got {bad}")
    elif args.quick:
        cases = [("smollm2", "layer"), ("llava7b", "mlp", str(QUICK_7B_TOKENS))]
    else:
        cases = [("smollm2", "layer"), ("llava7b", "layer")]
    bw = read_bandwidth() if device.type == "cpu" else {}
    print(f"bandwidth {bw}, bitmask {info}", file=sys.stderr, flush=True)
    cache: dict = {}
    records: list[dict] = []
    t0 = time.time()
    model_dirs = [args.model] if args.model is not None else []
    if args.tiny_untrained:
        import tempfile

        model_dirs.append(untrained_tiny(Path(tempfile.mkdtemp()) / "tiny-untrained"))
    for model_dir in model_dirs:
        records += [{**r, "dtype": "float32"} for r in
                    model_cases(model_dir, device, backends, args.warmup, repeats, args.new_tokens, cache, patterns)]
    for dtype in dtypes:
        for name, component, *tok in cases:
            recs = layer_cases(name, component, int(tok[0]) if tok else args.tokens, device, dtype, backends,
                               args.warmup, repeats, cache, patterns, bw.get("read_gbs"))
            records += [{**r, "dtype": str(dtype).replace("torch.", "")} for r in recs]
            print(f"[{time.time() - t0:.0f} s] {name} {component} {dtype} done", file=sys.stderr, flush=True)
    seconds = round(time.time() - t0, 1)
    env = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "machine": platform.machine(), "repeats": repeats,
           "warmup": args.warmup, "quick": args.quick, **bw,
           "bitmask_paths": "/".join(info.get("paths") or []) or None, "bitmask_load_s": info.get("seconds"),
           "tile_kib": bitmask.TILE_BYTES // 1024, "seconds": seconds}
    records = [{**r, **env} for r in records]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(to_markdown(records))
    if args.readme is not None:
        splice_readme(args.readme, records, args.out)
    print(summary_markdown(records))
    print(to_markdown(records))
    print(f"{len(records)} records in {seconds} s ({env['threads']} threads, torch {env['torch']}) -> {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
