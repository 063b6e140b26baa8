"""``ellava build``, ``ellava eval`` and ``ellava inspect``: build (or find) a built-in model, evaluate a model,
list a model's prunable units."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ellava_lib.cli.common import CLIError, add_data_args, model_dir_of, positive_int, suites_arg, tier_of
from ellava_lib.core.schema import SUITES
from ellava_lib.data.synth import SPLITS

#: ``ellava build --preset`` choices: the keys of ``model.train_config.PRESETS`` (not imported here: parsing stays
#: fast).
BUILD_PRESETS = ("tiny", "ci", "micro", "smol", "smol-micro")


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
    if args.ship:
        from ellava_lib.model import shipped

        folder = shipped.ship(path, args.preset if args.seed is None else f"{args.preset}-seed{cfg.seed}")
        from ellava_lib.run import report

        sizes = shipped.manifest(folder)["files"]
        report.update_doc(shipped.ROOT.parent, shipped.SIZES_MARKER, shipped.sizes_markdown())
        print(f"shipped {folder} ({sum(f['bytes'] for f in sizes.values()) / 1e6:.1f} MB) and its size table in "
              f"{report.doc_with(shipped.ROOT.parent, shipped.SIZES_MARKER)}: commit both")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ellava_lib.core import files
    from ellava_lib.eval.evaluate import evaluate, headline
    from ellava_lib.run.tier import eval_config, load_model, make_judge, place

    tier = tier_of(args)
    cfg = eval_config(tier, args.limit, suites=args.suite, split=args.split, batch_size=args.batch_size,
                      data_seed=args.data_seed, prompt_format=args.prompt_format, image_mode=args.image_mode)
    testdev = Path(args.vizwiz_testdev_out) if args.vizwiz_testdev_out else None
    if testdev is not None and (tier.data != "real" or testdev.is_dir()):
        raise CLIError("--vizwiz-testdev-out needs --data real and a file path")
    out = files.ensure_dir(Path(args.out))  # fail before any work if the folder is unusable
    judge = make_judge(tier, out / "judge")
    model, processor = load_model(tier, model_dir_of(args.model, args.quiet), progress=not args.quiet)
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


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the model's prunable units and parameter counts. The 7B and the built-in models never need weights:
    they are built on the meta device from their config (:func:`inspect_info`); nothing is ever trained."""
    import json

    info = inspect_info(args.model, args.meta, args.vision)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{args.model}: {info['params_total']:,} parameters "
              + ", ".join(f"{k} {v:,}" for k, v in info["params_by_component"].items()))
        for u in info["units"]:
            print(f"  {u['name']:<20} {u['params']:>14,}")
        print(f"{info['n_units']} units")
    return 0


def inspect_info(spec: str, meta: bool, vision: bool) -> dict:
    """:func:`structure.inspect_model` of ``spec``: a shipped hub config (only with ``meta``) or a built-in name
    (``tiny``, ``smol``) on the meta device, from :func:`specs.builtin_config` (never trained: the recipe's
    config when nothing is cached or shipped); a built-in model already built and cached, without ``meta``, or a
    folder, with its weights."""
    from ellava_lib.model.specs import BUILTIN, build_dir, builtin_config, load_model
    from ellava_lib.model.structure import CONFIG_ALIASES, inspect_model, meta_model

    if spec in CONFIG_ALIASES:
        if not meta:
            raise CLIError(f"{spec}: pass --meta (only the structure is available offline)")
        return inspect_model(spec, meta=True, include_vision=vision)
    if spec in BUILTIN:
        built = build_dir(BUILTIN[spec]())
        if meta or not (built / "ellava.json").is_file():
            return inspect_model(meta_model(builtin_config(spec)), include_vision=vision)
        spec = str(built)
    model, _ = load_model(spec, progress=False)
    return inspect_model(model, include_vision=vision)


def add_parsers(sub) -> None:
    """Register ``build``, ``eval`` and ``inspect`` on the subparsers ``sub``."""
    b = sub.add_parser("build", help="train a built-in model (cached) and print its folder")
    b.add_argument("--force", action="store_true", help="retrain even if cached or shipped")
    b.add_argument("--preset", choices=BUILD_PRESETS, default="tiny",
                   help="train recipe: tiny (the embedded default), ci (about a minute), micro (seconds), smol "
                        "(SmolLM2-135M, about an hour on 2 cores; a killed build resumes), smol-micro (seconds)")
    b.add_argument("--seed", type=int, default=None,
                   help="build seed (weights init and batch order); default: the preset's. Another seed is "
                        "another model, cached beside the default")
    b.add_argument("--ship", action="store_true",
                   help="write what the build trained to weights/PRESET/ (with sizes and sha256), to be committed: "
                        "later builds of the same recipe load it instead of training")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_build)

    e = sub.add_parser("eval", help="evaluate a model on the synthetic suites (or the real benchmarks)")
    e.add_argument("--model", default="tiny", help="'tiny', a model folder, or llava-1.5-7b (hub)")
    e.add_argument("--suite", type=suites_arg, default=SUITES, help="all, or a comma-separated list")
    e.add_argument("--split", choices=SPLITS, default="test")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--limit", type=positive_int, default=None, help="first N items per suite")
    e.add_argument("--batch-size", type=positive_int, default=32)
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
    add_data_args(e, judge=True)
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("inspect", help="list a model's prunable units and parameter counts")
    i.add_argument("--model", default="tiny",
                   help="'tiny' or 'smol' (from the recipe's config, never trained), a model folder, or llava-1.5-7b "
                        "(with --meta)")
    i.add_argument("--meta", action="store_true",
                   help="build on the meta device from the config (shipped, cached or the recipe's): no weights")
    i.add_argument("--vision", action="store_true", help="include the vision tower's units")
    i.add_argument("--json", action="store_true", help="print a JSON object")
    i.set_defaults(func=cmd_inspect)
