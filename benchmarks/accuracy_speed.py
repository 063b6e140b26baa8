"""Accuracy and speed together: the trained smol model dense and pruned (EfficientLLaVA at 50% and 70% by
default), each with its test mean from the results ledger and its end-to-end greedy decode tokens/s measured here.

The paper's "accuracy at a speedup" claim, side by side. What each number is and where it comes from:

- **The model**: the one the profile's sweep prunes (``--profile``, default ``smol``): the profile's parameters as
  ``ellava sweep`` reads them (:func:`ellava_lib.cli.sweep.sweep_params`), its model record (``_model_info``:
  :func:`~ellava_lib.run.tier.model_record`, the shipped weights of ``weights/smol/``) and the sweep's
  :class:`~ellava_lib.run.jobs.SweepSpec` (:func:`~ellava_lib.cli.sweep.sweep_spec`).
- **Rows**: ``dense``, then each ``--method`` (default ``ellava``) at each ``--sparsities`` (default 0.5 0.7), all at
  ``--seed`` (default 0) and the profile's ``calib_n``: the job :class:`~ellava_lib.run.jobs.Job` of the main table.
- **Test mean**: ``row.mean`` of the job's ledger row ``<ledger>/<job key>.json`` (:mod:`ellava_lib.run.ledger`;
  the profile's ``ledger``, e.g. ``results/smol``, or ``--ledger DIR``), read, never recomputed; only a row whose
  ``digest`` is the job's current :func:`~ellava_lib.run.jobs.job_digest` (as ``sweep._finished`` checks) counts.
  A job without one (the run is still going, or its row is stale) is a **pending** row of the table ("no ledger row
  yet: <file>"), so the script runs at any stage of the run.
- **The pruned model**: rebuilt as the sweep's job built the model it evaluated: the dense model and the job's
  calibration draw (``sweep._load``), its statistic rows (:func:`sweep.statistic_draw`), then, under the ledger
  row's ``policy`` and at the sweep's intra-op thread count, the sweep's own reconstruction
  (:func:`sweep.reconstruct`: sequential SparseGPT, for a searched method with the search's final projector when
  it evolved one).
  The final projector is not in the ledger: it stays in the sweep's run folder
  (``<run>/sweep/jobs/<key>/search/projector.safetensors``; ``--run``, default ``runs/<profile>``) and is used
  when that folder's job row (``ledger_row.json``) has the ledger row's digest and policy. Otherwise the model is
  timed with the shipped projector and the table says so: the policy (every unit's sparsity) is the ledger's, the
  surviving weights differ from the evaluated model's (the projector shapes the calibration activations), and decode
  speed of the language model does not depend on the projector. ``measured_sparsity`` is the rebuilt model's
  (:func:`~ellava_lib.prune.prune.measured_mean`), beside the ledger row's ``measured``.
- **Speed**: ``benchmarks/e2e_decode.py``'s machinery, imported (:func:`greedy_ms_per_token`, :func:`paired_runs`,
  :func:`ratio_stats`, ``decode_bytes``): one run = prefill one calibration prompt with its image (untimed), then
  ``--new-tokens`` greedy steps timed; the dense model and the pruned one run alternately (``--warmup`` untimed
  pairs, then ``--repeats`` pairs); per backend (``--backends``, default ``bitmask,auto``: every pruned linear a
  :class:`~ellava_lib.speed.bitmask.BitmaskLinear`, or :func:`~ellava_lib.speed.sparse.sparsify_model`'s per-layer
  choice, through ``latency.apply_backend``) the pruned and dense tokens/s (medians), the measured ratio
  ``median dense ms / median pruned ms`` with the quartiles of the per-pair ratios, the FLOP ratio of one decode
  step of the whole model (:func:`~ellava_lib.speed.flops.flop_ratio`), the weight bytes a decode step reads. The
  dense row's tokens/s per backend = the median of every dense run paired in that backend's rows.
- **Provenance**: each ledger row's commit and machine, this checkout's commit, the machine (CPU, cores, torch,
  threads), the load average at start and end, the command.

Usage (the smol-accuracy-speed block of docs/speed.md; on an otherwise idle machine, a few minutes on 2 cores;
``--run`` names the sweep's run folder when it is not ``runs/smol``)::

    PYTHONPATH=. flock /tmp/ellava-cpu.lock python benchmarks/accuracy_speed.py \\
        --out benchmarks/results/accuracy_speed_smol.json --readme README.md
    python benchmarks/accuracy_speed.py --results benchmarks/results/accuracy_speed_smol.json \\
        --readme README.md  # splice only

Bad input (an unknown method or backend, a sparsity outside (0, 1), a ledger folder that does not exist, a
results file that cannot be read, a README without the block) is one line on stderr and exit status 2, before
anything is written.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from ellava_lib.run.jobs import SweepSpec

FORMAT = 1
MARKER = "smol-accuracy-speed"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = "benchmarks/results/accuracy_speed_smol.json"
BACKENDS = ("dense", "bitmask", "auto")
DEFAULT_BACKENDS = ("bitmask", "auto")


class BadInput(Exception):
    """Bad input: printed as one line, exit status 2, nothing written."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``accuracy_speed: error: ...``) with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"accuracy_speed: error: {message}\n")


