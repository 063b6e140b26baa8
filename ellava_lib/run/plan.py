"""``ellava plan``: predicted peak GPU memory, disk and time of every stage of a profile, and its batch sizes.

Memory from :mod:`ellava_lib.speed.memory` (which also chooses the batch sizes for ``gpu_gb``), time from
:mod:`ellava_lib.speed.costmodel` on the profile's ``gpu`` device profile (level database, search) and the
rooflines below (evaluation, projector rounds), disk from :func:`leveldb.estimate_bytes`. One run of a stage
each; ``runs`` counts how often the profile's main table and ablations run it (:mod:`sweep`'s job lists).

* eval time, per suite ``s`` of ``n_s`` items with up to ``G_s`` new tokens (:data:`evaluate.REAL_MAX_NEW_TOKENS`,
  an upper bound: generation stops at the end-of-sequence token), batch ``B``:
  ``ceil(n_s / B) * (roofline(B F_prefill, W) + (G_s - 1) * (roofline(B F_tok, W) + p KV / BW))`` with
  ``F_tok = 2 P_lm`` FLOPs per generated token (the prefill makes the first), ``KV`` the bytes of the key/value
  cache at the mean step and ``p`` the passes a step makes over it (:func:`kv_passes`: the cache grows by a
  copy, grouped queries expand it; separate memory-bound ops, so their time adds to the matmuls')
  (:func:`generate_seconds`, :func:`costmodel.roofline`).
* projector time, per round: ``steps * (2 + c) * passes(train rows)`` forward-equivalents (forward + a backward
  of the same cost: the decoder and the tower are frozen, so the backward computes the decoder's input gradients,
  ``2 P N``, and the projector's small weight gradient; ``c = 1`` more forward with checkpointing) plus
  ``steps / eval_every * topk`` held-out forwards, each pass ``roofline(m F_sample, W)`` per micro-batch of ``m``
  rows; rounds = ``generations // every``. (Until the smol calibration the backward was priced at twice the
  forward, as if the decoder's weights were trained: a third more than the rounds cost.)

The smol calibration (``benchmarks/results/smol_stages_cpu.json``) changed three terms for every device: the
decode steps' cache copies (the paper plan's evaluations on ``h100``: 7 to 11 minutes a run), the projector's
backward (37 to 26 minutes of rounds) and lambda's choice in the search (about a minute a search).

Docs: :func:`splice_readme` writes :func:`markdown` between ``<!-- paper-plan:start -->`` and
``<!-- paper-plan:end -->`` (``ellava plan --profile paper --readme README.md``: the block in whichever of the
README and ``docs/*.md`` holds it, today ``docs/paper.md``); the GPU, disk and time figures of the paper setting
there are that block.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ellava_lib.speed import costmodel, flops, memory

#: The docs block the paper profile's plan is spliced into (in docs/paper.md).
README_MARKER = "paper-plan"
GB = memory.GB_BYTES


@dataclass
class Stage:
    """One stage: predicted ``peak_gb`` of GPU memory, ``disk_gb`` written, ``seconds`` of one run, ``batch`` (the
    knob that sets its memory), ``fits`` in the GPU, ``runs`` in the profile."""

    name: str
    peak_gb: float
    disk_gb: float
    seconds: float
    batch: str
    fits: bool
    runs: int


@dataclass
class Plan:
    """``level_dbs``: the tier's (:attr:`tier.Tier.level_dbs`): ``keep`` holds every level database of the profile
    on disk at the end, ``one`` at most one at a time (the sweep deletes the others before building the next)."""

    profile: str
    model: str
    gpu_gb: float
    device: str
    batches: memory.Batches
    stages: list[Stage]
    overrides: dict[str, Any] = field(default_factory=dict)
    level_dbs: str = "keep"

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    def disk_held_gb(self, stage: Stage) -> float:
        """The disk ``stage`` holds at the profile's peak: one run's ``disk_gb`` times the runs that keep theirs
        (every projector round file; every level database with ``level_dbs: keep``, one with ``one``; the
        hub weights once)."""
        if stage.name == "projector" or (stage.name == "leveldb" and self.level_dbs == "keep"):
            return stage.disk_gb * stage.runs
        return stage.disk_gb

    @property
    def disk_peak_gb(self) -> float:
        """The most disk the profile holds at once: the sum of :meth:`disk_held_gb` over the stages."""
        return sum(self.disk_held_gb(s) for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "model": self.model, "gpu_gb": self.gpu_gb, "device": self.device,
                "batches": self.batches.to_dict(), "fits": self.fits, "overrides": self.overrides,
                "level_dbs": self.level_dbs, "disk_peak_gb": self.disk_peak_gb,
                "stages": [{**asdict(s), "disk_held_gb": self.disk_held_gb(s)} for s in self.stages]}


def row_counts(n: int, cfg) -> dict[str, int]:
    """Rows of a calibration set of ``n`` under a :class:`config.SearchConfig`: ``selection``, ``scoring``,
    ``projector`` and its ``train`` / ``holdout`` parts (the sizes :func:`evolve.split_rows`,
    :func:`evolve.score_rows` and :func:`projector.split_holdout` draw)."""
    select = int(math.floor(cfg.select_frac * n + 0.5))
    search = n - select
    proj = min(max(1, round(cfg.projector.rows * search)), search - 1)  # set aside with or without evolution
    hold = 0 if cfg.projector.holdout == 0 else min(max(1, round(cfg.projector.holdout * proj)), proj - 1)
    if cfg.projector.every == 0:  # the projector rows are not trained on
        return {"selection": select, "scoring": search - proj, "projector": 0, "train": 0, "holdout": 0}
    return {"selection": select, "scoring": search - proj, "projector": proj, "train": proj - hold, "holdout": hold}


def profile_params(name: str, root: str | Path | None = None) -> dict[str, Any]:
    """The profile's values over the defaults of the notebooks a run executes (as ``ellava sweep`` reads them)."""
    from ellava_lib.run import pipeline

    root = pipeline.project_root(root)
    params: dict[str, Any] = {}
    for nb in ("01_tiny_model", "02_dense_eval", "05_main_table", "06_ablations"):
        path = root / "notebooks" / f"{nb}.ipynb"
        if path.is_file():
            params.update(pipeline.notebook_defaults(path))
    params.update(pipeline.load_profile(name, root))
    return params


