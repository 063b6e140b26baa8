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

Masks: magnitude, unstructured at 50/70/90%, and 2:4 (both on all seven linears). Backends: ``dense`` (the
masked weights run as dense matmuls: what a pruned checkpoint gives as is), ``csr`` (every pruned linear a
:class:`~ellava_lib.speed.sparse.SparseLinear`), ``auto``
(:func:`~ellava_lib.speed.sparse.sparsify_model`: CSR only where
measured faster), and ``semi`` (2:4 on CUDA only).

Usage::

    python benchmarks/latency.py --out benchmarks/results/latency_quick.json --quick
    python benchmarks/latency.py --out benchmarks/results/latency.json --model ~/.cache/ellava/models/tiny-...
    python benchmarks/latency.py --results benchmarks/results/latency.json --markdown latency.md  # table only

``--markdown FILE`` writes :func:`to_markdown` of the records (this script holds the table function).
"""

from __future__ import annotations

import argparse
import copy
import json
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
from ellava_lib.speed import flops, sparse
from ellava_lib.speed.timing import sync

SHAPES = {  # name: (model, hidden, intermediate, heads, kv_heads)
    "smollm2": ("SmolLM2-135M", 576, 1536, 9, 3),
    "llava7b": ("llava-1.5-7b", 4096, 11008, 32, 32),
}
#: Prefill tokens of the 7B MLP under ``--quick`` (600 tokens take ~2 s per dense MLP call on 2 cores).
QUICK_7B_TOKENS = 64
PATTERNS = [(0.5, "unstructured"), (0.7, "unstructured"), (0.9, "unstructured"), (0.5, "2:4")]


# ---------------------------------------------------------------------------------------------- timing


def paired_ms(dense: Callable[[], object], pruned: Callable[[], object], device: torch.device, warmup: int,
              repeats: int) -> tuple[float, float]:
    """Median wall times (ms) of ``dense()`` and ``pruned()`` over ``repeats`` runs each, after ``warmup`` runs
    each, **alternating** the two so that drift in machine load hits both alike."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for i in range(warmup + repeats):
        for k, fn in enumerate((dense, pruned)):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[0]), 1e3 * statistics.median(times[1])


# -------------------------------------------------------------------------------------------- pruning


@torch.no_grad()
def mask_linears(module: nn.Module, sparsity: float, pattern: str) -> None:
    """Magnitude masks on every ``nn.Linear`` of ``module`` (in place): ``N:M`` via ``masks.magnitude_mask``;
    unstructured as ``|w| <= k-th smallest |w|``, ``k = round(s * numel)`` (same mask up to ties, and 10x
    faster than the library's sort on 45M weights; timing needs only the density and its spread)."""
    for m in module.modules():
        if type(m) is not nn.Linear:
            continue
        if ":" in pattern:
            m.weight[magnitude_mask(m.weight, sparsity, *(int(v) for v in pattern.split(":")))] = 0
        elif sparsity > 0:
            a = m.weight.abs()
            m.weight[a <= a.flatten().kthvalue(max(1, round(sparsity * a.numel()))).values] = 0


def apply_backend(module: nn.Module, backend: str, rows: list[int], cache: dict,
                  policy=None) -> tuple[nn.Module, int, int]:
    """A copy of the masked ``module`` run by ``backend``; returns ``(module, swapped, pruned linears)``."""
    out = copy.deepcopy(module)
    if backend == "dense":
        n = len(sparse._targets(out, policy))
        return out, 0, n
    force = {"csr": 0.0, "semi": 0.0}.get(backend, 1.0)
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
                backends: list[str], warmup: int, repeats: int, cache: dict) -> list[dict]:
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
    with torch.no_grad():
        base = runners(module)
        for sparsity, pattern in PATTERNS:
            masked = copy.deepcopy(module)
            mask_linears(masked, sparsity, pattern)
            for backend in backends:
                if backend == "semi" and (pattern != "2:4" or device.type != "cuda"):
                    continue
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
                                    "flop_ratio": fr, "measured_ratio": dense_ms / ms})
                del run_mod
            del masked
            print(f"  {model_name} {component} {sparsity:.0%} {pattern}", file=sys.stderr, flush=True)
    return records


# ----------------------------------------------------------------------------------------- tiny LLaVA


def model_cases(model_dir: Path, device: torch.device, backends: list[str], warmup: int, repeats: int,
                new_tokens: int, cache: dict) -> list[dict]:
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
        for sparsity, pattern in PATTERNS:
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


