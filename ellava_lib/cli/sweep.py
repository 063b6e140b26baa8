"""``ellava sweep``: notebook 05's and / or 06's sweep jobs of a profile, locally or on a Ray cluster, into the run
folder the notebooks share, and into the profile's results ledger when it has one (``ledger``, :mod:`ledger`: the
tracked folder of the project, e.g. ``results/smol``; ``--ledger DIR`` names another, ``--no-ledger`` none)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ellava_lib.cli.common import CLIError, non_negative_int, positive_int

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
             "workers": args.workers, "job_threads": args.threads}
    params.update({k: v for k, v in flags.items() if v is not None})
    params["ledger"] = ledger_dir(args, params, root)
    return params


def ledger_dir(args: argparse.Namespace, params: dict, root: Path) -> str:
    """The results ledger of the sweep: ``--ledger``, else the profile's ``ledger`` in the project folder ``root``;
    ``""`` with ``--no-ledger`` or when the profile has none."""
    if args.no_ledger:
        return ""
    if args.ledger is not None:
        return str(Path(args.ledger))
    return str(root / params["ledger"]) if params.get("ledger") else ""


def check_sweep_params(params: dict) -> None:
    """One-line errors for values no job could run with (methods, sparsities, seeds)."""
    import math

    from ellava_lib.run.jobs import ALL_METHODS

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
    from ellava_lib.run.jobs import ablation_jobs, jobs_grid

    jobs = []
    if what in ("main", "all"):
        jobs += jobs_grid(params["table_methods"], params["sparsities"], params["seeds"], params["calib_n"])
    if what in ("ablations", "all"):
        jobs += ablation_jobs(spec, params["sparsity"], params["seeds"][0], params["calib_n"], params["gaps"],
                              params["calib_ns"])
    unique: dict = {}
    for job in jobs:
        unique.setdefault(job.name(), job)
    return list(unique.values())


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run notebook 05's and / or 06's sweep jobs into ``--out``/sweep (the run folder the notebooks share)."""
    from ellava_lib.run import backends, pipeline

    if args.out is None and not args.status:
        raise CLIError("--out is required (the run folder), unless --status")
    if args.readme and not args.status:
        raise CLIError("--readme goes with --status")
    params = sweep_params(args)
    check_sweep_params(params)
    if args.address is not None and args.backend != "ray":
        raise CLIError("--address needs --backend ray")
    if args.backend == "ray":
        backends.import_ray()  # not installed: a one-line error before any work
    pipeline.preflight(params)  # tier keys and device, search preset and overrides
    if args.status:
        return _status(args, params)
    ray = None
    if args.backend == "ray" and backends.connect_ray(args.address, params["workers"]):  # before any work
        ray = backends.import_ray()
    try:
        return _sweep(args, params)
    finally:
        if ray is not None:
            ray.shutdown()


def sweep_spec(params: dict, model_info: dict):
    """The :class:`SweepSpec` of the profile's ``params`` for the model of ``model_info`` (``model.json``)."""
    from ellava_lib.run.jobs import SweepSpec

    return SweepSpec(model_info["model_dir"], params["sweep_eval_limit"] or None,
                     search_preset=params["search_preset"], search=params.get("search") or {},
                     ellava=params.get("ellava") or {}, tier=model_info.get("tier", {}))


def _model_info(params: dict) -> dict:
    """What notebook 01 writes to ``model.json`` (the model is built, or found in the cache)."""
    from ellava_lib.run.tier import Tier, check_device, model_record

    tier = Tier.from_dict(params.get("tier"))
    check_device(tier)
    return model_record(tier, params["train_preset"])


