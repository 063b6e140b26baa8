"""``ellava dryrun``: every stage of a profile on random weights and a synthetic stand-in for the data, measured.

Nothing is downloaded. The model is the profile's model config with random weights built directly on the device
(:func:`loading.random_weights`); the data is a seeded synthetic batch with the shapes of the real one
(:func:`synthetic_batch`: ``T_img`` image tokens and ``text_tokens`` text tokens per row, the last
``ANSWER_TOKENS`` of them labelled as the answer). Each stage runs the library's own code with the batch sizes
:func:`speed.memory.choose` picks for ``gpu_gb``:

* ``dense_eval`` / ``final_eval``: ``generate`` on one evaluation batch, exactly ``max_new_tokens`` new tokens
  (``min_new_tokens`` too, so the KV cache reaches its full length on random weights);
* ``leveldb``: :func:`leveldb.build_level_db` of the first ``db_blocks`` decoder blocks at every level of the
  profile's search grid (one block at a time on the device when the plan offloads);
* ``search``: the dense log-probabilities and one scoring pass over the scoring rows
  (:func:`objective.per_sample_losses`, the search's batch size) of a candidate assembled from that database;
* ``projector``: one step of :func:`projector.evolve_projector` on the training rows with the profile's micro-batch
  and checkpointing.

Per stage the JSON (``dryrun.json``) records the wall time and the measured peak GPU memory
(``torch.cuda.max_memory_allocated`` since the stage began; None on the CPU, where only time is recorded) beside
the memory model's prediction and the cost model's seconds (:func:`predicted_seconds`, on the profile's ``gpu``
preset) for the same work, shapes and batch sizes. On a GPU:
``ellava dryrun --profile paper --random-weights --out runs/dryrun-7b`` (see docs/paper.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import LlavaConfig

from ellava_lib.core import files
from ellava_lib.speed import memory

#: Labelled answer tokens at the end of every synthetic row.
ANSWER_TOKENS = 8


def shrunk_config(config: LlavaConfig) -> LlavaConfig:
    """A 2-layer, hidden-64 stand-in of ``config`` (vocabulary 512, 28-pixel images of 4 patches), for CPU tests."""
    d = config.to_dict()
    d["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=512, pad_token_id=501)
    d["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)
    d.update(vocab_size=512, image_token_index=500, pad_token_id=501, image_seq_length=4)
    return LlavaConfig.from_dict(d)


def shrunk_workload(wl: memory.Workload) -> memory.Workload:
    """The shapes of a CPU test: at most 16 calibration rows of 16 text tokens, 8 new tokens per prompt."""
    from dataclasses import replace

    return replace(wl, calib_n=min(wl.calib_n, 16), text_tokens=16, prompt_tokens=16, max_new_tokens=8,
                   score_rows=min(wl.score_rows, 6), projector_rows=min(wl.projector_rows, 4))


def synthetic_batch(config: LlavaConfig, rows: int, text_tokens: int, seed: int, dtype: torch.dtype,
                    device: str | torch.device = "cpu", labels: bool = True) -> dict[str, torch.Tensor]:
    """``rows`` rows of ``[BOS, image tokens x T_img, random text x text_tokens]`` (ids drawn with ``seed`` below
    the image token id), random pixels in ``dtype``; ``labels`` = the last :data:`ANSWER_TOKENS` tokens."""
    g = torch.Generator().manual_seed(seed)
    t_img = int(config.image_seq_length)
    text = torch.randint(3, min(int(config.image_token_index), config.text_config.vocab_size), (rows, text_tokens),
                         generator=g)
    ids = torch.cat([torch.ones(rows, 1, dtype=torch.long),
                     torch.full((rows, t_img), int(config.image_token_index)), text], dim=1)
    size = config.vision_config.image_size
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
           "pixel_values": torch.randn(rows, 3, size, size, generator=g).to(dtype)}
    if labels:
        lab = torch.full_like(ids, -100)
        lab[:, -ANSWER_TOKENS:] = ids[:, -ANSWER_TOKENS:]
        out["labels"] = lab
    return {k: v.to(device) for k, v in out.items()}


def _measure(device: torch.device, fn: Callable[[], Any]) -> tuple[float, float | None]:
    """``(seconds, peak GB allocated during fn or None off CUDA)``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    tick = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter() - tick, torch.cuda.max_memory_allocated(device) / memory.GB_BYTES
    return time.perf_counter() - tick, None


