"""The ``ellava`` command line: thin wrappers that build the same config objects the notebooks use.

    ellava build [--preset tiny|smol] [--seed N] [--force]   train (or find cached) a built-in model, print its folder
    ellava eval --model tiny --suite all --split test --out DIR [--limit N] [--vizwiz-testdev-out FILE]
    ellava inspect --model llava-1.5-7b --meta --json
    ellava prune --model tiny --method sparsegpt --sparsity 0.6 [--nm 2:4] --calib 64 --seed 0 --out DIR
    ellava search --model tiny --sparsity 0.6 --calib 64 [--preset ci|default|paper] [--no-projector] --seed 0 --out DIR
    ellava sweep --profile default --out runs/default [--what main|ablations|all] [--backend local|ray] [--retries N]
    ellava plan --profile paper [--gpu-mem GB] [--json] [--readme README.md]   predicted memory / disk / time
    ellava dryrun --profile paper --random-weights --out DIR [--shrink]        every stage on random weights
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ellava_lib.core.schema import SUITES
from ellava_lib.data.synth import SPLITS


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``ellava: error: ...``) with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"ellava: error: {message}\n")


def _suites(value: str) -> tuple[str, ...]:
    if value == "all":
        return SUITES
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if n not in SUITES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown suite {','.join(bad) or value!r}; choose from all, {', '.join(SUITES)}")
    return names


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


def _non_negative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {n}")
    return n


def cmd_build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ellava_lib.model.specs import build_or_load
    from ellava_lib.model.train import preset

    cfg = preset(args.preset)
    if args.seed is not None:
        cfg = replace(cfg, seed=args.seed)
    t0 = time.time()
    path = build_or_load(cfg, force=args.force, progress=not args.quiet)
    print(f"{args.preset} model (seed {cfg.seed}): {path} ({time.time() - t0:.0f} s)")
    return 0


def _tier(args: argparse.Namespace):
    """The :class:`tier.Tier` the data options describe (a ValueError for a bad combination: exit 2)."""
    from ellava_lib.run.tier import Tier, check_device

    tier = Tier(model=str(args.model), data=args.data, data_dir=args.data_dir, judge=getattr(args, "judge", "local"),
                device=getattr(args, "device", None) or "cpu", dtype=args.dtype)
    check_device(tier)
    return tier


def _model_dir(spec: str, quiet: bool) -> str | Path:
    """A hub name as is (loaded in ``--dtype``), else the built-in or folder model it names."""
    from ellava_lib.model.specs import HUB_MODELS, resolve_model_dir

    return spec if spec in HUB_MODELS else resolve_model_dir(spec, progress=not quiet)


def cmd_eval(args: argparse.Namespace) -> int:
    from ellava_lib.core import files
    from ellava_lib.eval.evaluate import evaluate, headline
    from ellava_lib.run.tier import eval_config, load_model, make_judge, place

    tier = _tier(args)
    cfg = eval_config(tier, args.limit, suites=args.suite, split=args.split, batch_size=args.batch_size,
                      data_seed=args.data_seed, prompt_format=args.prompt_format, image_mode=args.image_mode)
    testdev = Path(args.vizwiz_testdev_out) if args.vizwiz_testdev_out else None
    if testdev is not None and (tier.data != "real" or testdev.is_dir()):
        raise CLIError("--vizwiz-testdev-out needs --data real and a file path")
    out = files.ensure_dir(Path(args.out))  # fail before any work if the folder is unusable
    judge = make_judge(tier, out / "judge")
    model, processor = load_model(tier, _model_dir(args.model, args.quiet), progress=not args.quiet)
    model, _ = place(tier, model)
    frame = evaluate(model, processor, cfg, out, judge, progress=not args.quiet)
    print(headline(frame).round(2).to_string())
    top = frame[frame["metric"] == "overall"]
    print("splits: " + ", ".join(f"{s} {sp}" for s, sp in zip(top["suite"], top["split"])))
    print(f"wrote {out / 'metrics.csv'} and {out / 'predictions.jsonl'}")
    if testdev is not None:
        import json

        from ellava_lib.eval.vizwiz_testdev import write_testdev

        summary = write_testdev(model, processor, testdev, data_dir=tier.data_dir, limit=cfg.limit,
                                batch_size=cfg.batch_size, progress=not args.quiet, **cfg.input_format())
        record = json.loads((out / "eval.json").read_text())
        files.write_json(out / "eval.json", {**record, "vizwiz_testdev": summary})
        print(f"wrote {testdev}: {summary['questions']} VizWiz test-dev answers for EvalAI (not scored here)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune a model (uniform policy, or one allocated by OWL / ECoFLaP) and save it with its policy."""
    import json
    import math

    from ellava_lib.core.policy import GRID_TOL
    from ellava_lib.model import losses
    from ellava_lib.prune.masks import parse_nm
    from ellava_lib.prune.prune import measured_mean, prune_model
    from ellava_lib.run.sweep import method_policy, solver_for
    from ellava_lib.run.tier import calibration_samples, encode_calibration, load_model
    from ellava_lib.speed.export import export_pruned

    n, m = parse_nm(args.nm) if args.nm else (0, 0)
    if n and args.method in ("owl", "ecoflap", "llm_pruner"):
        raise CLIError(f"--nm applies to magnitude, wanda and sparsegpt, not to {args.method}")
    if args.sparsity is None and not n:
        raise CLIError("give --sparsity S (in [0, 1)) or --nm N:M")
    target = n / m if n else args.sparsity
    if not (isinstance(target, float) and math.isfinite(target) and 0.0 <= target < 1.0):
        raise CLIError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if n and args.sparsity is not None and abs(args.sparsity - target) > GRID_TOL:
        raise CLIError(f"--sparsity {args.sparsity} disagrees with --nm {args.nm} ({target:g})")
    if args.calib <= 0:
        raise CLIError(f"--calib must be a positive integer, got {args.calib}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise CLIError(f"output {out} exists and is not an empty folder (pass --force to replace it)")
    tier = _tier(args)
    samples = calibration_samples(tier, args.calib, args.seed)  # ValueError past the pool: exit 2
    model_dir = _model_dir(args.model, args.quiet)
    model, processor = load_model(tier, model_dir, progress=not args.quiet)
    batch = encode_calibration(tier, samples, processor)
    t0 = time.time()
    dense_loss = losses.calibration_loss(model, batch)
    policy = method_policy(model, batch, args.method, target, args.seed, args.vision, progress=not args.quiet)
    solver = solver_for(args.method)
    report = prune_model(model, policy, solver, batch, prune_n=n, prune_m=m, progress=not args.quiet,
                         device=args.device)
    loss = losses.calibration_loss(model, batch)
    measured = measured_mean(report)
    extra = {"kind": "pruned", "base_model": str(model_dir), "method": args.method, "solver": solver,
             "sparsity": target, "nm": args.nm, "policy_id": policy.policy_id(), "mean_sparsity": measured,
             "calibration": {"n": args.calib, "seed": args.seed, "data": tier.data, "ids": [s.id for s in samples],
                             "loss_dense": dense_loss, "loss_pruned": loss},
             "seconds": round(time.time() - t0, 3)}
    base_meta = Path(model_dir) / "ellava.json"
    if base_meta.is_file():
        extra["base_meta"] = json.loads(base_meta.read_text())
    export_pruned(model, processor, policy, report, out, extra)
    print(f"{args.method}: mean sparsity {measured:.4f} (target {target:g}); "
          f"calibration loss {dense_loss:.4f} -> {loss:.4f}")
    print(f"wrote {out} (model, policy.json, sparsity.csv)")
    return 0


#: ``ellava search`` flags that set a :class:`config.SearchConfig` field (serialised name), None = the preset's.
SEARCH_FLAGS: dict[str, str] = {"gap": "gap", "lam": "lam", "loss": "loss_kind", "budget": "budget",
                                "generations": "generations", "population": "population", "offspring": "offspring",
                                "screen": "screen_samples", "survivors": "survivors", "init": "init",
                                "fine_step": "fine_step",
                                "projector_every": "projector_every", "projector_steps": "projector_steps"}


def search_config(args: argparse.Namespace, extra: dict | None = None):
    """The :class:`config.SearchConfig` of ``ellava search``: the ``--preset`` with the fields of the flags
    given (:data:`SEARCH_FLAGS`; ``--no-projector``: ``projector_every=0``), at ``--sparsity`` and ``--seed``."""
    from ellava_lib.core.policy import DEFAULT_GRID
    from ellava_lib.search.config import SearchConfig

    overrides = {name: getattr(args, flag) for flag, name in SEARCH_FLAGS.items() if getattr(args, flag) is not None}
    if "init" in overrides:
        overrides["init"] = tuple(x.strip() for x in overrides["init"].split(",") if x.strip())
    if args.no_projector:
        overrides["projector_every"] = 0
    return SearchConfig.from_preset(args.preset, target=args.sparsity, grid=DEFAULT_GRID, seed=args.seed,
                                    extra=dict(extra or {}), **overrides)


def cmd_search(args: argparse.Namespace) -> int:
    """Search a policy (level database -> evolutionary search -> final model) into ``--out`` (resumable)."""
    import math

    from ellava_lib.core import files
    from ellava_lib.core.policy import DEFAULT_GRID
    from ellava_lib.core.units import list_units
    from ellava_lib.data import calibration
    from ellava_lib.model import loading
    from ellava_lib.prune.leveldb import LevelDB, build_level_db, covering_grid
    from ellava_lib.run.tier import (
        calibration_samples,
        encode_calibration,
        load_model,
        place,
    )
    from ellava_lib.search.evolve import check_resume, run_search, search_context
    from ellava_lib.search.finalize import exact_reprune
    from ellava_lib.search.objective import per_sample_losses

    grid = DEFAULT_GRID
    if not (math.isfinite(args.sparsity) and grid[0] <= args.sparsity <= grid[-1]):
        raise CLIError(f"--sparsity must lie in [{grid[0]}, {grid[-1]}] (the range of the grid), got {args.sparsity}")
    if args.calib < 2:
        raise CLIError(f"--calib must be at least 2, got {args.calib}")
    tier = _tier(args)
    if tier.data == "synthetic" and args.calib > calibration.pool_capacity():
        raise CLIError(f"--calib {args.calib} exceeds the calibration pool ({calibration.pool_capacity()} samples)")
    cfg = search_config(args, extra={"model": str(args.model), "calib": args.calib, "vision": args.vision,
                                     "db_method": "sparsegpt",
                                     **({} if tier.data == "synthetic" else {"data": tier.data})})
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "search_config.json").is_file())):
        raise CLIError(f"output {out} exists and is not a search folder (no search_config.json)")
    check_resume(out, cfg)  # another config: ValueError naming the differences, before any work
    samples = calibration_samples(tier, args.calib, args.seed)
    model_dir = _model_dir(args.model, args.quiet)
    model, processor = load_model(tier, model_dir, progress=not args.quiet)
    batch = encode_calibration(tier, samples, processor)
    units = list_units(model, args.vision)
    check_resume(out, cfg, search_context(model, batch, units))
    t0 = time.time()
    dense_loss = float(per_sample_losses(model, batch).mean())
    files.ensure_dir(out)
    cfg.to_json(out / "search_config.json")
    db_dir = Path(args.db) if args.db else out / "leveldb"
    build_level_db(model, batch, db_dir, covering_grid(db_dir, cfg.levels), "sparsegpt", units=list(units),
                   progress=not args.quiet, calib_info={"ids": [s.id for s in samples], "seed": args.seed},
                   device=args.device, store_dtype=args.db_dtype)
    model, batch = place(tier, model, batch)  # the search scores whole candidates on the device
    result = run_search(model, batch, LevelDB(db_dir), units, cfg, out, progress=not args.quiet,
                        groups=[s.suite for s in samples])
    mode = "assembled"
    if args.exact:
        mode = "exact"
        model, processor = load_model(tier, model_dir)
        model, _ = place(tier, model)
        files.write_csv(out / "sparsity.csv", exact_reprune(model, result.policy, result.projector, batch,
                                                            progress=not args.quiet))
    loss = float(per_sample_losses(model, batch).mean())
    timing = {k: round(v, 4) for k, v in result.timing.items()}
    loading.save(model, processor, out, {
        "kind": "searched", "base_model": str(model_dir), "mode": mode, "policy_id": result.policy.policy_id(),
        "sparsity": args.sparsity, "mean_sparsity": result.policy.meta["mean_sparsity"],
        "score": result.score.to_dict(), "search_config": cfg.to_dict(), "timing": timing,
        "calibration": {"n": args.calib, "seed": args.seed, "ids": [s.id for s in samples],
                        "loss_dense": dense_loss, "loss_final": loss},
        "projector": result.projector.name if result.projector else None, "seconds": round(time.time() - t0, 3)})
    n_asm = max(result.timing["n_assembled"], 1)
    print(f"search: best J {result.score.j:.4f} (R {result.score.r_hat:.4f} + {cfg.lam:g} x G "
          f"{result.score.g_hat:.4f}), mean sparsity {result.policy.meta['mean_sparsity']:.4f} "
          f"(target {args.sparsity:g}), {result.evaluations} evaluations in {result.wall_s:.1f} s")
    print(f"per candidate: assemble {1e3 * result.timing['assemble'] / n_asm:.2f} ms, "
          f"evaluate {1e3 * result.timing['evaluate'] / n_asm:.2f} ms; calibration loss "
          f"{dense_loss:.4f} (dense) -> {loss:.4f} ({mode})")
    print(f"wrote {out} (model, policy.json, history.csv" + (", projector.safetensors)" if result.projector else ")"))
    return 0