def _status(args: argparse.Namespace, params: dict) -> int:
    """``--status``: the profile's progress from its results ledger alone (:mod:`progress`); nothing runs and
    ``--out`` is not written. ``--readme`` splices it into the README block ``{readme_prefix}progress``."""
    from ellava_lib.run import pipeline, progress, report

    if not params["ledger"]:
        raise CLIError("--status reads the results ledger: this profile has none (give --ledger DIR)")
    spec = sweep_spec(params, _model_info(params))
    job_list = sweep_jobs(spec, params, args.what)
    main = sweep_jobs(spec, params, "main")
    state = progress.ledger_progress(spec, job_list, params["ledger"], params["job_threads"], main)
    root = pipeline.project_root(args.root)
    ledger_name = Path(params["ledger"]).resolve()
    name = str(ledger_name.relative_to(root)) if ledger_name.is_relative_to(root) else str(ledger_name)
    text = progress.markdown(state, params["table_methods"], name)
    print(text, end="")
    if args.readme:
        marker = f"{params.get('readme_prefix', '')}progress"
        changed = report.update_doc(root, marker, text)
        print(f"the {marker} block {'updated' if changed else 'was up to date'}")
    return 0


def _sweep(args: argparse.Namespace, params: dict) -> int:
    """``cmd_sweep`` once its input is checked: the model record, the spec, the jobs, the sweep."""
    from ellava_lib.run import backends, runs, sweep

    run = runs.Run(Path(args.out))  # created (and checked writable) here
    if run.path("model.json").is_file():
        model_info = run.read_json("model.json")
    else:  # what notebook 01 writes (the tiny model is built, or found in the cache)
        model_info = _model_info(params)
        run.write_json("model.json", model_info)
    spec = sweep_spec(params, model_info)
    jobs = sweep_jobs(spec, params, args.what)
    try:
        frame = sweep.run_sweep(spec, jobs, run.path("sweep"), workers=params["workers"],
                                threads=params["job_threads"], progress=not args.quiet, backend=args.backend,
                                address=args.address, retries=args.retries, ledger_dir=params["ledger"] or None)
    except backends.SweepFailed as e:
        for failure in e.failures:
            print(f"ellava: failed: {failure.line()}", file=sys.stderr)
        print(f"ellava: {len(e.failures)} of the sweep's tasks failed; {len(e.frame)} of {len(jobs)} rows in "
              f"{run.path('sweep/results.csv')}, details in {e.path}", file=sys.stderr)
        return 1
    print(f"{len(frame)} rows in {run.path('sweep/results.csv')}")
    return 0


def add_parsers(sub) -> None:
    """Register ``sweep`` on the subparsers ``sub``."""
    w = sub.add_parser("sweep", help="run the main table's and / or the ablations' sweep jobs of a profile "
                                     "(notebooks 05 / 06), locally or on a Ray cluster")
    w.add_argument("--profile", required=True, help="profiles/NAME.yaml: the values notebooks 01, 05 and 06 get")
    w.add_argument("--out", default=None,
                   help="the run folder (model.json, sweep/), shared with the notebooks; with --backend ray on "
                        "storage every node sees (needed unless --status)")
    w.add_argument("--status", action="store_true",
                   help="run nothing: how many of the jobs have a row in the results ledger under their current "
                        "digest, their compute hours and machines, and the main table of the finished rows")
    w.add_argument("--readme", action="store_true",
                   help="with --status: splice it into the README block <readme_prefix>progress")
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
    w.add_argument("--retries", type=non_negative_int, default=0, metavar="N",
                   help="re-run a failed job up to N times")
    w.add_argument("--workers", type=positive_int, default=None,
                   help="parallel jobs (default: the profile's workers); a local Ray gets this many CPUs")
    w.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads of every job, on any backend (default: the profile's job_threads, "
                        "else 1); part of a ledger row's digest")
    w.add_argument("--ledger", default=None, metavar="DIR",
                   help="results ledger folder: its rows are not re-run, finished rows are written there "
                        "(default: the profile's ledger, e.g. results/smol)")
    w.add_argument("--no-ledger", action="store_true", help="neither read nor write a results ledger")
    w.add_argument("--root", default=None, help="project folder with notebooks/ and profiles/ "
                                                 "(default: $ELLAVA_ROOT, else this checkout)")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    w.set_defaults(func=cmd_sweep)
