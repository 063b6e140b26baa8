"""The ``ellava`` command line: thin wrappers that build the same config objects the notebooks use.

    ellava build [--force]                    train (or find cached) the tiny model, print its folder
    ellava eval --model tiny --suite all --split test --out DIR [--limit N]
    ellava inspect --model llava-1.5-7b --meta --json
    ellava prune --model tiny --method sparsegpt --sparsity 0.6 [--nm 2:4] --calib 64 --seed 0 --out DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .schema import SUITES
from .synth import SPLITS


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
        raise argparse.ArgumentTypeError(f"unknown suite {','.join(bad) or value!r}; choose from all, {', '.join(SUITES)}")
    return names


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


def cmd_build(args: argparse.Namespace) -> int:
    from .train import TrainConfig, build_or_load

    t0 = time.time()
    path = build_or_load(TrainConfig(), force=args.force)
    print(f"tiny model: {path} ({time.time() - t0:.0f} s)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from . import io
    from .evaluate import EvalConfig, evaluate, headline
    from .loading import load_model

    cfg = EvalConfig(suites=args.suite, split=args.split, limit=args.limit, batch_size=args.batch_size,
                     data_seed=args.data_seed)
    out = io.ensure_dir(Path(args.out))  # fail before any work if the folder is unusable
    model, processor = load_model(args.model)
    frame = evaluate(model, processor, cfg, out, progress=not args.quiet)
    print(headline(frame).round(2).to_string())
    print(f"wrote {out / 'metrics.csv'} and {out / 'predictions.jsonl'}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune a model (uniform policy, or one allocated by OWL / ECoFLaP) and save it with its policy."""
    import json
    import math
    import os
    import shutil

    from . import calibration, io, tiny_model
    from .baselines import ecoflap_policy, owl_policy
    from .loading import load_model, resolve_model_dir
    from .policy import DEFAULT_GRID, GRID_TOL, Policy
    from .prune import parse_nm, prune_model
    from .units import list_units

    n, m = parse_nm(args.nm) if args.nm else (0, 0)
    if n and args.method in ("owl", "ecoflap"):
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
    samples = calibration.draw_calibration(args.calib, args.seed)  # ValueError past the pool: exit 2
    model_dir = resolve_model_dir(args.model, progress=not args.quiet)
    model, processor = load_model(model_dir, progress=not args.quiet)
    batch = calibration.encode_calibration(samples, processor)
    t0 = time.time()
    dense_loss = calibration.calibration_loss(model, batch)
    sizes = list_units(model, args.vision)
    if args.method == "owl":
        policy = owl_policy(model, batch, target, include_vision=args.vision, progress=not args.quiet)
    elif args.method == "ecoflap":
        policy = ecoflap_policy(model, batch, target, seed=args.seed, include_vision=args.vision,
                                progress=not args.quiet)
    else:
        on_grid = any(abs(target - g) <= GRID_TOL for g in DEFAULT_GRID)
        grid = DEFAULT_GRID if on_grid else tuple(sorted((*DEFAULT_GRID, target)))
        policy = Policy.uniform(sizes, target, grid, meta={"method": args.method, "target": target})
    solver = "sparsegpt" if args.method in ("owl", "ecoflap") else args.method
    report = prune_model(model, policy, solver, batch, prune_n=n, prune_m=m, progress=not args.quiet)
    loss = calibration.calibration_loss(model, batch)
    measured = float((report["measured"] * report["params"]).sum() / report["params"].sum())
    extra = {"kind": "pruned", "base_model": str(model_dir), "method": args.method, "solver": solver,
             "sparsity": target, "nm": args.nm, "policy_id": policy.policy_id(), "mean_sparsity": measured,
             "calibration": {"n": args.calib, "seed": args.seed, "ids": [s.id for s in samples],
                             "loss_dense": dense_loss, "loss_pruned": loss},
             "seconds": round(time.time() - t0, 3)}
    base_meta = Path(model_dir) / "ellava.json"
    if base_meta.is_file():
        extra["base_meta"] = json.loads(base_meta.read_text())
    io.ensure_dir(out.parent)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        tiny_model.save(model, processor, tmp, extra)
        policy.to_json(tmp / "policy.json")
        io.write_csv(tmp / "sparsity.csv", report)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"{args.method}: mean sparsity {measured:.4f} (target {target:g}); "
          f"calibration loss {dense_loss:.4f} -> {loss:.4f}")
    print(f"wrote {out} (model, policy.json, sparsity.csv)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the model's prunable units and parameter counts (the 7B on the meta device: no weights)."""
    import json

    from .structure import CONFIG_ALIASES, inspect_model

    if args.model in CONFIG_ALIASES:
        if not args.meta:
            raise CLIError(f"{args.model}: pass --meta (only the structure is available offline)")
        info = inspect_model(args.model, meta=True, include_vision=args.vision)
    else:
        from .loading import load_model

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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ellava", description="EfficientLLaVA reproducibility kit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("build", help="train the tiny model (cached) and print its folder")
    b.add_argument("--force", action="store_true", help="retrain even if cached")
    b.set_defaults(func=cmd_build)

    e = sub.add_parser("eval", help="evaluate a model on the synthetic suites")
    e.add_argument("--model", default="tiny", help="'tiny' or a model folder")
    e.add_argument("--suite", type=_suites, default=SUITES, help="all, or a comma-separated list")
    e.add_argument("--split", choices=SPLITS, default="test")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--limit", type=_positive_int, default=None, help="first N items per suite")
    e.add_argument("--batch-size", type=_positive_int, default=32)
    e.add_argument("--data-seed", type=int, default=0)
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("prune", help="prune a model's language model (calibrated on the calib split)")
    r.add_argument("--model", default="tiny", help="'tiny' or a model folder")
    r.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt", "owl", "ecoflap"), default="sparsegpt",
                   help="owl / ecoflap allocate a non-uniform policy, then prune it with SparseGPT")
    r.add_argument("--sparsity", type=float, default=None, help="mean sparsity in [0, 1)")
    r.add_argument("--nm", default=None, help="N:M semi-structured pattern, e.g. 2:4 (magnitude, wanda, sparsegpt)")
    r.add_argument("--calib", type=int, default=64, help="number of calibration samples")
    r.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (and ECoFLaP's noise)")
    r.add_argument("--vision", action="store_true", help="prune the vision tower's blocks too")
    r.add_argument("--out", required=True, help="output model folder")
    r.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_prune)

    i = sub.add_parser("inspect", help="list a model's prunable units and parameter counts")
    i.add_argument("--model", default="tiny", help="'tiny', a model folder, or llava-1.5-7b (with --meta)")
    i.add_argument("--meta", action="store_true", help="build on the meta device from the shipped config")
    i.add_argument("--vision", action="store_true", help="include the vision tower's units")
    i.add_argument("--json", action="store_true", help="print a JSON object")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .loading import ModelLoadError

    try:
        return args.func(args)
    except (CLIError, ModelLoadError, ValueError, OSError) as e:
        print(f"ellava: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ellava: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