#: The notebooks whose parameters a sweep uses (model, main table, ablations), in the order their defaults apply.
SWEEP_NOTEBOOKS: tuple[str, ...] = ("01_tiny_model", "05_main_table", "06_ablations")


def sweep_params(args: argparse.Namespace) -> dict:
    """The parameters notebooks 01, 05 and 06 run with under ``--profile`` (their ``parameters`` cells'
    defaults, then the profile's values, as the pipeline passes them), then the flags given."""
    from ellava_lib.run import pipeline

    root = pipeline.project_root(args.root)
    params: dict = {}
    for name in SWEEP_NOTEBOOKS:
        params.update(pipeline.notebook_defaults(root / "notebooks" / f"{name}.ipynb"))
    params.update(pipeline.load_profile(args.profile, root))
    flags = {"table_methods": args.methods, "sparsities": args.sparsities, "seeds": args.seeds,
             "workers": args.workers}
    params.update({k: v for k, v in flags.items() if v is not None})
    return params


def _check_sweep_params(params: dict) -> None:
    """One-line errors for values no job could run with (methods, sparsities, seeds)."""
    import math

    from ellava_lib.run.sweep import ALL_METHODS

    methods = [m for arg in params["table_methods"] for m in str(arg).split(",") if m]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad or not methods:
        raise CLIError(f"unknown method {', '.join(bad) or '(none)'}; choose from {', '.join(ALL_METHODS)}")
    params["table_methods"] = methods
    for s in [*params["sparsities"], params["sparsity"]]:
        if not (isinstance(s, (int, float)) and math.isfinite(s) and 0.0 <= s < 1.0):
            raise CLIError(f"sparsity must be in [0, 1), got {s}")
    if not params["seeds"] or not all(isinstance(x, int) for x in params["seeds"]):
        raise CLIError(f"seeds must be a non-empty list of integers, got {params['seeds']}")


