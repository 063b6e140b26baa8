"""An *estimate* of the wall time and memory of the two expensive phases, printed before a paper-profile run.

Phases (DESIGN section 3):

(a) **level database**: one dense walk of the decoder blocks over the calibration set to capture each block's
    inputs, then for every unit, every linear ``W`` (``d_out x d_in``) and every non-dense grid level, SparseGPT:
    Hessian accumulation ``2 N d_in^2`` (``N`` calibration tokens through that linear), damped Cholesky inverse
    ``(5/3) d_in^3`` (Cholesky ``d^3/3`` + ``cholesky_inverse`` ``d^3`` + upper Cholesky ``d^3/3``), the lazy
    block updates of the column sweep ``d_out d_in^2`` (GEMMs), and ``d_in`` sequential column steps, each a
    few small ops of fixed latency plus the in-block rank-1 update of the ``d_out x (B - i)`` columns left in its
    block (block size ``B``): elementwise passes over memory, not a GEMM, so priced by the bytes they move
    (``8 d_out d_in (B + 1)`` per level, :data:`UPDATE_BYTES`) at the memory bandwidth. On a 2-core CPU that
    traffic is half a level (the measured SmolLM2 level database, ``benchmarks/smol_stages.py``); on a GPU it
    is a few seconds per level at 7B, and the column steps' 25 launches (:data:`OPS_PER_COLUMN`, 10 before the
    smol calibration) are what lengthened the GPU presets' level databases (the paper plan's on ``h100``: 15
    to 36 minutes, about 4 minutes a level, SparseGPT's own order of time for a 7B model).
(b) **search**: ``generations * population`` candidates, each assembled from the database (a copy of the
    prunable weights over the host link) and evaluated by forward passes on ``samples_per_candidate``
    calibration samples; one forward pass costs :func:`ellava_lib.speed.flops.flops_per_token` ``["total"]``
    per sample, run as a roofline: ``max(FLOPs / F, weight bytes / BW)`` per batch (masked weights are
    computed densely, so a candidate costs as much as the dense model).

Time of a FLOP term = ``FLOPs / (peak * efficiency)``. Everything here is a first-order model with documented
constants, not a measurement: expect a factor of ~2 either way, and calibrate ``efficiency`` against a
measured run before trusting absolute numbers.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import torch
from transformers import LlavaConfig

from ellava_lib.core import units
from ellava_lib.model import structure
from ellava_lib.speed import flops
from ellava_lib.speed.timing import best_time

#: SparseGPT column-block size B.
BLOCK_SIZE = 128
#: Tensor ops per sequential SparseGPT column step, as :func:`obs._sparsegpt_sweep` issues them: the column and its
#: mask column (2); ``zeros_like`` and ``where`` (2); the error: subtraction, ``d[i]``, division (3); the loss:
#: ``double``, square, sum, halving, adding in (5); the rank-1 update ``W1[:, i:] -= err.unsqueeze(1) * U1[i,
#: i:].unsqueeze(0)``: two unsqueezes, ``U1``'s row and its slice, the product, ``W1``'s slice, the subtraction,
#: the write-back's slice and copy (9); storing ``q`` and ``err``, a select and a copy each (4). 10 until the smol
#: calibration: the SmolLM2 level database's per-unit times fit these 25 ops at 2 us plus the update's bytes
#: (:data:`UPDATE_BYTES`) at 9 GB/s, attention and MLP units alike.
OPS_PER_COLUMN = 25
#: Cholesky-inverse cost factor: ``INVERSE_FACTOR * d_in^3`` FLOPs.
INVERSE_FACTOR = 5.0 / 3.0
#: Bytes one element of SparseGPT's in-block rank-1 update moves: ``W1[:, i:] -= err U1[i, i:]`` is an outer
#: product into a temporary (write 4) and an in-place subtraction (read 4 + 4, write 4), in fp32.
UPDATE_BYTES = 16


@dataclass(frozen=True)
class DeviceProfile:
    """What a machine can do, as peak numbers times one ``efficiency`` factor.

    ``matmul_flops``: FLOP/s of half-precision (bf16 / fp16) matmuls: forward passes of a 16-bit tier and the
    build's bf16 autocast (tensor cores on GPUs, oneDNN's bf16 kernels on CPUs);
    ``solver_flops``: FLOP/s of plain fp32 GEMMs (BLAS ``sgemm`` on CPUs, FP32 with TF32 off on GPUs): the solver
    (Hessian, Cholesky, sweep) and every fp32 forward that does not take oneDNN (:mod:`ellava_lib.model.kernels`:
    fewer than ``MIN_ROWS`` rows, as a decode step, or a forward that needs gradients, or the pruning walks);
    ``fp32_forward_flops``: FLOP/s of the fp32 forward passes the kit routes through oneDNN
    (:func:`kernels.onednn_linears`: evaluation prefill, candidate scoring); ``None`` = ``solver_flops`` (GPUs,
    where fp32 linears are the FP32 GEMM); ``mem_bandwidth``: device memory bytes/s; ``mem_bytes``: device memory
    size; ``link_bandwidth``: host-to-device bytes/s (weights assembled from the level database);
    ``op_latency_s``: time of one small tensor op (kernel launch + Python); ``forward_bytes``: bytes per
    weight/activation in forward passes; ``efficiency``: fraction of the peak FLOP/s and bandwidths reached (1.0
    for measured numbers).
    """

    name: str
    matmul_flops: float
    solver_flops: float
    mem_bandwidth: float
    mem_bytes: float
    link_bandwidth: float
    op_latency_s: float
    forward_bytes: int = 2
    efficiency: float = 1.0
    note: str = ""
    fp32_forward_flops: float | None = None

    def eff(self, rate: float) -> float:
        """``rate * efficiency``: the rate used in the estimates."""
        return rate * self.efficiency

    def fp32_forward(self) -> float:
        """FLOP/s of an fp32 forward through the kit's oneDNN linears: ``fp32_forward_flops``, else
        ``solver_flops``."""
        return self.solver_flops if self.fp32_forward_flops is None else self.fp32_forward_flops


#: Named presets. GPU numbers are NVIDIA datasheet peaks (dense, no 2:4 sparsity) for the SXM 80 GB parts;
#: ``solver_flops`` is plain FP32 (PyTorch and the SparseGPT reference keep TF32 off for matmuls), and so is their
#: ``fp32_forward_flops`` (``None``: an fp32 linear on a GPU is that GEMM; their predictions did not move when the
#: field was added); the 0.5 efficiency is a typical achieved fraction for transformer GEMMs and bandwidth, and 8
#: us per small op is a kernel launch plus Python dispatch. ``cpu-2core`` is the 2-core development machine (AMD
#: EPYC, torch 2.13 CPU, 2 threads): bandwidth and op latency measured with :func:`measure_device_profile`; the
#: three matmul rates from a SmolLM2 forward of 32 x 96 tokens (8.5e11 FLOPs by :func:`flops.flops_per_token`)
#: through plain ``F.linear`` (MKL ``sgemm``, 7.6 s: ``solver_flops``), through the kit's oneDNN fp32 linears (5.6 s:
#: ``fp32_forward_flops``) and with bf16 weights (about 3 s: ``matmul_flops``). The smol search measured on it
#: agrees: its projector steps (forward and input-gradient backward through ``F.linear``) ran at 108 GFLOP/s.
#: Until then the preset had one rate for all three, a 1024^3 ``sgemm`` timed at 67 GFLOP/s, which priced the
#: build's bf16 autocast at a quarter of its rate and the oneDNN forwards (prefill, scoring) at under half. Its
#: memory is that machine's RAM.
PRESETS: dict[str, DeviceProfile] = {
    "h100": DeviceProfile("h100", matmul_flops=989e12, solver_flops=67e12, mem_bandwidth=3.35e12,
                          mem_bytes=80e9, link_bandwidth=64e9, op_latency_s=8e-6, forward_bytes=2,
                          efficiency=0.5, note="H100 SXM5 80GB datasheet: BF16 989 TFLOP/s dense, FP32 67, "
                          "HBM3 3.35 TB/s, PCIe Gen5 x16 64 GB/s per direction"),
    "a100": DeviceProfile("a100", matmul_flops=312e12, solver_flops=19.5e12, mem_bandwidth=2.039e12,
                          mem_bytes=80e9, link_bandwidth=32e9, op_latency_s=8e-6, forward_bytes=2,
                          efficiency=0.5, note="A100 SXM4 80GB datasheet: BF16 312 TFLOP/s dense, FP32 19.5, "
                          "HBM2e 2.04 TB/s, PCIe Gen4 x16 32 GB/s per direction"),
    "cpu-2core": DeviceProfile("cpu-2core", matmul_flops=280e9, solver_flops=110e9, mem_bandwidth=9e9,
                               mem_bytes=25.3e9, link_bandwidth=9e9, op_latency_s=2e-6, forward_bytes=4,
                               efficiency=1.0, fp32_forward_flops=150e9,
                               note="measured on the 2-core dev machine: SmolLM2 forward through fp32 sgemm 110 "
                               "GFLOP/s, oneDNN fp32 150 and bf16 280, 32 MB copy 8-17 GB/s, 2 us per small op, "
                               "25.3 GB RAM"),
}


def get_profile(name: str) -> DeviceProfile:
    """A preset by name (``h100``, ``a100``, ``cpu-2core``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown device profile {name!r}; known: {sorted(PRESETS)}") from None


def _memory_size(device: torch.device) -> float:
    """Device memory in bytes (GPU total memory, or physical RAM for the CPU)."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8e9


def measure_device_profile(device: str = "cpu", n: int = 1024, repeats: int = 3,
                           copy_mb: int = 32, name: str | None = None) -> DeviceProfile:
    """Measure a :class:`DeviceProfile` with tiny timings (well under a second on a CPU).

    - matmul FLOP/s: ``2 n^3 / t`` of an ``n x n`` matmul (bf16 forward rate on CUDA, fp32 solver rate on both;
      on CPU the forward rate is the fp32 one);
    - memory bandwidth: ``2 * bytes / t`` of copying a ``copy_mb`` MB tensor (read + write);
    - op latency: time of one in-place add on an 8-element tensor (dispatch + launch);
    - link bandwidth: host-to-device copy on CUDA, the memory bandwidth on CPU.
    Best of ``repeats`` after a warm-up; ``efficiency`` is 1 since the numbers are measured.
    """
    dev = torch.device(device)
    a32 = torch.randn(n, n, device=dev)
    b32 = torch.randn(n, n, device=dev)
    solver = 2.0 * n ** 3 / best_time(lambda: a32 @ b32, repeats, dev)
    if dev.type == "cuda":
        a16, b16 = a32.to(torch.bfloat16), b32.to(torch.bfloat16)
        matmul = 2.0 * n ** 3 / best_time(lambda: a16 @ b16, repeats, dev)
        fwd_bytes = 2
    else:
        matmul, fwd_bytes = solver, 4
    big = torch.empty(copy_mb * 2 ** 20 // 4, device=dev)
    dst = torch.empty_like(big)
    bw = 2.0 * big.numel() * 4 / best_time(lambda: dst.copy_(big), repeats, dev)
    if dev.type == "cuda":
        host = torch.empty(big.numel(), pin_memory=True)
        link = host.numel() * 4 / best_time(lambda: big.copy_(host, non_blocking=True), repeats, dev)
    else:
        link = bw
    tiny = torch.zeros(8, device=dev)
    k = 200
    lat = best_time(lambda: [tiny.add_(1.0) for _ in range(k)], repeats, dev) / k
    return DeviceProfile(name or f"measured-{dev.type}", matmul_flops=matmul, solver_flops=solver,
                         mem_bandwidth=bw, mem_bytes=_memory_size(dev), link_bandwidth=link, op_latency_s=lat,
                         forward_bytes=fwd_bytes, efficiency=1.0,
                         note=f"measured: {n}x{n} matmul, {copy_mb} MB copy, {torch.get_num_threads()} threads")


# ------------------------------------------------------------------------------------------------ estimate


@dataclass
class PhaseEstimate:
    """One phase: ``seconds`` (wall), ``flops``, ``device_peak_bytes`` (working set on the device),
    ``host_bytes`` (host RAM), ``storage_bytes`` (written to disk) and ``detail`` (seconds per term)."""

    name: str
    seconds: float
    flops: float
    device_peak_bytes: float
    host_bytes: float
    storage_bytes: float
    detail: dict[str, float] = field(default_factory=dict)


@dataclass
class CostEstimate:
    """Both phases on one :class:`DeviceProfile`; ``inputs`` records the sizes the estimate was made for."""

    profile: DeviceProfile
    level_db: PhaseEstimate
    search: PhaseEstimate
    inputs: dict

    @property
    def total_seconds(self) -> float:
        return self.level_db.seconds + self.search.seconds

    @property
    def device_peak_bytes(self) -> float:
        return max(self.level_db.device_peak_bytes, self.search.device_peak_bytes)

    @property
    def fits(self) -> bool:
        """Whether the larger working set fits in the device memory."""
        return self.device_peak_bytes <= self.profile.mem_bytes

    def to_dict(self) -> dict:
        return {"profile": asdict(self.profile), "level_db": asdict(self.level_db), "search": asdict(self.search),
                "inputs": dict(self.inputs), "total_seconds": self.total_seconds,
                "device_peak_bytes": self.device_peak_bytes, "fits": self.fits}


def _linears(config: LlavaConfig, include_vision: bool) -> list[tuple[str, int, int]]:
    """``(unit kind, d_out, d_in)`` of every prunable linear, from the meta-device model and ``units.py``."""
    model = structure.meta_model(config)
    out = []
    for unit, lins in units.unit_linears(model, include_vision).items():
        kind = unit.split(".")[0]
        out.extend((kind, lin.out_features, lin.in_features) for lin in lins.values())
    return out


def roofline(flops: float, bytes_moved: float, profile: DeviceProfile) -> float:
    """``max(flops / (F eff), bytes / (BW eff))`` seconds of one forward batch."""
    return max(flops / profile.eff(profile.matmul_flops), bytes_moved / profile.eff(profile.mem_bandwidth))


def estimate_level_db(config: LlavaConfig, profile: DeviceProfile, levels: int = 9, n_samples: int = 64,
                      n_visual_tokens: int = 576, n_text_tokens: int = flops.DEFAULT_TEXT_TOKENS,
                      include_vision: bool = False, inverse_per_level: bool = True,
                      block_size: int = BLOCK_SIZE, hessian_tokens: float | None = None,
                      forward_passes: int = 1) -> PhaseEstimate:
    """Level-database building: ``levels`` non-dense grid levels (9 for 0.1..0.9) of SparseGPT per linear.

    Per linear (``N = n_samples * tokens`` through it: ``hessian_tokens`` per sample for LM, default ``T``, the
    padded length: the Hessians take the non-padding rows only; 577 for vision): ``hessian = 2 N d_in^2`` (once),
    ``inverse = (5/3) d_in^3`` (per level if ``inverse_per_level``, as when the solver is called once per level),
    ``sweep = levels * d_out d_in^2`` FLOPs (the lazy block updates, GEMMs) at the solver rate, plus
    ``levels * d_in * OPS_PER_COLUMN * op_latency`` for the sequential column steps and
    ``column_updates = levels * UPDATE_BYTES * d_out d_in (B + 1) / 2`` bytes at the memory bandwidth for their
    in-block rank-1 updates (column ``i`` of a block of ``B`` updates the ``d_out x (B - i)`` columns after it;
    summed over a block, ``d_out B (B + 1) / 2`` elements); plus ``forward_passes`` walks of the decoder over the
    calibration set (the blocks only: the walk never runs the LM head; 2 for a sequential prune, which runs every
    block again on its pruned weights). Device memory: one decoder block's weights + the Hessians of its
    linears + two ``d_in^2`` fp32 work matrices and three fp32 copies of the largest weight + the block's input
    and output activations. Host: the whole model. Storage: every level of every unit stored densely
    (``levels * prunable params * forward_bytes``).
    """
    T = n_visual_tokens + n_text_tokens
    t_lm = T if hessian_tokens is None else hessian_tokens
    t_v = structure.vision_tokens_per_image(config)
    lins = _linears(config, include_vision)
    hess = inv = sweep = steps = updates = 0.0
    for kind, d_out, d_in in lins:
        n_tok = n_samples * (t_lm if kind == "lm" else t_v)
        hess += 2.0 * n_tok * d_in ** 2
        inv += INVERSE_FACTOR * d_in ** 3 * (levels if inverse_per_level else 1)
        sweep += levels * d_out * d_in ** 2
        steps += levels * d_in
        updates += levels * UPDATE_BYTES * d_out * d_in * (block_size + 1) / 2
    solver = profile.eff(profile.solver_flops)
    terms = flops.flops_per_token(config, n_visual_tokens, n_text_tokens)
    fwd = forward_passes * (terms["total"] - terms["lm_head"]) * n_samples
    params = structure.meta_model(config).num_parameters()
    fb = profile.forward_bytes
    detail = {"calibration_forward": roofline(fwd, forward_passes * params * fb, profile), "hessian": hess / solver,
              "inverse": inv / solver, "sweep": sweep / solver,
              "column_steps": steps * OPS_PER_COLUMN * profile.op_latency_s,
              "column_updates": updates / profile.eff(profile.mem_bandwidth)}
    t = config.text_config
    d, d_ff = t.hidden_size, t.intermediate_size
    lm = [(o, i) for k, o, i in lins if k == "lm"]
    per_block = len(lm) // t.num_hidden_layers
    block = lm[:per_block]
    max_in = max(i for _, _, i in lins)
    max_w = max(o * i for _, o, i in lins)
    device_peak = (sum(o * i for o, i in block) * fb + sum(4.0 * i * i for _, i in block) + 2 * 4.0 * max_in ** 2
                   + 3 * 4.0 * max_w + 2.0 * n_samples * T * d * fb + T * (d_ff + 4 * d) * 4.0)
    prunable = sum(o * i for _, o, i in lins)
    return PhaseEstimate("level_db", sum(detail.values()), fwd + hess + inv + sweep, device_peak,
                         params * fb, levels * prunable * fb, detail)


def estimate_search(config: LlavaConfig, profile: DeviceProfile, generations: int = 100, population: int = 16,
                    n_samples: int = 64, samples_per_candidate: int | None = None, n_visual_tokens: int = 576,
                    n_text_tokens: int = flops.DEFAULT_TEXT_TOKENS, batch_size: int = 8,
                    changed_fraction: float = 1.0, include_vision: bool = False,
                    min_batch_s: float = 0.0, logits_tokens: float | None = None) -> PhaseEstimate:
    """Evolutionary search: ``C = generations * population`` candidates.

    Per candidate: assembly ``changed_fraction * prunable params * forward_bytes / link_bandwidth`` (1.0 =
    every unit copied from the host database; a mutation changes few units, so this is an upper bound), and
    ``ceil(S / batch)`` forward batches (``S = samples_per_candidate``, default ``n_samples``; lower it to model
    multi-step selection), each ``max(batch * F_sample / F, weight bytes / BW, min_batch_s)``, with ``F_sample``
    from :func:`ellava_lib.speed.flops.flops_per_token` (the LM head at ``logits_tokens`` positions per sample,
    default all ``T``: the scoring gathers the positions its loss reads, :func:`objective.logits_at`) and
    ``min_batch_s`` the time the host takes to issue one
    forward pass's kernels (0 = not modelled; what bounds a small model:
    :func:`ellava_lib.run.smolplan.issue_seconds`). Device memory: the model's weights + per batch the
    activations ``batch * T * (d_ff + 4 d) * forward_bytes``, the attention scores
    ``batch * heads * T^2 * forward_bytes`` and fp32 logits ``batch * T * vocab * 4``. Host: the level
    database (``levels`` copies are counted in :func:`estimate_level_db`'s storage).
    """
    S = n_samples if samples_per_candidate is None else samples_per_candidate
    C = generations * population
    T = n_visual_tokens + n_text_tokens
    f_sample = flops.flops_per_token(config, n_visual_tokens, n_text_tokens, logits_tokens=logits_tokens)["total"]
    params = structure.meta_model(config).num_parameters()
    fb = profile.forward_bytes
    prunable = sum(o * i for _, o, i in _linears(config, include_vision))
    batches = math.ceil(S / batch_size) if S else 0
    b = min(batch_size, S) if S else 0
    per_batch = max(roofline(b * f_sample, params * fb, profile), min_batch_s)
    detail = {"forward": C * batches * per_batch,
              "assemble": C * changed_fraction * prunable * fb / profile.eff(profile.link_bandwidth)}
    t = config.text_config
    device_peak = (params * fb + b * T * (t.intermediate_size + 4 * t.hidden_size) * fb
                   + b * t.num_attention_heads * T ** 2 * fb + b * T * t.vocab_size * 4.0)
    return PhaseEstimate("search", sum(detail.values()), C * S * f_sample, device_peak, params * fb, 0.0, detail)


def estimate_cost(config: LlavaConfig | str = "llava-1.5-7b-hf", profile: DeviceProfile | str = "h100",
                  levels: int = 9, n_samples: int = 64, generations: int = 100, population: int = 16,
                  n_visual_tokens: int = 576, n_text_tokens: int = flops.DEFAULT_TEXT_TOKENS,
                  batch_size: int = 8, samples_per_candidate: int | None = None,
                  include_vision: bool = False) -> CostEstimate:
    """Both phases for a config (or shipped config name) on a profile (or preset name); see the two
    ``estimate_*`` functions for the formulas."""
    cfg = structure.load_config(config) if isinstance(config, str) else config
    prof = get_profile(profile) if isinstance(profile, str) else profile
    db = estimate_level_db(cfg, prof, levels, n_samples, n_visual_tokens, n_text_tokens, include_vision)
    se = estimate_search(cfg, prof, generations, population, n_samples, samples_per_candidate, n_visual_tokens,
                         n_text_tokens, batch_size, include_vision=include_vision)
    inputs = {"levels": levels, "n_samples": n_samples, "generations": generations, "population": population,
              "n_visual_tokens": n_visual_tokens, "n_text_tokens": n_text_tokens, "batch_size": batch_size,
              "samples_per_candidate": n_samples if samples_per_candidate is None else samples_per_candidate,
              "include_vision": include_vision}
    return CostEstimate(prof, db, se, inputs)


def _fmt_s(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _fmt_b(b: float) -> str:
    return f"{b / 1e9:.1f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"


def format_estimate(est: CostEstimate) -> str:
    """A few lines to print before a run: per-phase time, FLOPs, memory, storage; marked as an estimate."""
    p, i = est.profile, est.inputs
    lines = [f"ESTIMATE (first-order cost model, expect ~2x either way) on {p.name} "
             f"(efficiency {p.efficiency:g}; {p.note})",
             f"  sizes: {i['levels']} levels, n={i['n_samples']} samples, {i['generations']} generations x "
             f"{i['population']} candidates x {i['samples_per_candidate']} samples, "
             f"{i['n_visual_tokens']}+{i['n_text_tokens']} tokens/sample"]
    for ph in (est.level_db, est.search):
        terms = ", ".join(f"{k} {_fmt_s(v)}" for k, v in ph.detail.items())
        lines.append(f"  {ph.name:9s} {_fmt_s(ph.seconds):>9s}  {ph.flops:.2e} FLOP  device peak "
                     f"{_fmt_b(ph.device_peak_bytes)}, host {_fmt_b(ph.host_bytes)}, disk "
                     f"{_fmt_b(ph.storage_bytes)}  [{terms}]")
    fit = "fits" if est.fits else "DOES NOT FIT"
    lines.append(f"  total     {_fmt_s(est.total_seconds):>9s}  device peak {_fmt_b(est.device_peak_bytes)} "
                 f"{fit} in {_fmt_b(p.mem_bytes)}")
    return "\n".join(lines)