def to_markdown(records: list[dict]) -> str:
    """One row per (model, component, phase, sparsity, pattern, backend): FLOP ratio and measured ratio side
    by side (``measured / FLOP`` = the fraction of the counted speedup that was delivered)."""
    head = ("| model | component | phase | sparsity | pattern | backend | swapped | dense ms | pruned ms | "
            "FLOP ratio | measured ratio | delivered |")
    lines = [head, "|" + "---|" * 12]
    for r in records:
        lines.append(f"| {r['model']} | {r['component']} | {r['phase']} | {r['sparsity']:.0%} | {r['pattern']} | "
                     f"{r['backend']} | {r.get('swapped', '')} | {r['dense_ms']:.3f} | {r['pruned_ms']:.3f} | "
                     f"{r['flop_ratio']:.2f}x | {r['measured_ratio']:.2f}x | "
                     f"{r['measured_ratio'] / r['flop_ratio']:.0%} |")
    return "\n".join(lines) + "\n"


def splice_readme(readme: Path, records: list[dict], source: Path) -> None:
    """Put :func:`to_markdown` of ``records`` into ``readme`` (``latency`` markers), with the setup line."""
    from ellava_lib.run.report import update_readme

    r = records[0] if records else {}
    setup = (f"*Generated by `python benchmarks/latency.py` from `{source}`: device {r.get('device')}, "
             f"{r.get('dtype')}, {r.get('threads')} torch thread(s), torch {r.get('torch')}, median of "
             f"{r.get('repeats')} runs after {r.get('warmup')} warm-up{' (--quick)' if r.get('quick') else ''}.*")
    update_readme(readme, "latency", to_markdown(records) + "\n" + setup)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="JSON file of the records")
    ap.add_argument("--quick", action="store_true",
                    help=f"SmolLM2 layer + the 7B MLP at {QUICK_7B_TOKENS} prefill tokens, 3 repeats (< 2 min)")
    ap.add_argument("--model", type=Path, help="a built tiny LLaVA folder to time end to end")
    ap.add_argument("--tokens", type=int, default=600, help="prefill tokens / KV length (576 visual + 24 text)")
    ap.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per run (--model)")
    ap.add_argument("--repeats", type=int, help="timed runs (default 10, --quick 3)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cases", help="comma list of SHAPE:layer|mlp[:TOKENS] (default: smollm2:layer,llava7b:layer; "
                    "--quick: smollm2:layer,llava7b:mlp:64)")
    ap.add_argument("--markdown", type=Path, help="also write the Markdown table (to_markdown) here")
    ap.add_argument("--results", type=Path, help="make the Markdown table of an existing JSON; time nothing")
    ap.add_argument("--readme", type=Path, help="splice the table (with its measurement setup) into this README "
                                                "between the <!-- latency:start/end --> markers")
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
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    repeats = args.repeats or (3 if args.quick else 10)
    backends = ["dense", "csr", "auto"] + (["semi"] if device.type == "cuda" else [])
    if args.cases:
        cases = [tuple(c.split(":")) for c in args.cases.split(",")]
        bad = [c for c in cases if len(c) not in (2, 3) or c[0] not in SHAPES or c[1] not in ("layer", "mlp")]
        if bad:
            ap.error(f"--cases takes SHAPE:layer|mlp[:TOKENS] with SHAPE in {sorted(SHAPES)}, got {bad}")
    elif args.quick:
        cases = [("smollm2", "layer"), ("llava7b", "mlp", str(QUICK_7B_TOKENS))]
    else:
        cases = [("smollm2", "layer"), ("llava7b", "layer")]
    cache: dict = {}
    records: list[dict] = []
    t0 = time.time()
    if args.model is not None:
        records += model_cases(args.model, device, backends, args.warmup, repeats, args.new_tokens, cache)
    for name, component, *tok in cases:
        records += layer_cases(name, component, int(tok[0]) if tok else args.tokens, device, dtype, backends,
                               args.warmup, repeats, cache)
        print(f"[{time.time() - t0:.0f} s] {name} {component} done", file=sys.stderr, flush=True)
    seconds = round(time.time() - t0, 1)
    env = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "repeats": repeats, "warmup": args.warmup, "quick": args.quick}
    records = [{**r, **env} for r in records]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(to_markdown(records))
    if args.readme is not None:
        splice_readme(args.readme, records, args.out)
    print(to_markdown(records))
    print(f"{len(records)} records in {seconds} s ({env['threads']} threads, torch {env['torch']}) -> {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
