"""``ellava plan`` and ``ellava dryrun`` (registered by :func:`ellava_lib.cli.build_parser`): the predicted
memory / disk / time of a profile's stages (:mod:`ellava_lib.run.plan`) and the random-weight dry run that measures
them (:mod:`ellava_lib.run.dryrun`).

    ellava plan --profile paper [--gpu h100] [--gpu-mem GB] [--json] [--readme README.md]
    ellava plan --profile smol [--gpu h100] [--json] [--readme README.md]   (the smol tier: run/smolplan.py)
    ellava dryrun --profile paper --random-weights --out DIR [--device cuda] [--gpu-mem GB] [--shrink]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_plan(args: argparse.Namespace) -> int:
    """Predicted peak GPU memory, disk and time per stage of a profile, and the batch sizes that fit
    (:mod:`ellava_lib.run.plan`); ``--readme README.md`` splices the table into the ``paper-plan`` block of that
    README or of the ``docs/*.md`` page beside it that holds it (``docs/paper.md``). A smol-tier profile gets the GPU
    time of its every stage, build included, against the 20-minute target (:mod:`ellava_lib.run.smolplan`, block
    ``smol-plan`` in ``docs/tiers.md``)."""
    import json

    from ellava_lib.run import plan, smolplan
    from ellava_lib.speed.memory import DEFAULT_GPU_GB

    if smolplan.applies(plan.profile_params(args.profile, args.root)):
        result = smolplan.make_plan(args.profile, args.gpu, args.gpu_mem, args.root)
        text, splice = smolplan.format_plan(result), smolplan.splice_readme
        data = {**result.to_dict(), "total_seconds": smolplan.total_seconds(result),
                "target_seconds": smolplan.TARGET_S, "assumptions": list(smolplan.ASSUMPTIONS)}
    else:
        gpu_gb = DEFAULT_GPU_GB if args.gpu_mem is None else args.gpu_mem
        result = plan.make_plan(args.profile, gpu_gb, args.root, args.gpu)
        text, splice, data = plan.format_plan(result), plan.splice_readme, result.to_dict()
    if args.readme:
        splice(args.readme, result)
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


def cmd_dryrun(args: argparse.Namespace) -> int:
    """Every stage of a profile on random weights and synthetic data, measured (:mod:`ellava_lib.run.dryrun`)."""
    from ellava_lib.run import dryrun
    from ellava_lib.speed.memory import DEFAULT_GPU_GB

    if not args.random_weights:
        raise ValueError("dryrun downloads nothing: pass --random-weights (random fp16 weights built on the device)")
    gpu_gb = DEFAULT_GPU_GB if args.gpu_mem is None else args.gpu_mem
    record = dryrun.profile_dryrun(args.profile, args.out, args.device, gpu_gb, args.shrink, args.db_blocks,
                                   args.root)
    print(dryrun.format_record(record))
    print(f"wrote {Path(args.out) / 'dryrun.json'}")
    return 0


def add_parsers(sub) -> None:
    """``ellava plan`` and ``ellava dryrun``."""
    for name, func, text in (("plan", cmd_plan, "predicted peak GPU memory, disk and time per stage of a profile"),
                             ("dryrun", cmd_dryrun, "run every stage of a profile on random weights (no download) "
                                                    "and record measured time and peak memory")):
        c = sub.add_parser(name, help=text)
        c.add_argument("--profile", required=True, help="profiles/NAME.yaml (its model needs a shipped config)")
        c.add_argument("--gpu-mem", type=float, default=None, metavar="GB",
                       help="GPU memory to fit (default 40; plan of a smol profile: the --gpu preset's)")
        c.add_argument("--root", default=None, help="project folder with notebooks/ and profiles/")
        c.set_defaults(func=func)
        if name == "plan":
            c.add_argument("--json", action="store_true", help="print a JSON object")
            c.add_argument("--gpu", default=None, help="cost-model device preset (h100, a100, cpu-2core; default "
                                                       "the profile's gpu)")
            c.add_argument("--readme", default=None, help="splice the table into the paper-plan (smol profile: "
                                                          "smol-plan) block of this README or of the docs/*.md "
                                                          "page beside it that holds the block")
            continue
        c.add_argument("--random-weights", action="store_true", help="random fp16 weights built on the device")
        c.add_argument("--out", required=True, help="output folder (dryrun.json, the partial level database)")
        c.add_argument("--device", default=None, help="default: the profile's tier device")
        c.add_argument("--shrink", action="store_true", help="a 2-layer, hidden-64 stand-in of the model (CPU tests)")
        c.add_argument("--db-blocks", type=int, default=1, help="decoder blocks of the level database built")