def kv_passes(dm: memory.Dims) -> int:
    """Passes a decode step makes over each key and value cache tensor of ``s`` bytes per layer: ``DynamicCache``
    appends the new token by ``torch.cat`` (read ``s``, write ``s``); with grouped queries (``r = heads /
    kv_heads > 1``) ``repeat_kv`` expands it (read ``s``, write ``r s``); attention reads what it attends over
    (``r s``). ``3`` without grouping (llava-1.5-7b), ``3 + 2 r`` with it (SmolLM2, ``r = 3``: 9)."""
    r = max(1, round(dm.d / dm.d_kv))  # heads / kv_heads = (heads * head_dim) / (kv_heads * head_dim)
    return 3 if r == 1 else 3 + 2 * r


def generate_seconds(config, dm: memory.Dims, wl: memory.Workload, prof, batch: int, new: float,
                     floor_s: float = 0.0, decode_prof=None) -> float:
    """One ``generate`` batch of ``new`` generated tokens (the mean over batches may be fractional): the prefill
    ``max(roofline(B F_prefill, W), floor_s)`` makes the first, each of the ``new - 1`` decode steps takes
    ``max(roofline(B F_tok, W), floor_s) + p KV / BW`` (module docstring; ``KV`` the cache at the mean step,
    ``p`` :func:`kv_passes`). ``floor_s``: the host's kernel issue time of a forward (0 = not modelled);
    ``decode_prof``: the device profile of the decode steps when they run another matmul path than the prefill
    (a CPU's oneDNN linears need ``kernels.MIN_ROWS`` rows, a decode step of ``B`` rows has ``B``; default
    ``prof``)."""
    b = wl.dtype_bytes
    dp = decode_prof or prof
    lm = dm.layers * dm.block_params + dm.d * dm.vocab
    f_prefill = flops.flops_per_token(config, dm.image_tokens, wl.prompt_tokens, logits_tokens=1)["total"]
    kv = 2 * dm.layers * batch * (dm.image_tokens + wl.prompt_tokens + new / 2) * dm.d_kv * b
    step = (max(costmodel.roofline(batch * 2.0 * lm, dm.params * b, dp), floor_s)
            + kv_passes(dm) * kv / dp.eff(dp.mem_bandwidth))
    return max(costmodel.roofline(batch * f_prefill, dm.params * b, prof), floor_s) + max(new - 1, 0) * step


