"""Does the finer grid pay? The search without the gap term on the 0.1 grid against the same search with the
0.05 levels around its target (``SearchConfig.fine_step``), paired over seeds, on a finished pipeline run.

The fine-grid rows are the ``search`` rows of the run's main table (``RUN/sweep/jobs/<job>/row.json``, written by
notebook 05 under the profile's spec); this script runs the same jobs with ``fine_step = 0`` into
``RUN/grid_ablation/`` (resumable: finished jobs are kept) and reports, per sparsity, both means over seeds and
the paired difference ``d_i = fine_i - coarse_i``, ``mean(d) ± sd(d) / sqrt(k)``, for the test score and for the
selection-row score ``calib`` (what the search itself can see). Selection never looks at the test split: the test
score is only reported.

Usage (after ``make reproduce``; about 5 minutes on 2 cores)::

    python benchmarks/search_grid.py --run runs/default --out benchmarks/results/search_grid.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ellava_lib.core import files
from ellava_lib.run import pipeline, report, sweep, tables
from ellava_lib.run.jobs import Job, SweepSpec, spec_digest


def paired(fine: pd.Series, coarse: pd.Series) -> dict[str, float]:
    """``mean(d)`` and ``sd(d) / sqrt(k)`` of ``d = fine - coarse`` over the seeds (the index) both have:
    :func:`tables.paired_margins` on the two as methods of one sparsity."""
    frame = pd.concat([pd.DataFrame({"method": name, "sparsity": 1.0, "seed": x.index, "v": x.values})
                       for name, x in (("fine", fine), ("coarse", coarse))])
    m = tables.paired_margins(frame, "fine", ("coarse",), column="v").iloc[0]
    return {"k": int(m["k"]), "fine": float(m["ours"]), "coarse": float(m["baseline_score"]),
            "diff": float(m["mean_diff"]), "se": float(m["se"])}


def markdown(rows: list[dict]) -> str:
    """The comparison as a Markdown table (test and selection-row scores, paired differences fine - coarse)."""
    lines = ["| sparsity | test, 0.05 levels | test, 0.1 grid | diff ± se | calib, 0.05 levels | calib, 0.1 grid "
             "| diff ± se |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        t, c = r["test"], r["calib"]
        lines.append(f"| {r['sparsity']:.0%} | {t['fine']:.1f} | {t['coarse']:.1f} | {t['diff']:+.2f} ± {t['se']:.2f} "
                     f"| {c['fine']:.1f} | {c['coarse']:.1f} | {c['diff']:+.2f} ± {c['se']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/default", help="a finished pipeline run folder (notebooks 01-05)")
    ap.add_argument("--profile", default="default", help="the profile that run used (evaluation size, seeds)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/search_grid.json")
    ap.add_argument("--readme", default=None, help="splice the table into the grid block of this README or of "
                                                    "the docs/*.md page beside it that holds it")
    args = ap.parse_args(argv)
    run = Path(args.run)
    if not (run / "model.json").is_file():
        print(f"search_grid: {run} is not a pipeline run folder (no model.json)", file=sys.stderr)
        return 2
    params = pipeline.load_profile(args.profile)
    model = json.loads((run / "model.json").read_text())
    jobs = [Job("search", float(s), int(seed), int(params["calib_n"]))
            for s in params["sparsities"] for seed in params["seeds"]]
    common = dict(model_dir=model["model_dir"], eval_limit=params.get("sweep_eval_limit") or None,
                  search_preset=params.get("search_preset", "default"), tier=model.get("tier", {}))
    fine_spec = SweepSpec(**common, search=dict(params.get("search", {})))
    fine = []
    for job in jobs:  # the main table's rows, as notebook 05 left them (same spec digest, or not finished)
        path = run / "sweep" / "jobs" / job.name() / "row.json"
        row = json.loads(path.read_text()) if path.is_file() else {}
        if row.get("spec") != spec_digest(fine_spec, job):
            print(f"search_grid: {path} is missing or from another spec: run notebook 05 first", file=sys.stderr)
            return 2
        fine.append(row)
    fine_rows = pd.DataFrame(fine)
    spec = SweepSpec(**common, search={**params.get("search", {}), "fine_step": 0.0})
    t0 = time.time()
    coarse_rows = sweep.run_sweep(spec, jobs, run / "grid_ablation", workers=args.workers)
    rows = []
    for s in params["sparsities"]:
        f = fine_rows[np.isclose(fine_rows["sparsity"], s)].set_index("seed")
        c = coarse_rows[np.isclose(coarse_rows["sparsity"], s)].set_index("seed")
        rows.append({"sparsity": s, "test": paired(f["mean"], c["mean"]),
                     "calib": paired(f["calib_mean"], c["calib_mean"]),
                     "measured_fine": float(f["measured"].mean()), "measured_coarse": float(c["measured"].mean())})
    out = {"run": str(run), "profile": args.profile, "model_dir": model["model_dir"], "rows": rows,
           "seconds": round(time.time() - t0, 1)}
    files.write_json(Path(args.out), out)
    table = markdown(rows)
    print(table)
    if args.readme:
        report.update_readme(Path(args.readme), "grid", table + f"\n\n*{len(params['seeds'])} seeds, "
                             f"`python benchmarks/search_grid.py --run {run}`.*")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