def sweep_jobs(spec, params: dict, what: str) -> list:
    """The jobs of notebook 05 (``main``: every method x sparsity x seed), of notebook 06 (``ablations``: at
    ``sparsity`` and the first seed), or both (``all``; a job in both runs once)."""
    from ellava_lib.run import sweep

    jobs = []
    if what in ("main", "all"):
        jobs += sweep.jobs_grid(params["table_methods"], params["sparsities"], params["seeds"], params["calib_n"])
    if what in ("ablations", "all"):
        jobs += sweep.ablation_jobs(spec, params["sparsity"], params["seeds"][0], params["calib_n"], params["gaps"],
                                    params["calib_ns"])
    unique: dict = {}
    for job in jobs:
        unique.setdefault(job.name(), job)
    return list(unique.values())


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run notebook 05's and / or 06's sweep jobs into ``--out``/sweep (the run folder the notebooks share)."""
    from ellava_lib.run import backends, pipeline

    params = sweep_params(args)
    _check_sweep_params(params)
    if args.address is not None and args.backend != "ray":
        raise CLIError("--address needs --backend ray")
    if args.backend == "ray":
        backends.import_ray()  # not installed: a one-line error before any work
    pipeline.preflight(params)  # tier keys and device, search preset and overrides
    ray = None
    if args.backend == "ray" and backends.connect_ray(args.address, params["workers"]):  # before any work
        ray = backends.import_ray()
    try:
        return _sweep(args, params)
    finally:
        if ray is not None:
            ray.shutdown()


def _sweep(args: argparse.Namespace, params: dict) -> int:
    """``cmd_sweep`` once its input is checked: the model record, the spec, the jobs, the sweep."""
    from ellava_lib.run import backends, runs, sweep
    from ellava_lib.run.tier import Tier, check_device, model_record

    run = runs.Run(Path(args.out))  # created (and checked writable) here
    if run.path("model.json").is_file():
        model_info = run.read_json("model.json")
    else:  # what notebook 01 writes (the tiny model is built, or found in the cache)
        tier = Tier.from_dict(params.get("tier"))
        check_device(tier)
        model_info = model_record(tier, params["train_preset"])
        run.write_json("model.json", model_info)
    spec = sweep.SweepSpec(model_info["model_dir"], params["sweep_eval_limit"] or None,
                           search_preset=params["search_preset"], search=params.get("search") or {},
                           ellava=params.get("ellava") or {}, tier=model_info.get("tier", {}))
    jobs = sweep_jobs(spec, params, args.what)
    try:
        frame = sweep.run_sweep(spec, jobs, run.path("sweep"), workers=params["workers"], threads=args.threads,
                                progress=not args.quiet, backend=args.backend, address=args.address,
                                retries=args.retries)
    except backends.SweepFailed as e:
        for failure in e.failures:
            print(f"ellava: failed: {failure.line()}", file=sys.stderr)
        print(f"ellava: {len(e.failures)} of the sweep's tasks failed; {len(e.frame)} of {len(jobs)} rows in "
              f"{run.path('sweep/results.csv')}, details in {e.path}", file=sys.stderr)
        return 1
    print(f"{len(frame)} rows in {run.path('sweep/results.csv')}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the model's prunable units and parameter counts (the 7B on the meta device: no weights)."""
    import json

    from ellava_lib.model.structure import CONFIG_ALIASES, inspect_model

    if args.model in CONFIG_ALIASES:
        if not args.meta:
            raise CLIError(f"{args.model}: pass --meta (only the structure is available offline)")
        info = inspect_model(args.model, meta=True, include_vision=args.vision)
    else:
        from ellava_lib.model.specs import load_model

        model, _ = load_model(args.model, progress=False)
        info = inspect_model(model, include_vision=args.vision)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{args.model}: {info['params_total']:,} parameters "
              + ", ".join(f"{k} {v:,}" for k, v in info["params_by_component"].items()))
        for u in info["units"]:
            print(f"  {u['name']:<20} {u['params']:>14,}")
        print(f"{info['n_units']} units")
    return 0