def _eval_seconds(config, dm: memory.Dims, wl: memory.Workload, prof, batch: int, data: str, limit: int) -> float:
    from ellava_lib.data.manifest import SUITE_BENCHMARKS, load_manifest
    from ellava_lib.eval.evaluate import generation_budget

    total = 0.0
    for suite, new in generation_budget(data).items():
        n = limit or ((load_manifest(SUITE_BENCHMARKS[suite]).expected_rows or 0) if data == "real" else 500)
        total += math.ceil(n / batch) * generate_seconds(config, dm, wl, prof, batch, new)
    return total


def projector_pass_seconds(config, dm: memory.Dims, wl: memory.Workload, prof, n_rows: int, micro: int,
                           factor: float, floor_s: float = 0.0) -> float:
    """``factor`` forward-equivalents over ``n_rows`` rows, ``micro`` rows per pass: each pass
    ``max(roofline(factor m F_sample, factor W), factor floor_s)`` (``floor_s``: the host's issue time of one
    forward pass; 0 = not modelled; ``F_sample`` with the LM head at ``wl.logits_tokens`` positions, the ones the
    loss reads, :func:`projector.sliced_logits`)."""
    f_sample = flops.flops_per_token(config, dm.image_tokens, wl.text_tokens,
                                     logits_tokens=wl.logits_tokens)["total"]
    full, rest = divmod(n_rows, micro)
    w = factor * dm.params * wl.dtype_bytes

    def one(rows: int) -> float:
        return max(costmodel.roofline(factor * rows * f_sample, w, prof), factor * floor_s)

    return full * one(micro) + (one(rest) if rest else 0.0)


