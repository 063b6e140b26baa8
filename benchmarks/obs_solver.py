"""Benchmark the SparseGPT OBS solver against the dense reference (and magnitude pruning).

For each layer shape ``d_out x d_in`` a random weight ``W`` and ``N`` correlated calibration rows
``X`` are drawn (seeded), ``H = 2/N X^T X`` is accumulated with :class:`SparseGPT.add_batch`, and
the layer is pruned by

* ``sparsegpt``  — :meth:`ellava_lib.prune.obs.SparseGPT.prune` (fp32, Cholesky trick, lazy blocks);
* ``reference``  — :func:`ellava_lib.prune.obs.obs_prune_reference` (explicit inverse, column by column,
  float64 by default; O(d_in^3) Python-loop work, skipped above ``--reference-max-cols``);
* ``magnitude``  — per-layer lowest ``|w|`` (baseline, no weight update).

Reported per (shape, method): wall seconds, the reconstruction error
``||W X - Ŵ X||_F^2 / N = trace((W - Ŵ) H (W - Ŵ)^T) / 2`` (undamped ``H``), that error
normalised by ``||W X||_F^2 / N``, and the relative difference to the reference's error.

Usage::

    python benchmarks/obs_solver.py                 # 1024x1024, N=2048
    python benchmarks/obs_solver.py --large         # + 4096x4096 and 4096x11008
    python benchmarks/obs_solver.py --shape 512x2048 --prune-n 2 --prune-m 4
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ellava_lib.prune.masks import magnitude_mask
from ellava_lib.prune.obs import SparseGPT, reconstruction_error
from ellava_lib.prune.obs_reference import obs_prune_reference
from ellava_lib.speed.timing import sync

DEFAULT_SHAPES: list[tuple[int, int]] = [(1024, 1024)]
LARGE_SHAPES: list[tuple[int, int]] = [(4096, 4096), (4096, 11008)]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "obs_solver.json"


def parse_shape(text: str) -> tuple[int, int]:
    """``"4096x11008"`` -> ``(4096, 11008)`` (d_out x d_in)."""
    try:
        d_out, d_in = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"shape must look like 1024x4096, got {text!r}") from exc
    return d_out, d_in


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--large", action="store_true", help="also run 4096x4096 and 4096x11008")
    p.add_argument("--shape", type=parse_shape, action="append", default=None,
                   help="d_out x d_in, repeatable; replaces the default 1024x1024")
    p.add_argument("--nsamples", type=int, default=2048, help="calibration rows N")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--prune-n", type=int, default=0)
    p.add_argument("--prune-m", type=int, default=0)
    p.add_argument("--blocksize", type=int, default=128)
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--reference-dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--reference-max-cols", type=int, default=4096,
                   help="skip the O(d_in^3) reference when d_in exceeds this")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs per method; the minimum is reported (all are kept)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed 64x128 warm-up (first LAPACK/BLAS calls are slow)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def correlated_inputs(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, d)`` activations: low-rank shared factor + noise, log-normal feature scales, a few
    large outlier features and a mean offset (roughly the structure of LLM activations)."""
    rank = min(256, max(2, d // 4))
    x = torch.randn(n, rank, generator=gen) @ torch.randn(rank, d, generator=gen) / math.sqrt(rank)
    x += 0.3 * torch.randn(n, d, generator=gen)
    scale = torch.exp(0.5 * torch.randn(d, generator=gen))
    outliers = torch.randperm(d, generator=gen)[: max(1, d // 256)]
    scale[outliers] *= 10.0
    return x * scale + 0.1 * torch.randn(d, generator=gen)


def make_problem(
    d_out: int, d_in: int, nsamples: int, seed: int, device: torch.device
) -> tuple[torch.nn.Linear, SparseGPT]:
    """A seeded random layer and a solver whose Hessian has seen ``nsamples`` correlated rows."""
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(d_out, d_in, generator=gen) / math.sqrt(d_in))
    layer = layer.to(device)
    solver = SparseGPT(layer)
    x = correlated_inputs(nsamples, d_in, gen)
    for chunk in x.split(512):
        solver.add_batch(chunk.to(device))
    return layer, solver


def run_shape(shape: tuple[int, int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Prune one random layer with every method; return one record per method."""
    device = torch.device(args.device)
    d_out, d_in = shape
    layer, solver = make_problem(d_out, d_in, args.nsamples, args.seed, device)
    w0 = layer.weight.detach().clone()
    H = solver.H.clone()
    energy = reconstruction_error(w0, torch.zeros_like(w0), H)
    kw = dict(prune_n=args.prune_n, prune_m=args.prune_m, blocksize=args.blocksize,
              percdamp=args.percdamp)
    results: dict[str, dict[str, Any]] = {}

    times = []
    for _ in range(max(1, args.repeats)):
        with torch.no_grad():
            layer.weight.copy_(w0)
        stats = solver.prune(args.sparsity, **kw)
        times.append(stats.seconds)
    results["sparsegpt"] = dict(
        seconds=min(times), all_seconds=times, w_hat=layer.weight.detach().clone(),
        obs_loss=stats.error, damp_used=stats.damp_used, compute_dtype="float32",
        solver_method=stats.method,
    )

    if d_in <= args.reference_max_cols:
        times = []
        for _ in range(max(1, args.repeats)):
            sync(device)
            tick = time.perf_counter()
            w_ref, loss_ref = obs_prune_reference(
                w0, H, args.sparsity, dtype=getattr(torch, args.reference_dtype), **kw
            )
            sync(device)
            times.append(time.perf_counter() - tick)
        results["reference"] = dict(
            seconds=min(times), all_seconds=times, w_hat=w_ref, obs_loss=loss_ref,
            compute_dtype=args.reference_dtype,
        )
    else:
        print(f"  skipping reference for {d_out}x{d_in}: d_in={d_in} > --reference-max-cols="
              f"{args.reference_max_cols} (dense column-by-column elimination is O(d_in^3) in a "
              f"Python loop of d_in steps; raise the flag to force it)")

    sync(device)
    tick = time.perf_counter()
    w_mag = w0.masked_fill(magnitude_mask(w0, args.sparsity, args.prune_n, args.prune_m), 0.0)
    sync(device)
    results["magnitude"] = dict(seconds=time.perf_counter() - tick, w_hat=w_mag,
                                compute_dtype="float32")

    errors = {m: reconstruction_error(w0, r["w_hat"], H) for m, r in results.items()}
    ref_error = errors.get("reference")
    records = []
    for method, r in results.items():
        w_hat = r.pop("w_hat")
        rel = None if ref_error is None else (errors[method] - ref_error) / ref_error
        records.append(dict(
            shape=[d_out, d_in], method=method, seconds=r.pop("seconds"), error=errors[method],
            normalized_error=errors[method] / energy if energy > 0 else None,
            relative_error_vs_reference=rel,
            sparsity_measured=float((w_hat == 0).float().mean().item()),
            nsamples=args.nsamples, sparsity=args.sparsity,
            pattern=f"{args.prune_n}:{args.prune_m}" if args.prune_n else "unstructured",
            blocksize=args.blocksize, percdamp=args.percdamp, seed=args.seed,
            torch=torch.__version__, device=device_name(device), threads=torch.get_num_threads(),
            **r,
        ))
    solver.free()
    return records


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"


def print_table(records: list[dict[str, Any]]) -> None:
    print(f"{'shape':>12} {'method':>10} {'seconds':>9} {'error':>12} {'norm.err':>9} {'rel.vs.ref':>11}")
    for r in records:
        rel = r["relative_error_vs_reference"]
        print(f"{'x'.join(map(str, r['shape'])):>12} {r['method']:>10} {r['seconds']:9.3f} "
              f"{r['error']:12.5g} {r['normalized_error']:9.4f} "
              f"{'n/a' if rel is None else f'{rel:+.2e}':>11}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    shapes = list(args.shape or DEFAULT_SHAPES)
    if args.large:
        shapes += [s for s in LARGE_SHAPES if s not in shapes]
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"N={args.nsamples}, sparsity={args.sparsity}, n:m={args.prune_n}:{args.prune_m}")
    if not args.no_warmup:
        warm = argparse.Namespace(**{**vars(args), "repeats": 1, "reference_max_cols": 1 << 30})
        run_shape((64, 128), warm)
    records: list[dict[str, Any]] = []
    for shape in shapes:
        print(f"shape {shape[0]}x{shape[1]} ...", flush=True)
        records += run_shape(shape, args)
    print_table(records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   python=sys.version.split()[0], records=records)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
