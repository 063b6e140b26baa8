"""``ellava prune`` and ``ellava search``: prune a model with a baseline method, or search its per-unit sparsity
policy (level database, evolutionary search, final model)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ellava_lib.cli.common import CLIError, add_data_args, model_dir_of, positive_int, tier_of


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune a model (uniform policy, one allocated by OWL / ECoFLaP, or a searched one with ``--policy``) and
    save it with its policy: a plain ``transformers`` folder (:func:`export.export_pruned`)."""
    import json

    from ellava_lib.core.units import policy_units
    from ellava_lib.model import losses
    from ellava_lib.prune.masks import parse_nm
    from ellava_lib.prune.prune import measured_mean, prune_model
    from ellava_lib.run.sweep import method_policy, solver_for
    from ellava_lib.run.tier import calibration_samples, encode_calibration, load_model
    from ellava_lib.speed.export import export_pruned

    n, m = parse_nm(args.nm) if args.nm else (0, 0)
    if args.policy and (args.sparsity is not None or n or args.method not in ("magnitude", "wanda", "sparsegpt")):
        raise CLIError("--policy sets every unit's sparsity: leave out --sparsity and --nm, and use --method "
                       "sparsegpt (the default), wanda or magnitude")
    searched = searched_policy(Path(args.policy)) if args.policy else None
    target = prune_target(args, n, m) if searched is None else None
    if args.calib <= 0:
        raise CLIError(f"--calib must be a positive integer, got {args.calib}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise CLIError(f"output {out} exists and is not an empty folder (pass --force to replace it)")
    tier = tier_of(args)
    samples = calibration_samples(tier, args.calib, args.seed)  # ValueError past the pool: exit 2
    model_dir = prunable_model_dir(args.model, args.quiet)
    model, processor = load_model(tier, model_dir, progress=not args.quiet)
    batch = encode_calibration(tier, samples, processor)
    t0 = time.time()
    dense_loss = losses.calibration_loss(model, batch)
    if searched is None:
        policy = method_policy(model, batch, args.method, target, args.seed, args.vision, progress=not args.quiet)
    else:
        policy = apply_searched(model, *searched)
        target = policy.mean_sparsity(policy_units(model, policy.sparsities))
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
    if searched is not None:
        extra["policy_source"] = {"policy": str(searched[0]), "projector": str(searched[1]) if searched[1] else None}
    base_meta = Path(model_dir) / "ellava.json"
    if base_meta.is_file():
        extra["base_meta"] = json.loads(base_meta.read_text())
    export_pruned(model, processor, policy, report, out, extra)
    print(f"{args.method}: mean sparsity {measured:.4f} (target {target:g}); "
          f"calibration loss {dense_loss:.4f} -> {loss:.4f}")
    print(f"wrote {out} (model, policy.json, sparsity.csv)")
    return 0


def prune_target(args: argparse.Namespace, n: int, m: int) -> float:
    """The mean sparsity ``ellava prune`` is asked for without ``--policy``: ``--sparsity``, or ``N / M`` of
    ``--nm N:M``; a :class:`CLIError` for a value outside ``[0, 1)``, a method that takes no N:M pattern, or a
    ``--sparsity`` that disagrees with ``--nm``."""
    import math

    from ellava_lib.core.policy import GRID_TOL

    if n and args.method in ("owl", "ecoflap", "llm_pruner"):
        raise CLIError(f"--nm applies to magnitude, wanda and sparsegpt, not to {args.method}")
    if args.sparsity is None and not n:
        raise CLIError("give --sparsity S (in [0, 1)), --nm N:M or --policy")
    target = n / m if n else args.sparsity
    if not (isinstance(target, float) and math.isfinite(target) and 0.0 <= target < 1.0):
        raise CLIError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if n and args.sparsity is not None and abs(args.sparsity - target) > GRID_TOL:
        raise CLIError(f"--sparsity {args.sparsity} disagrees with --nm {args.nm} ({target:g})")
    return target


def searched_policy(path: Path) -> tuple[Path, Path | None]:
    """The policy file and the projector file ``ellava prune --policy PATH`` prunes with: ``PATH`` itself (a
    ``policy.json``), or, for a folder (``ellava search``'s ``--out``), its ``policy.json`` and, when the search
    evolved one, its ``projector.safetensors`` (else None). A :class:`CLIError` when there is no policy file."""
    if path.is_dir():
        projector = path / "projector.safetensors"
        return _policy_file(path / "policy.json"), projector if projector.is_file() else None
    return _policy_file(path), None


def _policy_file(path: Path) -> Path:
    if not path.is_file():
        raise CLIError(f"--policy: {path} is missing (give an `ellava search` folder or its policy.json)")
    return path


def apply_searched(model, policy_file: Path, projector: Path | None):
    """The :class:`Policy` of ``policy_file``; the searched ``projector`` (if any) is loaded into ``model`` first,
    so every block is pruned on the activations of the model that will be used (as ``ellava search --exact``)."""
    from ellava_lib.core.policy import Policy
    from ellava_lib.search.projector import load_projector, set_projector_state

    policy = Policy.from_json(policy_file)
    if projector is not None:
        set_projector_state(model, load_projector(projector)[0])
    return policy


def prunable_model_dir(spec: str, quiet: bool) -> str | Path:
    """:func:`model_dir_of` ``spec``, after checking a folder's decoder (:func:`units.check_decoder`, from its
    ``config.json``, before any weight is read): an unsupported one is a one-line error, exit status 2."""
    from transformers import LlavaConfig

    from ellava_lib.core.units import check_decoder

    model_dir = model_dir_of(spec, quiet)
    if isinstance(model_dir, Path):
        check_decoder(LlavaConfig.from_pretrained(model_dir))
    return model_dir


#: ``ellava search`` flags that set a :class:`config.SearchConfig` field (serialised name), None = the preset's.
SEARCH_FLAGS: dict[str, str] = {"gap": "gap", "loss": "loss_kind", "budget": "budget",
                                "generations": "generations", "max_generations": "max_generations",
                                "population": "population", "offspring": "offspring",
                                "screen": "screen_samples", "survivors": "survivors", "init": "init",
                                "fine_step": "fine_step", "units": "units", "select_rule": "select_rule",
                                "guard": "guard",
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
    from ellava_lib.run.taskscore import calibration_task_scorer
    from ellava_lib.run.tier import (
        calibration_samples,
        encode_calibration,
        eval_config,
        load_model,
        make_judge,
        place,
    )
    from ellava_lib.search.evolve import check_resume, run_search, search_context, split_rows
    from ellava_lib.search.finalize import exact_reprune
    from ellava_lib.search.objective import per_sample_losses, subset

    grid = DEFAULT_GRID
    if not (math.isfinite(args.sparsity) and grid[0] <= args.sparsity <= grid[-1]):
        raise CLIError(f"--sparsity must lie in [{grid[0]}, {grid[-1]}] (the range of the grid), got {args.sparsity}")
    if args.calib < 2:
        raise CLIError(f"--calib must be at least 2, got {args.calib}")
    tier = tier_of(args)
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
    model_dir = prunable_model_dir(args.model, args.quiet)
    model, processor = load_model(tier, model_dir, progress=not args.quiet)
    batch = encode_calibration(tier, samples, processor)
    units = list_units(model, args.vision, cfg.units)  # the search's units; the database holds the block units
    check_resume(out, cfg, search_context(model, batch, units))
    t0 = time.time()
    dense_loss = float(per_sample_losses(model, batch).mean())
    files.ensure_dir(out)
    cfg.to_json(out / "search_config.json")
    db_dir = Path(args.db) if args.db else out / "leveldb"
    stat_rows = split_rows(len(samples), cfg.select_frac, cfg.seed, [s.suite for s in samples])[0]
    stat_batch = subset(batch, stat_rows)  # no statistic reads a selection row (level database, exact re-prune)
    build_level_db(model, stat_batch, db_dir, covering_grid(db_dir, cfg.levels), "sparsegpt",
                   units=list(list_units(model, args.vision)),
                   progress=not args.quiet, calib_info={"ids": [samples[i].id for i in stat_rows], "seed": args.seed},
                   device=args.device, store_dtype=args.db_dtype)
    model, batch = place(tier, model, batch)  # the search scores whole candidates on the device
    scorer = calibration_task_scorer(tier, processor, samples, make_judge(tier, out / "judge"),
                                     eval_config(tier).batch_size)  # the guard's score of the selection rows
    result = run_search(model, batch, LevelDB(db_dir), units, cfg, out, progress=not args.quiet,
                        groups=[s.suite for s in samples], task_score=scorer)
    mode = "assembled"
    if args.exact:
        mode = "exact"
        model, processor = load_model(tier, model_dir)
        model, _ = place(tier, model)
        files.write_csv(out / "sparsity.csv", exact_reprune(model, result.policy, result.projector, stat_batch,
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
    print(f"search: best J {result.score.j:.4f} (R {result.score.r_hat:.4f} + {result.policy.meta['lam']:g} x G "
          f"{result.score.g_hat:.4f}), mean sparsity {result.policy.meta['mean_sparsity']:.4f} "
          f"(target {args.sparsity:g}), {result.evaluations} evaluations in {result.wall_s:.1f} s")
    print(f"per candidate: assemble {1e3 * result.timing['assemble'] / n_asm:.2f} ms, "
          f"evaluate {1e3 * result.timing['evaluate'] / n_asm:.2f} ms; calibration loss "
          f"{dense_loss:.4f} (dense) -> {loss:.4f} ({mode})")
    print(f"wrote {out} (model, policy.json, history.csv" + (", projector.safetensors)" if result.projector else ")"))
    return 0


def add_parsers(sub) -> None:
    """Register ``prune`` and ``search`` on the subparsers ``sub``."""
    r = sub.add_parser("prune", help="prune a model's language model (calibrated on the calib split)")
    r.add_argument("--model", default="tiny", help="'tiny', a model folder, or llava-1.5-7b (hub)")
    r.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt", "owl", "ecoflap", "llm_pruner"),
                   default="sparsegpt",
                   help="owl / ecoflap allocate a non-uniform policy, then prune it with SparseGPT; "
                        "llm_pruner zeroes whole heads / MLP channels (Taylor importance)")
    r.add_argument("--sparsity", type=float, default=None, help="mean sparsity in [0, 1)")
    r.add_argument("--policy", default=None, metavar="PATH",
                   help="prune under a searched policy instead: an `ellava search` folder (its policy.json, and its "
                        "evolved projector.safetensors, loaded first) or a policy.json; sequential SparseGPT, as "
                        "search --exact (no --sparsity, --nm or allocating --method)")
    r.add_argument("--nm", default=None, help="N:M semi-structured pattern, e.g. 2:4 (magnitude, wanda, sparsegpt)")
    r.add_argument("--calib", type=int, default=64, help="number of calibration samples")
    r.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (and ECoFLaP's noise)")
    r.add_argument("--vision", action="store_true", help="prune the vision tower's blocks too")
    r.add_argument("--device", default=None, help="run calibration/OBS one decoder block at a time on this device "
                                                  "(e.g. cuda); the model itself stays on the CPU")
    r.add_argument("--out", required=True, help="output model folder")
    r.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    add_data_args(r)
    r.set_defaults(func=cmd_prune)

    s = sub.add_parser("search", help="search a per-unit sparsity policy (SRM objective, level database)")
    s.add_argument("--model", default="tiny", help="'tiny', a model folder, or llava-1.5-7b (hub)")
    s.add_argument("--sparsity", type=float, required=True, help="target mean sparsity (within the grid, 0-0.9)")
    s.add_argument("--calib", type=int, default=64, help="number of calibration samples")
    s.add_argument("--preset", default="default", metavar="{ci,default,smol,paper}",  # checked by from_preset
                   help="search settings: SearchConfig.ci(), .default(), .smol() or .paper() in "
                        "ellava_lib/search/config.py (the profiles' of the same names). Each option below replaces "
                        "one field; left out, the preset's value holds")
    s.add_argument("--gap", choices=("none", "capacity", "bernstein", "norm"), default=None,
                   help="generalization-gap estimator G_hat")
    s.add_argument("--loss", choices=("ce", "kl"), default=None,
                   help="per-sample loss: KL to the dense model's next-token distribution at the answer positions, "
                        "or answer CE")
    s.add_argument("--budget", choices=("params", "flops"), default=None)
    s.add_argument("--units", choices=("block", "matrix"), default=None,
                   help="what gets one sparsity: block = each decoder block's attention and MLP (the default), "
                        "matrix = each weight matrix (q/k/v/o, gate/up/down); same level database")
    s.add_argument("--select-rule", choices=("min", "paired_se"), default=None,
                   help="what the search returns: the best candidate on the selection rows (min), or that one only "
                        "when its gain over the best start policy there exceeds one paired standard error, else "
                        "that start (paired_se, the default)")
    s.add_argument("--guard", choices=("task", "none"), default=None,
                   help="check what the search returns by the selection rows' generated answers: the start, the "
                        "policy with the original projector, or with the evolved one, the simplest within one "
                        "paired standard error of the best (task, the default), or return the pick with the latest "
                        "projector (none)")
    s.add_argument("--seed", type=int, default=0, help="seed of the calibration draw and of the search")
    s.add_argument("--generations", type=int, default=None)
    s.add_argument("--max-generations", type=int, default=None,
                   help="after --generations, go on one generation at a time until the best J improved by less "
                        "than 1%% over the last quarter of the generations, at most this many (0 = stop at "
                        "--generations; the presets' value)")
    s.add_argument("--population", type=positive_int, default=None)
    s.add_argument("--offspring", type=positive_int, default=None, help="children per generation")
    s.add_argument("--screen", type=int, default=None, help="screening samples of multi-step selection (0 = off)")
    s.add_argument("--survivors", type=positive_int, default=None, help="children scored on all samples")
    s.add_argument("--fine-step", type=float, default=None,
                   help="step of the finer levels within 0.15 of the target (default 0.05; 0 = the 0.1 grid only)")
    s.add_argument("--init", default=None,
                   help="start policies of the search, comma-separated, from uniform, owl, ecoflap")
    s.add_argument("--no-projector", action="store_true", help="no projector evolution (projector_every 0)")
    s.add_argument("--projector-every", type=positive_int, default=None, help="generations between evolutions")
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
    add_data_args(s)
    s.set_defaults(func=cmd_search)
