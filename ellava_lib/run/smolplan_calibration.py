"""The smol plan against what the smol profile measured on the 2-core machine: the prediction of every stage
``benchmarks/smol_stages.py``'s record holds, in the configuration it was measured in, and the calibration table
of ``docs/tiers.md`` (the ``smol-cpu-plan`` block). The plan itself: :mod:`smolplan`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ellava_lib.run import plan
from ellava_lib.run.smolplan import (
    CALIBRATION_DEVICE,
    CALIBRATION_MARKER,
    PRESET,
    _fmt,
    build_stages,
    calib_eval_seconds,
    context,
    dense_eval_seconds,
    eval_seconds,
    importance_seconds,
    make_plan,
    prune_seconds,
    sparsegpt_seconds,
    stat_rows,
    total_seconds,
)


def calibration_predictions(measured: dict[str, Any], profile: str = "smol",
                            root: str | Path | None = None) -> dict[str, float]:
    """Predicted seconds on :data:`CALIBRATION_DEVICE` of every stage ``measured`` (the record of
    ``benchmarks/smol_stages.py``) can hold, in the configuration it was measured in: the whole build (its three
    stages); 02's evaluations (:func:`dense_eval_seconds`); a sweep job's evaluation at ``sweep_eval_limit`` and
    its calibration score; the level database of the measured draw (its statistic rows and levels); ECoFLaP's
    importance and each method's prune of a ``calib_n`` draw at ``sparsity``, the searches from the measured
    search's start policies."""
    from ellava_lib.model import train
    from ellava_lib.run.jobs import Job, SweepSpec, full_method_config

    params = plan.profile_params(profile, root)
    ctx, _ = context(params, CALIBRATION_DEVICE)
    search = {**(params.get("search") or {}), "init": list(measured["searches"]["init"])}
    spec = SweepSpec(profile, params.get("sweep_eval_limit") or None,
                     search_preset=params.get("search_preset", "default"), search=search,
                     ellava=dict(params.get("ellava") or {}), tier=dict(params.get("tier") or {}))
    n, sparsity = int(params["calib_n"]), float(params["sparsity"])
    db = measured["stages"]["level databases"]
    select = plan.row_counts(n, full_method_config(spec, sparsity))["selection"]
    build = build_stages(ctx.config, train.preset(PRESET))
    out = {"build": sum(s.steps * s.step_seconds(ctx.train_prof) for s in build),
           "02 dense + magnitude eval": dense_eval_seconds(ctx, params),
           "sweep eval (test + calib)": eval_seconds(ctx, int(params.get("sweep_eval_limit", 0) or 0))
           + calib_eval_seconds(ctx, select),
           "level databases": sparsegpt_seconds(ctx, int(db["rows"]), int(db["levels"])).seconds,
           "ECoFLaP importances": importance_seconds(ctx, stat_rows(spec, n), spec.get_tier().ecoflap_batch)}
    for method in ("sparsegpt", "wanda", "owl", "llm_pruner", "ecoflap", "ellava", "search"):
        out[f"prune: {method}"] = prune_seconds(ctx, spec, Job(method, sparsity, int(params.get("seed", 0)), n))
    return out


def calibration_markdown(measured: dict[str, Any], p: plan.Plan, predicted: dict[str, float]) -> str:
    """The calibration table: per stage the prediction (``predicted``), the measurement (``measured``'s
    ``seconds``, ``-`` for a stage without one) and their ratio; then the whole profile on the plan ``p``: its
    total, and the same with each measured stage's time per run in place of its prediction (the build's three
    stages by the measured build)."""
    lines = ["| stage | predicted | measured | predicted / measured |", "|---|---:|---:|---:|"]
    for name, secs in predicted.items():
        m = measured["stages"].get(name, {}).get("seconds")
        lines.append(f"| {name} | {_fmt(secs)} | {'-' if m is None else _fmt(m)} | "
                     f"{'-' if m is None else f'{secs / m:.2f}'} |")
    total = total_seconds(p)
    by_measure = 0.0
    for s in p.stages:
        key = "build" if s.name.startswith("build: ") else s.name
        m = measured["stages"].get(key, {}).get("seconds")
        if m is None:
            by_measure += s.seconds * s.runs
        elif key != "build" or s.name == "build: joint":  # the measured build once, in place of its three stages
            by_measure += m * (1 if key == "build" else s.runs)
    lines += ["", f"*`ellava plan --profile {p.profile} --gpu {p.device}`: {total / 60:.0f} min for the whole "
              f"profile; with each measured stage's time per run in place of its prediction (the rest predicted) "
              f"{by_measure / 60:.0f} min. Measured: `benchmarks/results/smol_stages_cpu.json` "
              f"({measured['machine']['cpu']}, {measured['machine']['cores']} cores, torch "
              f"{measured['machine']['torch']}{_updated(measured)}), the searches extrapolated from "
              f"{measured['searches']['measured_generations']} to {measured['searches']['preset_generations']} "
              "generations; the level database and the prunes of a 64-row draw at 60%; "
              "`tests/test_smolplan_calibration.py` holds every measured stage within 2x.*"]
    return "\n".join(lines)


def _updated(measured: dict[str, Any]) -> str:
    """The stages a later ``smol_stages.py --update`` measured on another machine, for the caption: ``"; ECoFLaP
    importances on Intel(R) Xeon(R) Processor, 2 cores"`` (nothing when none was)."""
    return "".join(f"; {', '.join(u['stages'])} on {u['machine']['cpu']}, {u['machine']['cores']} cores"
                   for u in measured.get("updated", []))


def splice_calibration(readme: str | Path, measured: dict[str, Any], root: str | Path | None = None) -> bool:
    """Write :func:`calibration_markdown` (the plan on :data:`CALIBRATION_DEVICE`) between the ``smol-cpu-plan``
    markers of the project whose README is ``readme``; whether it changed."""
    from ellava_lib.run.report import update_readme

    p = make_plan("smol", CALIBRATION_DEVICE, root=root)
    body = calibration_markdown(measured, p, calibration_predictions(measured, root=root))
    return update_readme(Path(readme), CALIBRATION_MARKER, body)