def _data_args(parser: argparse.ArgumentParser, judge: bool = False) -> None:
    """The tier options shared by eval / prune / search (see :class:`tier.Tier`)."""
    parser.add_argument("--data", choices=("synthetic", "real"), default="synthetic",
                        help="synthetic suite, or the real benchmarks of ellava_lib/data/manifests/ (calibration from "
                             "their training split)")
    parser.add_argument("--data-dir", default=None,
                        help="with --data real: local parquet copies in the upstream schema under "
                             "DIR/<benchmark>/ instead of the Hugging Face hub")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float16",
                        help="weights dtype of a hub model (llava-1.5-7b); built-in and folder models keep theirs")
    if judge:
        parser.add_argument("--judge", choices=("local", "gpt"), default="local",
                            help="mmvet / llavabench judge: local deterministic, or GPT (OPENAI_BASE_URL, "
                                 "OPENAI_API_KEY, ELLAVA_JUDGE_MODEL from the environment)")


#: ``ellava build --preset`` choices: the keys of ``model.train.PRESETS`` (not imported here: parsing stays fast).
BUILD_PRESETS = ("tiny", "ci", "micro", "smol", "smol-micro")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ellava", description="EfficientLLaVA reproducibility kit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("build", help="train a built-in model (cached) and print its folder")
    b.add_argument("--force", action="store_true", help="retrain even if cached")
    b.add_argument("--preset", choices=BUILD_PRESETS, default="tiny",
                   help="train recipe: tiny (the embedded default), ci (about a minute), micro (seconds), smol "
                        "(SmolLM2-135M, about an hour on 2 cores; a killed build resumes), smol-micro (seconds)")
    b.add_argument("--seed", type=int, default=None,
                   help="build seed (weights init and batch order); default: the preset's. Another seed is "
                        "another model, cached beside the default")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_build)

    e = sub.add_parser("eval", help="evaluate a model on the synthetic suites (or the real benchmarks)")
    e.add_argument("--model", default="tiny", help="'tiny', a model folder, or llava-1.5-7b (hub)")
    e.add_argument("--suite", type=_suites, default=SUITES, help="all, or a comma-separated list")
    e.add_argument("--split", choices=SPLITS, default="test")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--limit", type=_positive_int, default=None, help="first N items per suite")
    e.add_argument("--batch-size", type=_positive_int, default=32)
    e.add_argument("--data-seed", type=int, default=0)
    e.add_argument("--device", default=None, help="evaluate on this device (e.g. cuda)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    from ellava_lib.data.prompts import PROMPT_FORMATS
    from ellava_lib.data.real_image import IMAGE_MODES

    e.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=None,
                   help="conversation format (default: vicuna_v1, LLaVA-1.5's, with --data real; else hf, the "
                        "llava-hf chat template)")
    e.add_argument("--image-mode", choices=IMAGE_MODES, default=None,
                   help="pad to square in the processor's mean colour (LLaVA-1.5; default with --data real) or "
                        "crop (the processor's own centre crop; default on synthetic data)")
    e.add_argument("--vizwiz-testdev-out", default=None, metavar="FILE",
                   help="with --data real: also answer VizWiz test-dev and write FILE, the EvalAI upload "
                        "(JSON list of {image, answer}); the VizWiz score reported is on val")
    _data_args(e, judge=True)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("prune", help="prune a model's language model (calibrated on the calib split)")
    r.add_argument("--model", default="tiny", help="'tiny', a model folder, or llava-1.5-7b (hub)")
    r.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt", "owl", "ecoflap", "llm_pruner"),
                   default="sparsegpt",
                   help="owl / ecoflap allocate a non-uniform policy, then prune it with SparseGPT; "
                        "llm_pruner zeroes whole heads / MLP channels (Taylor importance)")
    r.add_argument("--sparsity", type=float, default=None, help="mean sparsity in [0, 1)")
    r.add_argument("--nm", default=None, help="N:M semi-structured pattern, e.g. 2:4 (magnitude, wanda, sparsegpt)")
    r.add_argument("--calib", type=int, default=64, help="number of calibration samples")
    r.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (and ECoFLaP's noise)")
    r.add_argument("--vision", action="store_true", help="prune the vision tower's blocks too")
    r.add_argument("--device", default=None, help="run calibration/OBS one decoder block at a time on this device "
                                                  "(e.g. cuda); the model itself stays on the CPU")
    r.add_argument("--out", required=True, help="output model folder")
    r.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    _data_args(r)
    r.set_defaults(func=cmd_prune)

    s = sub.add_parser("search", help="search a per-unit sparsity policy (SRM objective, level database)")
    s.add_argument("--model", default="tiny", help="'tiny', a model folder, or llava-1.5-7b (hub)")
    s.add_argument("--sparsity", type=float, required=True, help="target mean sparsity (within the grid, 0-0.9)")
    s.add_argument("--calib", type=int, default=64, help="number of calibration samples")
    s.add_argument("--preset", default="default", metavar="{ci,default,paper}",  # checked by SearchConfig.from_preset
                   help="search settings: SearchConfig.ci(), .default() or .paper() in ellava_lib/search/config.py "
                        "(the profiles' of the same names). Each option below replaces one field; left out, the "
                        "preset's value holds")
    s.add_argument("--gap", choices=("none", "capacity", "bernstein", "norm"), default=None,
                   help="generalization-gap estimator G_hat")
    s.add_argument("--lam", type=float, default=None, help="weight lambda of the gap term")
    s.add_argument("--loss", choices=("ce", "kl"), default=None,
                   help="per-sample loss: KL to the dense model's next-token distribution at the answer positions, "
                        "or answer CE")
    s.add_argument("--budget", choices=("params", "flops"), default=None)
    s.add_argument("--seed", type=int, default=0, help="seed of the calibration draw and of the search")
    s.add_argument("--generations", type=int, default=None)
    s.add_argument("--population", type=_positive_int, default=None)
    s.add_argument("--offspring", type=_positive_int, default=None, help="children per generation")
    s.add_argument("--screen", type=int, default=None, help="screening samples of multi-step selection (0 = off)")
    s.add_argument("--survivors", type=_positive_int, default=None, help="children scored on all samples")
    s.add_argument("--fine-step", type=float, default=None,
                   help="step of the finer levels within 0.15 of the target (default 0.05; 0 = the 0.1 grid only)")
    s.add_argument("--init", default=None,
                   help="start policies of the search, comma-separated, from uniform, owl, ecoflap")
    s.add_argument("--no-projector", action="store_true", help="no projector evolution (projector_every 0)")
    s.add_argument("--projector-every", type=_positive_int, default=None, help="generations between evolutions")
    s.add_argument("--projector-steps", type=int, default=None, help="AdamW steps per evolution")
    s.add_argument("--db", default=None, help="level database folder (default OUT/leveldb; built if missing)")
    s.add_argument("--db-dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto",
                   help="storage dtype of the level database (auto: the model weights' own)")
    s.add_argument("--vision", action="store_true", help="search the vision tower's units too")
    s.add_argument("--exact", action="store_true", help="re-prune the final policy sequentially with SparseGPT")
    s.add_argument("--device", default=None, help="build the level database one decoder block at a time on this "
                                                  "device (e.g. cuda), then search on it")
    s.add_argument("--out", required=True, help="output folder (resumed if it holds a checkpoint)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    _data_args(s)
    s.set_defaults(func=cmd_search)

    w = sub.add_parser("sweep", help="run the main table's and / or the ablations' sweep jobs of a profile "
                                     "(notebooks 05 / 06), locally or on a Ray cluster")
    w.add_argument("--profile", required=True, help="profiles/NAME.yaml: the values notebooks 01, 05 and 06 get")
    w.add_argument("--out", required=True,
                   help="the run folder (model.json, sweep/), shared with the notebooks; with --backend ray on "
                        "storage every node sees")
    w.add_argument("--what", choices=("main", "ablations", "all"), default="all",
                   help="notebook 05's jobs, notebook 06's, or both")
    w.add_argument("--methods", nargs="+", default=None, help="main table methods (default: table_methods)")
    w.add_argument("--sparsities", nargs="+", type=float, default=None,
                   help="main table sparsities (default: the profile's; the ablations run at its 'sparsity')")
    w.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="seeds of the main table (default: the profile's); the ablations run at the first")
    w.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local worker processes, or Ray tasks (pip install \"ellava[ray]\")")
    w.add_argument("--address", default=None,
                   help="Ray cluster to join (e.g. auto, or HOST:6379); default: start a local Ray")
    w.add_argument("--retries", type=_non_negative_int, default=0, metavar="N",
                   help="re-run a failed job up to N times")
    w.add_argument("--workers", type=_positive_int, default=None,
                   help="parallel jobs (default: the profile's workers); a local Ray gets this many CPUs")
    w.add_argument("--threads", type=_positive_int, default=1, help="torch threads per job")
    w.add_argument("--root", default=None, help="project folder with notebooks/ and profiles/ "
                                                 "(default: $ELLAVA_ROOT, else this checkout)")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    w.set_defaults(func=cmd_sweep)

    i = sub.add_parser("inspect", help="list a model's prunable units and parameter counts")
    i.add_argument("--model", default="tiny", help="'tiny', a model folder, or llava-1.5-7b (with --meta)")
    i.add_argument("--meta", action="store_true", help="build on the meta device from the shipped config")
    i.add_argument("--vision", action="store_true", help="include the vision tower's units")
    i.add_argument("--json", action="store_true", help="print a JSON object")
    i.set_defaults(func=cmd_inspect)
    from ellava_lib.cli.plan import add_parsers  # plan, dryrun

    add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ellava_lib.data.real import DataLoadError
    from ellava_lib.eval.gpt_judge import JudgeError
    from ellava_lib.model.loading import ModelLoadError

    out = Path(args.out) if getattr(args, "out", None) else None
    created = out is not None and not out.exists()  # a failed command removes only a folder it made
    try:
        return args.func(args)
    except (CLIError, ModelLoadError, DataLoadError, JudgeError, ValueError, OSError) as e:
        _remove_if_created(out, created)
        print(f"ellava: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # kept: an interrupted search resumes from its folder
        print("ellava: interrupted", file=sys.stderr)
        return 130
    except BaseException:
        _remove_if_created(out, created)
        raise


def _remove_if_created(out: Path | None, created: bool) -> None:
    """No half-written output: remove ``--out`` when this command created it and then failed."""
    import shutil

    if created and out is not None and out.exists():
        if out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        else:
            out.unlink(missing_ok=True)