def predicted_seconds(config: LlavaConfig, wl: memory.Workload, batches: memory.Batches, cfg, db_blocks: int,
                      prof) -> dict[str, float]:
    """The cost model's seconds for exactly the dry run's work on the device profile ``prof`` (its rooflines:
    :mod:`costmodel`, :mod:`plan`): one ``generate`` batch; the level database's share ``db_blocks / L`` of
    :func:`costmodel.estimate_level_db`; one dense pass and one scoring pass (:func:`costmodel.estimate_search`);
    one projector step (``2`` forward-equivalents, ``3`` with checkpointing: the decoder is frozen, its backward
    computes input gradients only, as :func:`plan._projector_seconds` prices a round)."""
    from ellava_lib.run import plan
    from ellava_lib.speed import costmodel

    dm = memory.Dims.of(config)
    gen = plan.generate_seconds(config, dm, wl, prof, batches.eval_batch, wl.max_new_tokens)
    levels = len([g for g in cfg.levels if g > 0])
    db = costmodel.estimate_level_db(config, prof, levels, wl.calib_n, n_visual_tokens=dm.image_tokens,
                                     n_text_tokens=wl.text_tokens).seconds * db_blocks / dm.layers
    rows = min(wl.score_rows, wl.calib_n)
    search = sum(costmodel.estimate_search(config, prof, 1, 1, wl.calib_n, n, n_visual_tokens=dm.image_tokens,
                                           n_text_tokens=wl.text_tokens, batch_size=batches.score_batch).seconds
                 for n in (wl.calib_n, rows))
    proj = plan.projector_pass_seconds(config, dm, wl, prof, min(wl.projector_rows, wl.calib_n),
                                       batches.micro_batch, 2 + int(batches.checkpointing))
    return {"dense_eval": gen, "leveldb": db, "search": search, "projector": proj, "final_eval": gen}


def run_dryrun(config: LlavaConfig, out_dir: str | Path, device: str = "cuda", gpu_gb: float = memory.DEFAULT_GPU_GB,
               search_cfg=None, workload: memory.Workload | None = None, db_blocks: int = 1, seed: int = 0,
               dtype: str = "float16", name: str = "", device_profile: str = "h100") -> dict[str, Any]:
    """Run every stage (module docstring) into ``out_dir``; returns (and writes to ``out_dir/dryrun.json``) the
    record. ``search_cfg``: the profile's :class:`config.SearchConfig` (grid, loss, projector settings);
    ``workload``: the shapes (:class:`memory.Workload`); ``device_profile``: the cost-model preset the predicted
    seconds are for (:func:`predicted_seconds`)."""
    from ellava_lib.core.policy import Policy
    from ellava_lib.core.units import list_units
    from ellava_lib.model.loading import DTYPES, random_weights
    from ellava_lib.prune.leveldb import LevelDB, build_level_db
    from ellava_lib.search import objective, projector
    from ellava_lib.search.config import SearchConfig
    from ellava_lib.speed.costmodel import get_profile

    cfg = search_cfg or SearchConfig.paper()
    wl = workload or memory.Workload()
    dev = torch.device(device)
    out = files.ensure_dir(Path(out_dir))
    dm = memory.Dims.of(config)
    batches, predicted, fits = memory.choose(dm, wl, gpu_gb * memory.GB_BYTES)
    record: dict[str, Any] = {"model": name, "device": str(dev), "dtype": dtype, "gpu_gb": gpu_gb, "seed": seed,
                              "batches": batches.to_dict(), "predicted_fits": fits, "workload": vars(wl),
                              "device_profile": device_profile, "stages": []}
    stages = record["stages"]
    times: dict[str, float] = {}

    def stage(key: str, work: str, fn: Callable[[], Any], predicted_bytes: float) -> None:
        seconds, peak = _measure(dev, fn)
        stages.append({"name": key, "work": work, "seconds": round(seconds, 3), "peak_gb_measured": peak,
                       "peak_gb_predicted": round(predicted_bytes / memory.GB_BYTES, 3),
                       "seconds_predicted": float(f"{times.get(key, float('nan')):.4g}")})
        files.write_json(out / "dryrun.json", record)  # a stage that dies still leaves the ones before

    model = random_weights(config, dev, dtype, seed)
    tdt = DTYPES[dtype]
    calib = synthetic_batch(config, wl.calib_n, wl.text_tokens, seed, tdt, dev)
    prompts = synthetic_batch(config, batches.eval_batch, wl.prompt_tokens, seed + 1, tdt, dev, labels=False)

    def generate() -> None:
        with torch.no_grad():
            model.generate(**prompts, max_new_tokens=wl.max_new_tokens, min_new_tokens=wl.max_new_tokens,
                           do_sample=False, pad_token_id=config.text_config.pad_token_id)

    layers = [f"lm.{i}." for i in range(db_blocks)]
    units = [u for u in list_units(model) if any(u.startswith(p) for p in layers)]
    db_dir = out / "leveldb"
    times.update(predicted_seconds(config, wl, batches, cfg, db_blocks, get_profile(device_profile)))
    stage("dense_eval", f"generate {batches.eval_batch} x {wl.max_new_tokens} new tokens", generate,
          predicted["dense_eval"])

    def build() -> None:
        if batches.offload:
            model.to("cpu")
        build_level_db(model, {k: v.to("cpu") if batches.offload else v for k, v in calib.items()}, db_dir,
                       cfg.levels, "sparsegpt", units=units, progress=False,
                       device=str(dev) if batches.offload else None)
        model.to(dev)

    stage("leveldb", f"{len(units)} units x {len(cfg.levels)} levels" + (" (offload)" if batches.offload else ""),
          build, predicted["leveldb"])
    db = LevelDB(db_dir)
    policy = Policy.uniform(units, cfg.target, db.grid)
    db.assemble(model, policy, check=False)
    scoring = list(range(min(wl.score_rows, wl.calib_n)))
    dense: dict[str, torch.Tensor] = {}

    def score() -> None:
        dense["d"] = objective.dense_logprobs_of(model, calib, batches.score_batch)
        objective.per_sample_losses(model, calib, cfg.loss_kind, dense["d"], scoring, batches.score_batch)

    stage("search", f"dense log-probs of {wl.calib_n} rows + {len(scoring)} rows scored, batch "
          f"{batches.score_batch}", score, predicted["search"])
    from dataclasses import replace

    pcfg = replace(cfg.projector, steps=1, holdout=0.0, micro_batch=batches.micro_batch,
                   checkpointing=batches.checkpointing)
    rows = list(range(min(wl.projector_rows, wl.calib_n)))
    stage("projector", f"1 step on {len(rows)} rows, micro-batch {batches.micro_batch}"
          + (" + checkpointing" if batches.checkpointing else ""),
          lambda: projector.evolve_projector(model, calib, [policy], db, dense["d"], pcfg, seed, rows=rows),
          predicted["projector"])
    stage("final_eval", f"generate {batches.eval_batch} x {wl.max_new_tokens} new tokens (pruned units)", generate,
          predicted["final_eval"])
    files.write_json(out / "dryrun.json", record)
    return record