@functools.cache
def _e2e():
    """``benchmarks/e2e_decode.py`` as a module (the benchmarks are scripts, not a package; it never imports this
    one)."""
    spec = importlib.util.spec_from_file_location("bench_e2e_decode", Path(__file__).with_name("e2e_decode.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shown(path: Path | str) -> str:
    """``path`` relative to the checkout when inside it, else as given (absolute)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------- setup


class Setup(NamedTuple):
    """What the rows are read and rebuilt from: the sweep's ``spec``, its results ``ledger`` folder, the intra-op
    ``threads`` its jobs ran at (part of a row's digest; the rebuild runs at it), the calibration size ``calib_n``
    of the main table, the sweep's ``run`` folder (where a searched job's final projector stays; None: not
    looked for) and the ``profile`` named."""

    spec: SweepSpec
    ledger: Path
    threads: int
    calib_n: int
    run: Path | None
    profile: str


def profile_setup(profile: str, ledger_dir: Path | None, run: Path | None) -> Setup:
    """The :class:`Setup` of ``profile``'s sweep as ``ellava sweep --profile`` builds it (parameters, ledger, model
    record, spec); ``ledger_dir`` / ``run`` replace the profile's ledger and ``runs/<profile>``. A
    :class:`BadInput` for an unknown profile or a ledger folder that does not exist, before any model is loaded."""
    from ellava_lib.cli.sweep import _model_info, sweep_params, sweep_spec

    ns = argparse.Namespace(root=None, profile=profile, methods=None, sparsities=None, seeds=None, workers=None,
                            threads=None, ledger=None if ledger_dir is None else str(ledger_dir), no_ledger=False)
    try:
        params = sweep_params(ns)
    except (ValueError, OSError) as e:
        raise BadInput(str(e).splitlines()[0]) from None
    if not params["ledger"]:
        raise BadInput(f"profile {profile!r} has no results ledger: give --ledger DIR")
    ledger_path = Path(params["ledger"])
    if not ledger_path.is_dir():
        raise BadInput(f"ledger folder {ledger_path} does not exist")
    spec = sweep_spec(params, _model_info(params))
    return Setup(spec, ledger_path, int(params.get("job_threads") or 1), int(params["calib_n"]),
                 run if run is not None else ROOT / "runs" / profile, profile)


# --------------------------------------------------------------------------------------------- ledger


def ledger_entry(setup: Setup, job) -> tuple[dict | None, str | None]:
    """``(entry, None)`` when the ledger holds the job's row under its current digest, else ``(None, why the row
    is pending)``: no file, a row that cannot be read, or a row of another digest (stale: never mixed in)."""
    from ellava_lib.run import ledger
    from ellava_lib.run.jobs import job_digest

    path = ledger.row_path(setup.ledger, job.name())
    shown = f"`{_shown(path)}`"
    if not path.is_file():
        return None, f"no ledger row yet: {shown}"
    entry, why = ledger.read_entry(path, job.name(), ledger.problem)
    if entry is None:
        return None, f"no ledger row yet: {shown} cannot be read ({why})"
    digest = job_digest(setup.spec, job, setup.threads)
    if entry["digest"] != digest:
        return None, f"no ledger row yet: {shown} is stale (digest {entry['digest']}, the job's is {digest})"
    return entry, None


def searched_projector(setup: Setup, job, entry: dict) -> tuple[Path | None, str, bool]:
    """``(projector file or None, what the rebuilt model's projector is, whether the rebuild is the evaluated
    model)``. A baseline or a search that evolved none: the model's own (exact). A search that evolved one: its
    final projector from the sweep's run folder when that folder's job row has the ledger row's digest and policy;
    else None (the shipped projector, not exact)."""
    from ellava_lib.run import ledger
    from ellava_lib.run.jobs import SEARCH_METHODS
    from ellava_lib.run.sweep import LEDGER_ROW

    name = ((entry.get("policy") or {}).get("meta") or {}).get("projector")
    if job.method not in SEARCH_METHODS or not name:
        return None, "the model's own", True
    if setup.run is not None:
        job_dir = Path(setup.run) / "sweep" / "jobs" / job.name()
        path = job_dir / "search" / name
        local = ledger.load(job_dir / LEDGER_ROW, job.name(), entry["digest"], warn=False)
        if path.is_file() and local is not None and local["policy"] == entry["policy"]:
            return path, f"the search's final projector (`{_shown(path)}`)", True
    where = (f"`{_shown(Path(setup.run) / 'sweep' / 'jobs' / job.name() / 'search' / name)}`"
             if setup.run is not None else "no run folder given")
    return None, f"shipped: the search's final projector is not in the ledger, nor in the run folder ({where})", False


# --------------------------------------------------------------------------------------------- models


def rebuild(setup: Setup, job, entry: dict, projector: Path | None):
    """The pruned model of ``job`` as the sweep built it (module docstring), on the CPU in eval mode, and its
    sparsity report; at the sweep's intra-op threads."""
    from ellava_lib.core.policy import Policy
    from ellava_lib.run import backends, sweep
    from ellava_lib.run.tier import release

    spec, tier = setup.spec, setup.spec.get_tier()
    policy = Policy.from_dict(entry["policy"])
    with backends.intra_op_threads(setup.threads):
        model, _, samples, batch = sweep._load(tier, spec, job.seed, job.calib_n)
        stat_batch = sweep.statistic_draw(spec, job.seed, samples, batch)[1]
        report = sweep.reconstruct(tier, job, model, policy, stat_batch, projector)
    release(model)  # timed on the CPU
    return model.eval(), policy, report