def _projector_seconds(config, dm: memory.Dims, wl: memory.Workload, prof, cfg, rows: dict[str, int],
                       batches: memory.Batches, floor_s: float = 0.0, train_prof=None) -> float:
    """The projector rounds of one search (module docstring): ``generations // every`` rounds of ``steps`` training
    steps of ``2 + c`` forward-equivalents on the train rows (on ``train_prof``, default ``prof``: the matmul path of
    a forward that needs gradients) and the held-out forwards (on ``prof``)."""
    p = cfg.projector
    if p.every == 0:
        return 0.0
    m = batches.micro_batch
    per_round = (p.steps * projector_pass_seconds(config, dm, wl, train_prof or prof, rows["train"], m,
                                                  2 + int(batches.checkpointing), floor_s)
                 + (p.steps // p.eval_every + 1) * p.topk * projector_pass_seconds(config, dm, wl, prof,
                                                                                  rows["holdout"], m, 1, floor_s))
    return (cfg.generations // p.every) * per_round


def _search_seconds(config, prof, cfg, rows: dict[str, int], wl: memory.Workload, batch: int,
                    floor_s: float = 0.0, n_visual: int = 576) -> float:
    """The candidate scoring of one search (:func:`costmodel.estimate_search` per stage, rows of
    ``wl.text_tokens`` text tokens, the LM head at ``wl.logits_tokens`` positions): the initial population on the
    scoring rows; every generation's multi-step selection (:func:`evolve.stage_plan`); the elites scored anew
    after each projector round; the final candidates (population and start policies) on the selection rows; with a
    gap term, lambda's choice (the initial population on the selection rows, history phase ``lambda``; until the
    smol calibration it was priced as the final candidates on the scoring rows); the dense log-probabilities. A
    search that runs on until converged (``max_generations``) is priced at its ``generations``, the fewest it runs."""
    from ellava_lib.search.evolve import stage_plan

    def score(gens: int, cands: int, n_rows: int) -> float:
        if not (gens and cands and n_rows):
            return 0.0
        return costmodel.estimate_search(config, prof, gens, cands, wl.calib_n, n_rows,
                                         n_visual_tokens=n_visual, n_text_tokens=wl.text_tokens,
                                         batch_size=batch, min_batch_s=floor_s,
                                         logits_tokens=wl.logits_tokens).seconds

    plan = stage_plan(cfg.offspring, rows["scoring"], cfg.screen_samples, cfg.survivors)
    total = score(1, cfg.population, rows["scoring"]) + sum(score(cfg.generations, e, r) for r, e in plan)
    # the elites join the children at the last stage and are scored anew only after a projector round
    every = cfg.projector.every
    total += score(max(cfg.generations - 1, 0) // every if every else 0, cfg.elitism, rows["scoring"])
    finish = cfg.population + len(cfg.init)
    total += score(1, finish, rows["selection"])
    total += score(1, cfg.population, rows["selection"]) if cfg.gap != "none" else 0.0
    return total + score(1, 1, wl.calib_n)  # the dense log-probabilities


def _runs(params: dict[str, Any], model: str) -> dict[str, int]:
    """How often the profile's main table (notebook 05) and ablations (06) run each stage."""
    from ellava_lib.run.jobs import SEARCH_METHODS, SweepSpec, ablation_jobs, jobs_grid, search_config

    spec = SweepSpec(model, search_preset=params.get("search_preset", "default"),
                     search=dict(params.get("search") or {}), ellava=dict(params.get("ellava") or {}),
                     tier=dict(params.get("tier") or {}))
    seeds = list(params.get("seeds", [0]))
    n = int(params.get("calib_n", 64))
    jobs = jobs_grid(params.get("table_methods", []), params.get("sparsities", []), seeds, n)
    jobs += ablation_jobs(spec, float(params.get("sparsity", 0.6)), seeds[0], n,
                                params.get("gaps", ()), params.get("calib_ns", ()))
    jobs = list({j.name(): j for j in jobs}.values())
    searched = [j for j in jobs if j.method in SEARCH_METHODS]
    return {"leveldb": len({(j.seed, j.calib_n) for j in searched}), "search": len(searched),
            "projector": len([j for j in searched if search_config(spec, j).projector.every]),
            "dense_eval": 1 + len(params.get("magnitude_sparsities", [])) + sum(j.method == "dense" for j in jobs),
            "final_eval": sum(j.method != "dense" for j in jobs)}


@dataclass
class Setup:
    """What a profile runs, as the plan and the dry run need it."""

    params: dict[str, Any]
    tier: Any
    config: Any
    search: Any
    rows: dict[str, int]
    workload: memory.Workload


def profile_setup(profile: str, root: str | Path | None = None) -> Setup:
    """The profile's parameters, tier, model config (shipped), search config at its ``sparsity``, row counts and
    :class:`memory.Workload`. ``ValueError`` (one line) for an unknown profile or a model without a shipped config."""
    from ellava_lib.eval.evaluate import generation_budget
    from ellava_lib.model import structure
    from ellava_lib.run.tier import Tier
    from ellava_lib.search.config import SearchConfig

    params = profile_params(profile, root)
    tier = Tier.from_dict(params.get("tier"))
    if tier.model not in structure.CONFIG_ALIASES:
        raise ValueError(f"profile {profile!r} runs model {tier.model!r}, which has no shipped config to plan from "
                         f"(known: {', '.join(sorted(structure.CONFIG_ALIASES))})")
    cfg = SearchConfig.from_preset(params.get("search_preset", "default"),
                                   **{**(params.get("search") or {}), "target": float(params.get("sparsity", 0.6))})
    n = int(params.get("calib_n", 64))
    rows = row_counts(n, cfg)
    wl = memory.Workload(calib_n=n, score_rows=rows["scoring"], projector_rows=max(rows["train"], 1),
                         max_new_tokens=max(generation_budget(tier.data).values()),
                         dtype_bytes=4 if tier.dtype == "float32" else 2)
    return Setup(params, tier, structure.load_config(tier.model), cfg, rows, wl)


def make_plan(profile: str = "paper", gpu_gb: float = memory.DEFAULT_GPU_GB, root: str | Path | None = None,
              device: str | None = None) -> Plan:
    """The :class:`Plan` of ``profile`` on a GPU of ``gpu_gb`` GB, times on the device profile ``device``
    (default the profile's ``gpu``). ``ValueError`` (one line) for an unknown profile or device profile,
    ``gpu_gb <= 0`` or a profile whose model has no shipped config."""
    from ellava_lib.core.units import list_units
    from ellava_lib.model import structure
    from ellava_lib.prune.leveldb import estimate_bytes

    check_gpu_gb(gpu_gb)
    setup = profile_setup(profile, root)
    params, tier, config, cfg, rows, wl = (setup.params, setup.tier, setup.config, setup.search, setup.rows,
                                           setup.workload)
    n, dtype_bytes = wl.calib_n, wl.dtype_bytes
    dm = memory.Dims.of(config)
    batches, peaks, _ = memory.choose(dm, wl, gpu_gb * GB)
    room = gpu_gb * GB - memory.RESERVE_BYTES
    prof = device_profile(device or str(params.get("gpu", "h100")))
    levels = [g for g in cfg.levels if g > 0]
    db = costmodel.estimate_level_db(config, prof, len(levels), n, n_text_tokens=wl.text_tokens)
    store_bytes = dtype_bytes if tier.db_dtype == "auto" else (4 if tier.db_dtype == "float32" else 2)
    disk_db = estimate_bytes(list_units(structure.meta_model(config)), cfg.levels, store_bytes)
    runs = _runs(params, tier.model)
    limit = int(params.get("eval_limit", 0) or 0)
    ev = _eval_seconds(config, dm, wl, prof, batches.eval_batch, tier.data, limit)
    proj_rounds = cfg.generations // cfg.projector.every if cfg.projector.every else 0
    stages = [
        Stage("dense_eval", peaks["dense_eval"] / GB, dm.params * dtype_bytes / GB, ev,  # disk: the hub download
              f"eval_batch {batches.eval_batch}", peaks["dense_eval"] <= room, runs["dense_eval"]),
        Stage("leveldb", peaks["leveldb"] / GB, disk_db / GB, db.seconds,
              "offload (one block on the GPU)" if batches.offload else "whole model on the GPU",
              peaks["leveldb"] <= room, runs["leveldb"]),
        Stage("search", peaks["search"] / GB, 0.0, _search_seconds(config, prof, cfg, rows, wl, batches.score_batch),
              f"score_batch {batches.score_batch}", peaks["search"] <= room, runs["search"]),
        Stage("projector", peaks["projector"] / GB, proj_rounds * dm.projector_params * dtype_bytes / GB,
              _projector_seconds(config, dm, wl, prof, cfg, rows, batches),
              f"micro_batch {batches.micro_batch}" + (" + checkpointing" if batches.checkpointing else ""),
              peaks["projector"] <= room, runs["projector"]),
        Stage("final_eval", peaks["final_eval"] / GB, 0.0, ev,
              f"eval_batch {batches.eval_batch}", peaks["final_eval"] <= room, runs["final_eval"]),
    ]
    overrides = {"tier": {"offload": batches.offload, "eval_batch_size": batches.eval_batch},
                 "search": {"eval_batch_size": batches.score_batch, "projector_micro_batch": batches.micro_batch,
                            "projector_checkpointing": batches.checkpointing}}
    return Plan(profile, tier.model, float(gpu_gb), prof.name, batches, stages, overrides, tier.level_dbs)


def device_profile(name: str) -> costmodel.DeviceProfile:
    """The cost model's preset ``name``; ``ValueError`` (one line) naming the known ones otherwise."""
    try:
        return costmodel.get_profile(name)
    except KeyError:
        raise ValueError(f"unknown --gpu {name!r}; known: {', '.join(sorted(costmodel.PRESETS))}") from None


def check_gpu_gb(gpu_gb: float) -> None:
    """``ValueError`` (one line) unless ``gpu_gb`` is a positive finite number."""
    if not (isinstance(gpu_gb, (int, float)) and math.isfinite(gpu_gb) and gpu_gb > 0):
        raise ValueError(f"--gpu-mem must be a positive number of GB, got {gpu_gb}")


def _hours(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


#: What each stage is, for the table.
STAGE_NOTES: dict[str, str] = {
    "dense_eval": "dense model, greedy generation with KV cache (disk: the fp16 hub weights)",
    "leveldb": "SparseGPT at every grid level, one unit at a time (disk: leveldb.estimate_bytes of one database;"
               " held: all of them with tier level_dbs keep, one with level_dbs one)",
    "search": "evolutionary search: candidates assembled and scored (generations x multi-step selection)",
    "projector": "projector rounds of one search (disk: one safetensors per round)",
    "final_eval": "a pruned model, evaluated as the dense one",
}


def markdown(plan: Plan) -> str:
    """The plan as a markdown table plus a summary line (what :func:`splice_readme` writes)."""
    head = (f"| stage | peak GPU | fits {plan.gpu_gb:g} GB | memory knob | disk held | time per run | runs | "
            "total time |\n|---|---:|:-:|---|---:|---:|---:|---:|")
    lines = [head]
    for s in plan.stages:
        lines.append(f"| {s.name} | {s.peak_gb:.1f} GB | {'yes' if s.fits else '**no**'} | {s.batch} | "
                     f"{plan.disk_held_gb(s):.1f} GB | {_hours(s.seconds)} | {s.runs} | "
                     f"{_hours(s.seconds * s.runs)} |")
    total = sum(s.seconds * s.runs for s in plan.stages)
    db = next((s for s in plan.stages if s.name == "leveldb"), None)
    dbs = ("" if db is None else
           f"one level database of {db.disk_gb:.1f} GB at a time for the {db.runs} calibration draws, "
           "tier `level_dbs: one`" if plan.level_dbs == "one" else f"all {db.runs} level databases kept")
    peak = max(s.peak_gb for s in plan.stages)
    lines += ["", f"*`ellava plan --profile {plan.profile} --gpu-mem {plan.gpu_gb:g}`: {plan.model} in fp16 on one "
              f"{plan.gpu_gb:g} GB GPU, times on the `{plan.device}` cost-model preset (first-order, ~2x either "
              f"way; evaluation times are upper bounds at the longest generation, judges not included). Peak "
              f"{peak:.1f} GB ({'every stage fits' if plan.fits else 'NOT every stage fits'}); disk "
              f"{plan.disk_peak_gb:.0f} GB at the peak ({dbs}); about {total / 3600:.0f} GPU-hours for the "
              f"whole profile. Batch sizes: {json.dumps(plan.overrides, sort_keys=True)}.*"]
    return "\n".join(lines)


def format_plan(plan: Plan) -> str:
    """What ``ellava plan`` prints: the table, then what each stage is."""
    notes = [f"  {s.name:<11} {STAGE_NOTES.get(s.name, '')}" for s in plan.stages]
    verdict = "fits" if plan.fits else "DOES NOT FIT (a stage exceeds the GPU even at batch 1)"
    return "\n".join([f"PLAN (predicted; speed/memory.py + speed/costmodel.py): {verdict}", markdown(plan), "",
                      "stages:", *notes,
                      "profile overrides that select these batch sizes: " + json.dumps(plan.overrides)])


def splice_readme(readme: str | Path, plan: Plan) -> bool:
    """Write :func:`markdown` of ``plan`` between the ``paper-plan`` markers of the project whose README is
    ``readme`` (the block's page: :func:`report.update_readme`); whether it changed."""
    from ellava_lib.run.report import update_readme

    return update_readme(Path(readme), README_MARKER, markdown(plan))