def profile_dryrun(profile: str, out_dir: str | Path, device: str | None = None,
                   gpu_gb: float = memory.DEFAULT_GPU_GB, shrink: bool = False, db_blocks: int = 1,
                   root: str | Path | None = None) -> dict[str, Any]:
    """:func:`run_dryrun` of a profile's model config, search config and shapes on ``device`` (default: the
    profile's), with the full-run plan of the profile beside it (``plan``). ``shrink``: the :func:`shrunk_config`
    model on the :func:`shrunk_workload` shapes (seconds on a CPU)."""
    from ellava_lib.run import plan as plans
    from ellava_lib.run.tier import Tier, check_device

    plans.check_gpu_gb(gpu_gb)
    if db_blocks < 1:
        raise ValueError(f"--db-blocks must be >= 1, got {db_blocks}")
    setup = plans.profile_setup(profile, root)
    device = device or setup.tier.device
    check_device(Tier(device=device))
    config = shrunk_config(setup.config) if shrink else setup.config
    name = setup.tier.model + (" (shrunk stand-in)" if shrink else "")
    workload = shrunk_workload(setup.workload) if shrink else setup.workload
    record = run_dryrun(config, out_dir, device, gpu_gb, setup.search, workload,
                        min(db_blocks, config.text_config.num_hidden_layers), dtype=setup.tier.dtype, name=name,
                        device_profile=str(setup.params.get("gpu", "h100")))
    full = plans.make_plan(profile, gpu_gb, root)
    record["plan"] = full.to_dict()  # the full run's predictions (per run of each stage), for comparison
    files.write_json(Path(out_dir) / "dryrun.json", record)
    return record


def format_record(record: dict[str, Any]) -> str:
    """One line per stage: work, seconds, measured and predicted peak."""
    lines = [f"dry run of {record['model']} on {record['device']} ({record['dtype']}, random weights), batches "
             f"{record['batches']}"]
    for s in record["stages"]:
        measured = "n/a (CPU)" if s["peak_gb_measured"] is None else f"{s['peak_gb_measured']:.2f} GB"
        lines.append(f"  {s['name']:<11} {s['seconds']:>9.2f} s (predicted {s['seconds_predicted']:.2f} s on "
                     f"{record['device_profile']})  peak {measured:>10} (predicted {s['peak_gb_predicted']:.2f} GB)"
                     f"  {s['work']}")
    return "\n".join(lines)