def prompt(processor) -> dict:
    """The timed prompt, as ``e2e_decode`` builds it: calibration sample 0 (seed 0) with its image."""
    from ellava_lib.data import calibration
    from ellava_lib.data.prompts import sample_prompt

    sample = calibration.draw_calibration(1, 0)[0]
    return dict(processor(text=[sample_prompt(sample)], images=[sample.image], return_tensors="pt"))


# ------------------------------------------------------------------------------------------- measuring


def _base_row(job, setup: Setup) -> dict:
    from ellava_lib.run import ledger
    from ellava_lib.run.jobs import LABELS

    label = LABELS[job.method] if job.method == "dense" else f"{LABELS[job.method]} {job.sparsity:.0%}"
    return {"key": job.name(), "method": job.method, "label": label, "sparsity": job.sparsity, "seed": job.seed,
            "calib_n": job.calib_n, "ledger_file": _shown(ledger.row_path(setup.ledger, job.name()))}


def _ledger_fields(entry: dict) -> dict:
    from ellava_lib.run.jobs import SUITE_COLUMNS

    row = entry["row"]
    return {"digest": entry["digest"], "ledger_commit": entry.get("commit"), "ledger_machine": entry.get("machine"),
            "test_mean": row["mean"], "calib_mean": row.get("calib_mean"),
            "suites": {s: row[s] for s in SUITE_COLUMNS if s in row}, "measured_ledger": row["measured"]}


def measure(setup: Setup, methods: list[str], sparsities: list[float], seed: int, backends: list[str],
            new_tokens: int, warmup: int, repeats: int) -> list[dict]:
    """The table's rows (dense first; see the module docstring), timed at torch's current thread count."""
    from ellava_lib.prune.prune import measured_mean
    from ellava_lib.run.jobs import Job
    from ellava_lib.run.tier import load_model
    from ellava_lib.speed import flops

    e2e = _e2e()
    lat = e2e._latency()
    spec = setup.spec
    dense_job = Job("dense", 0.0, seed, setup.calib_n)
    dense_entry, dense_pending = ledger_entry(setup, dense_job)
    dense_row = {**_base_row(dense_job, setup), "status": "measured" if dense_entry else "pending",
                 "pending": dense_pending, **(_ledger_fields(dense_entry) if dense_entry else {}),
                 "measured_sparsity": 0.0, "flop_ratio": 1.0, "projector": "the model's own", "exact": True}
    model, processor = load_model(spec.get_tier(), spec.model_dir)
    model.eval()
    enc = prompt(processor)
    enc["pixel_values"] = enc["pixel_values"].to(next(model.parameters()).dtype)
    n_vis, n_prompt = int(model.config.image_seq_length), int(enc["input_ids"].shape[1])
    dense_bytes = e2e.decode_bytes(model, lat.weight_bytes)
    rows, cache, dense_runs = [], {}, {b: [] for b in backends}
    for method in methods:
        for sparsity in sparsities:
            job = Job(method, float(sparsity), seed, setup.calib_n)
            row = _base_row(job, setup)
            entry, pending = ledger_entry(setup, job)
            if entry is None:
                print(f"  {job.name()}: pending ({pending})", file=sys.stderr, flush=True)
                rows.append({**row, "status": "pending", "pending": pending})
                continue
            projector, projector_text, exact = searched_projector(setup, job, entry)
            t0 = time.time()
            pruned, policy, report = rebuild(setup, job, entry, projector)
            row.update({"status": "measured", "pending": None, **_ledger_fields(entry),
                        "measured_sparsity": measured_mean(report), "projector": projector_text, "exact": exact,
                        "rebuild_s": round(time.time() - t0, 1),
                        "flop_ratio": flops.flop_ratio(model, policy, "decode", "model", n_visual_tokens=n_vis,
                                                       n_text_tokens=n_prompt - n_vis),
                        "speed": {}})
            for backend in backends:
                run_mod, swapped, n_lin = lat.apply_backend(pruned, backend, [1, n_prompt], cache, policy)
                d, p = e2e.paired_runs(lambda: e2e.greedy_ms_per_token(model, enc, new_tokens),
                                       lambda m=run_mod: e2e.greedy_ms_per_token(m, enc, new_tokens), warmup, repeats)
                dense_runs[backend] += d
                pruned_bytes = e2e.decode_bytes(run_mod, lat.weight_bytes)
                dense_ms, pruned_ms = statistics.median(d), statistics.median(p)
                row["speed"][backend] = {
                    "swapped": f"{swapped}/{n_lin}", "dense_ms_per_token": dense_ms, "pruned_ms_per_token": pruned_ms,
                    "dense_tokens_per_s": 1e3 / dense_ms, "pruned_tokens_per_s": 1e3 / pruned_ms,
                    **e2e.ratio_stats(d, p), "dense_bytes": dense_bytes, "bytes_read": pruned_bytes,
                    "bw_limit_ratio": dense_bytes / pruned_bytes, "dense_ms": d, "pruned_ms": p}
                print(f"  {job.name()} {backend}: {row['speed'][backend]['measured_ratio']:.2f}x "
                      f"({swapped}/{n_lin} swapped)", file=sys.stderr, flush=True)
                del run_mod
            del pruned
            rows.append(row)
    alone = not any(dense_runs.values())
    if alone:  # no pruned row yet: the dense model timed alone
        runs = [e2e.greedy_ms_per_token(model, enc, new_tokens) for _ in range(warmup + repeats)][warmup:]
        dense_runs = {b: runs for b in backends}
    dense_row["speed"] = {b: {"dense_ms_per_token": statistics.median(v), "dense_tokens_per_s":
                              1e3 / statistics.median(v), "runs": len(v), "alone": alone,
                              "dense_bytes": dense_bytes, "dense_ms": v}
                          for b, v in dense_runs.items()}
    dense_row["prompt_tokens"] = n_prompt
    return [dense_row, *rows]


def environment(setup: Setup, threads: int, new_tokens: int, warmup: int, repeats: int) -> dict:
    """Where and how the timing ran (e2e_decode's environment fields, the CPU's name, the commit) and what the
    rows were read from."""
    from ellava_lib.run import ledger
    from ellava_lib.speed import bitmask

    info = bitmask.extension_info()
    return {"device": "cpu", "cpu": ledger.cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "machine": platform.machine(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "new_tokens": new_tokens, "warmup": warmup, "repeats": repeats,
            "bitmask_paths": "/".join(info.get("paths") or []) or None, "commit": ledger.commit(),
            "profile": setup.profile, "ledger": _shown(setup.ledger), "job_threads": setup.threads,
            "calib_n": setup.calib_n, "eval_limit": setup.spec.eval_limit,
            "run": None if setup.run is None else _shown(setup.run)}


# ------------------------------------------------------------------------------------------------ table


def _speed_cell(row: dict, backend: str) -> str:
    s = (row.get("speed") or {}).get(backend)
    if s is None:
        return "-"
    if row["method"] == "dense":
        return f"{s['dense_tokens_per_s']:.1f}"
    return (f"{s['pruned_tokens_per_s']:.1f} (dense {s['dense_tokens_per_s']:.1f}; **{s['measured_ratio']:.2f}x** "
            f"[{s['ratio_q1']:.2f}-{s['ratio_q3']:.2f}], {s['swapped']})")


def to_markdown(result: dict) -> str:
    """One row per model: its test mean (ledger) and the change from dense, the sparsity (rebuilt, the ledger's),
    the FLOP ratio of a decode step, and per backend its decode tokens/s with the measured ratio to dense."""
    rows, backends = result["rows"], result["backends"]
    dense = rows[0] if rows and rows[0]["method"] == "dense" else {}
    head = ("| model | test mean (ledger) | vs dense | sparsity: rebuilt (ledger) | FLOP ratio (decode step) | "
            + " | ".join(f"tokens/s `{b}`: pruned (dense; measured ratio [quartiles], swapped)" for b in backends)
            + " |")
    lines = [head, "|" + "---|" * (5 + len(backends))]
    for r in rows:
        if r["status"] == "pending" and r["method"] != "dense":
            lines.append(f"| {r['label']} | *pending: {r['pending']}* |" + " - |" * (3 + len(backends)))
            continue
        mean = f"{r['test_mean']:.1f}" if r.get("test_mean") is not None else f"*pending: {r['pending']}*"
        delta = ("-" if r["method"] == "dense" or dense.get("test_mean") is None
                 else f"{r['test_mean'] - dense['test_mean']:+.1f}")
        sparsity = ("0%" if r["method"] == "dense"
                    else f"{r['measured_sparsity']:.1%} ({r['measured_ledger']:.1%})")
        label = r["label"] + ("" if r.get("exact", True) else " \\*")
        lines.append(f"| {label} | {mean} | {delta} | {sparsity} | {r['flop_ratio']:.2f}x | "
                     + " | ".join(_speed_cell(r, b) for b in backends) + " |")
    return "\n".join(lines) + "\n"


def caption(result: dict, source: str) -> str:
    """Where every number of the table comes from."""
    env, rows = result["env"], result["rows"]
    found = [r for r in rows if r.get("test_mean") is not None]
    commits = ", ".join(f"`{r['key']}` {str(r.get('ledger_commit') or 'no commit')[:7]}" for r in found)
    machines = sorted({f"{m.get('cpu') or m.get('platform')} ({m.get('cpu_count')} CPUs, {m.get('threads')} "
                       f"threads)"
                       for r in found if (m := r.get("ledger_machine"))})
    dense = rows[0] if rows else {}
    n_dense = {b: dense["speed"][b].get("runs") for b in result["backends"] if b in (dense.get("speed") or {})}
    alone = any(s.get("alone") for s in (dense.get("speed") or {}).values())
    text = (f"*Generated by `{result['command']}` at commit {str(env.get('commit') or 'unknown')[:7]}, spliced "
            f"from `{source}` (`python benchmarks/accuracy_speed.py --results {source} --readme README.md`). "
            f"Test mean = `row.mean` of the results ledger's row `{env['ledger']}/<model key>.json` under the job's "
            f"current digest (profile `{env['profile']}`, seed {dense.get('seed', 0)}, {env['calib_n']} calibration "
            f"samples, {env.get('eval_limit') or 'all'} test items per suite, jobs at {env['job_threads']} "
            f"thread(s)), read, not recomputed")
    text += (f"; rows and the commits that made them: {commits}; they ran on {'; '.join(machines)}. "
             if found else "; no ledger row yet. ")
    text += (f"Pruned models rebuilt here as the sweep built the ones it evaluated: the ledger row's policy, "
             f"pruned on the job's statistic rows by sequential SparseGPT (a searched method: after loading the "
             f"search's final projector; a baseline: by its own solver); sparsity = the rebuilt model's measured "
             f"(parameter-weighted) sparsity, the ledger's in brackets. Decode speed on {env['cpu']}, "
             f"{env['cpus']} CPUs, {env['threads']} torch thread(s), torch {env['torch']}: a prompt of "
             f"{dense.get('prompt_tokens')} tokens (calibration sample 0 with its image, untimed) then "
             f"{env['new_tokens']} greedy tokens per run, median of {env['repeats']} runs after {env['warmup']} "
             f"warm-up, dense and pruned runs alternating (`benchmarks/e2e_decode.py`'s paired runs); load average "
             f"{env['loadavg_start']:.1f} -> {env['loadavg_end']:.1f}. Measured ratio = median dense / median "
             f"pruned time per token [quartiles of the per-pair ratios]; the dense row = the median of "
             + (f"{next(iter(n_dense.values()), 0)} runs of the dense model alone (no pruned row yet). "
                if alone else f"every dense run paired in that backend's rows "
                f"({', '.join(f'{b}: {n}' for b, n in n_dense.items())} runs). ")
             + "FLOP ratio = dense / pruned FLOPs of one decode step of the whole model (counted).")
    inexact = [r for r in rows if r["status"] == "measured" and not r.get("exact", True)]
    if inexact:
        text += (f" \\* {', '.join(r['label'] for r in inexact)}: the search's final projector is not recoverable "
                 f"from the ledger (it stays in the sweep's run folder, not found under "
                 f"`{env.get('run')}`): rebuilt and timed with the shipped projector; every unit's sparsity is the "
                 f"policy's, the surviving weights differ from the evaluated model's, decode speed of the language "
                 f"model does not depend on the projector.")
    pending = [r for r in rows if r["status"] == "pending"]
    if pending:
        text += f" Pending: {len(pending)} row(s) without a current ledger row (the run is still going)."
    return text + "*\n"


def splice(readme: Path, result: dict, source: str) -> None:
    """The table and its caption into the ``smol-accuracy-speed`` block (:func:`report.update_readme`: README.md
    or the docs/*.md page holding it, docs/speed.md today)."""
    from ellava_lib.run.report import update_readme

    if result.get("pending"):  # a results file that says why nothing is measured yet, and how to measure it
        update_readme(readme, MARKER, f"*Not measured yet ({source}): {result['pending']} Measure with "
                                      f"`{result['command']}`.*\n")
        return
    update_readme(readme, MARKER, to_markdown(result) + "\n" + caption(result, source))


def load_result(path: Path) -> dict:
    """A results file written by this script, or a pending one (``{"format", "pending": why, "command",
    "rows": []}``: nothing measured yet, spliced as one line saying so); :class:`BadInput` when absent or not
    one."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"cannot read results {path}: {type(e).__name__}") from None
    if not isinstance(result, dict) or result.get("format") != FORMAT or not isinstance(result.get("rows"), list):
        raise BadInput(f"{path} is not a results file of accuracy_speed.py (format {FORMAT})")
    return result


# ------------------------------------------------------------------------------------------------- main


def _check(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The methods and backends asked for; :class:`BadInput` for anything no row could run with."""
    from ellava_lib.run.jobs import ALL_METHODS

    methods = [m for arg in args.method for m in arg.split(",") if m]
    pruned = [m for m in ALL_METHODS if m != "dense"]
    bad = [m for m in methods if m not in pruned] or ([] if methods else ["(none)"])
    if bad:
        raise BadInput(f"unknown method {', '.join(bad)}; choose from {', '.join(pruned)} (dense is always a row)")
    if bad := [s for s in args.sparsities if not 0.0 < s < 1.0]:
        raise BadInput(f"sparsity must lie in (0, 1), got {', '.join(f'{s:g}' for s in bad)}")
    backends = [b for b in args.backends.split(",") if b]
    bad = [b for b in backends if b not in BACKENDS] or ([] if backends else ["(none)"])
    if bad:
        raise BadInput(f"unknown backend {', '.join(bad)}; choose from {', '.join(BACKENDS)}")
    for name, value, low in (("--new-tokens", args.new_tokens, 1), ("--repeats", args.repeats, 1),
                             ("--warmup", args.warmup, 0), ("--threads", args.threads, 1)):
        if value < low:
            raise BadInput(f"{name} must be >= {low}, got {value}")
    if args.ledger is not None and not args.ledger.is_dir():
        raise BadInput(f"ledger folder {args.ledger} does not exist")
    if args.readme is not None:
        _check_readme(args.readme)
    return methods, backends


def _check_readme(readme: Path) -> None:
    """The block must exist before anything runs (:func:`report.doc_with`)."""
    from ellava_lib.run.report import doc_with

    try:
        doc_with(readme if readme.is_dir() else readme.parent, MARKER, also=() if readme.is_dir() else (readme,))
    except (ValueError, OSError) as e:
        raise BadInput(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(prog="accuracy_speed", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="smol", help="the profile whose sweep, model and ledger are read")
    ap.add_argument("--ledger", type=Path, help="the results ledger folder (default: the profile's)")
    ap.add_argument("--run", type=Path, help="the sweep's run folder, where a searched job's final projector "
                                             "stays (default: runs/<profile>)")
    ap.add_argument("--method", nargs="+", default=["ellava"], help="pruned methods of the rows (default ellava)")
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7], help="default 0.5 0.7")
    ap.add_argument("--seed", type=int, default=0, help="the jobs' seed (default 0)")
    ap.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                    help=f"comma list of {', '.join(BACKENDS)} (default {','.join(DEFAULT_BACKENDS)})")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens timed per run")
    ap.add_argument("--repeats", type=int, default=7, help="timed run pairs")
    ap.add_argument("--warmup", type=int, default=1, help="untimed run pairs")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads of the timing")
    ap.add_argument("--out", type=Path, help=f"JSON file of the rows (e.g. {DEFAULT_OUT})")
    ap.add_argument("--results", type=Path, help="splice this existing JSON file into --readme; time nothing")
    ap.add_argument("--readme", type=Path, help="splice the table into the smol-accuracy-speed block of this "
                                                "README or of the docs/*.md page beside it that holds it")
    args = ap.parse_args(argv)
    try:
        if args.results is not None:
            if args.readme is None:
                raise BadInput("--results needs --readme")
            result = load_result(args.results)
            _check_readme(args.readme)
            splice(args.readme, result, _shown(args.results))
            print(result["pending"] if result.get("pending") else to_markdown(result))
            return 0
        if args.out is None:
            raise BadInput("--out is required (or --results FILE --readme README.md)")
        methods, backends = _check(args)
        from ellava_lib.speed import bitmask

        if "bitmask" in backends and bitmask.extension() is None:
            backends.remove("bitmask")
            print("accuracy_speed: the bitmask extension is not built here: backend bitmask left out",
                  file=sys.stderr)
            if not backends:
                raise BadInput("no backend left to time (the bitmask extension is not built here)")
        setup = profile_setup(args.profile, args.ledger, args.run)
    except BadInput as e:
        print(f"accuracy_speed: error: {e}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "benchmarks/accuracy_speed.py",
                          *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    load_start, t0 = os.getloadavg()[0], time.time()
    rows = measure(setup, methods, args.sparsities, args.seed, backends, args.new_tokens, args.warmup, args.repeats)
    env = {**environment(setup, torch.get_num_threads(), args.new_tokens, args.warmup, args.repeats),
           "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0], "seconds": round(time.time() - t0, 1)}
    result = {"format": FORMAT, "command": command, "backends": backends, "env": env, "rows": rows}
    from ellava_lib.core import files

    files.write_json(args.out, result)
    if args.readme is not None:
        splice(args.readme, result, _shown(args.out))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
