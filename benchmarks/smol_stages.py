"""What each stage of the smol profile measured on this machine, read from the artifacts its runs left: the
reference ``ellava plan --profile smol --gpu cpu-2core`` is calibrated against (``tests/test_smolplan_calibration.py``
checks every stage's prediction within 2x of these numbers).

Nothing is run here: no forward pass, no timing. Every number is read from a file (ledger rows, a job's
``row.json`` and search checkpoint, level-database metadata, evaluation records, the built model's record) or
computed from such numbers by a formula written next to it in the output. The stages, keyed as
:mod:`ellava_lib.run.smolplan` names them:

* ``build`` - the whole smol build (``ellava.json`` ``train_seconds`` of the model folder): the vision,
  alignment and joint stages, plus loading, encoding the train split and the checkpoints.
* ``02 dense + magnitude eval`` - notebook 02's evaluations (``eval.json`` ``seconds`` of ``dense``,
  ``magnitude-0.50``, ``magnitude-0.70`` at 500 items per suite), their mean (the plan's time per run).
* ``sweep eval (test + calib)`` - a sweep job's test and calibration evaluation (``row.json`` ``eval_s``, 200
  items per suite) of the quiet EfficientLLaVA job.
* ``level databases`` - the sum of the units' ``build_seconds`` metadata of a complete level database.
* ``prune: <method>`` - the median ``row.seconds`` of the method's ledger rows (the rows ran beside other jobs
  on the same cores: the median, with the spread recorded).
* ``prune: ellava`` and ``prune: search`` - the EfficientLLaVA job cut to a few generations, extrapolated to
  the preset's generations with the formula under ``searches`` in the output, plus its exact re-prune.
* ``ECoFLaP importances`` - the median ``seconds`` of the ledger's importance entries (``results/smol/ecoflap/``).
* ``eval.answers`` - the reference answers' lengths (words, about one SmolLM2 token each) of the test split and
  the tokens a batch of 32 generates (its longest answer + end-of-sequence, at most the budget), and the same
  for each evaluation's own predictions (a model that never ends generates the budget).

Usage (the defaults are where the runs of this machine left their files; a missing one is recorded as such;
``--readme README.md`` also splices the predicted-against-measured table into the ``smol-cpu-plan`` block of
docs/tiers.md, :func:`ellava_lib.run.smolplan_calibration.splice_calibration`; ``--splice-only`` splices from the record
already written, reading no artifact; ``--update STAGE`` re-reads only that stage, e.g. ``"ECoFLaP importances"``
from the ledger's importance entries, keeping the others as written)::

    python benchmarks/smol_stages.py --out benchmarks/results/smol_stages_cpu.json --readme README.md
    python benchmarks/smol_stages.py --splice-only --readme README.md
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Baseline methods whose ledger rows time a prune.
PRUNE_METHODS = ("sparsegpt", "wanda", "owl", "llm_pruner", "ecoflap")
#: The suites' generation budgets (evaluate.MAX_NEW_TOKENS, synthetic data) and the evaluation batch.
BUDGET = {"sqa": 4, "vizwiz": 6, "mmvet": 8, "llavabench": 64}
EVAL_BATCH = 32


# ------------------------------------------------------------------------------------------------ reading


def show(path: Path) -> str:
    """``path`` as the record names it: relative to the repository when inside it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when the file is missing."""
    return json.loads(path.read_text()) if path.is_file() else None


def machine() -> dict[str, Any]:
    """CPU model (``/proc/cpuinfo``), cores and the installed torch (package metadata: torch is not imported)."""
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), "")
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = None
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "torch": torch,
            "platform": platform.platform()}


def ledger_rows(ledger: Path) -> list[dict[str, Any]]:
    """Every sweep row of a results ledger (``<ledger>/*.json``; the ``eval/`` folder aside)."""
    return [json.loads(p.read_text()) for p in sorted(ledger.glob("*.json"))]


def spread(values: Sequence[float]) -> dict[str, Any]:
    """``median`` (the measurement), ``min``, ``max``, ``n`` of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# ------------------------------------------------------------------------------------------------ stages


def prune_stages(rows: Iterable[Mapping[str, Any]], ledger: Path) -> dict[str, dict[str, Any]]:
    """``prune: <method>``: the median ``row.seconds`` over the method's ledger rows (all sparsities and seeds)."""
    by_method: dict[str, list[float]] = defaultdict(list)
    machines: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        row = r["row"]
        if row["method"] in PRUNE_METHODS:
            by_method[row["method"]].append(float(row["seconds"]))
            machines[row["method"]].add(json.dumps(r.get("machine", {}), sort_keys=True))
    out = {}
    for method in PRUNE_METHODS:
        secs = by_method.get(method)
        if not secs:
            out[f"prune: {method}"] = {"seconds": None, "source": f"no {method} row in {show(ledger)}"}
            continue
        out[f"prune: {method}"] = {
            "seconds": statistics.median(secs), **{f"rows_{k}": v for k, v in spread(secs).items()},
            "source": f"{show(ledger)}/{method}-*.json row.seconds (policy + prune on the statistic rows), median of "
                      f"{len(secs)} rows, run beside other jobs on the same cores",
            "machines": [json.loads(m) for m in sorted(machines[method])]}
    return out


def importance_stage(ledger: Path) -> dict[str, Any]:
    """``ECoFLaP importances``: the median ``seconds`` of the ledger's importance entries
    (``<ledger>/ecoflap/s<seed>-n<n>.json``, one per calibration draw), with where each came from."""
    entries = [json.loads(p.read_text()) for p in sorted((ledger / "ecoflap").glob("*.json"))]
    timed = [e for e in entries if isinstance(e.get("seconds"), (int, float))]
    if not timed:
        return {"seconds": None, "source": f"no timed ECoFLaP importance entry in {show(ledger)}/ecoflap/"}
    secs = [float(e["seconds"]) for e in timed]
    return {"seconds": statistics.median(secs), **{f"entries_{k}": v for k, v in spread(secs).items()},
            "source": f"{show(ledger)}/ecoflap/*.json seconds (the zeroth-order importances of one calibration draw, "
                      f"model loading included), median of {len(secs)} entries",
            "entries": [{"key": e["key"], "seconds": e["seconds"], "commit": e.get("commit"),
                         "machine": e.get("machine")} for e in timed]}


def build_stage(model_dir: Path) -> dict[str, Any]:
    """``build``: ``train_seconds`` of the built model's ``ellava.json``."""
    record = read_json(model_dir / "ellava.json")
    if record is None or "train_seconds" not in record:
        return {"seconds": None, "source": f"no train_seconds in {model_dir / 'ellava.json'}"}
    tc = record.get("train_config", {})
    return {"seconds": float(record["train_seconds"]), "source": f"{model_dir / 'ellava.json'} train_seconds",
            "covers": "the whole build: loading, encoding the train split, vision, align and joint stages, "
                      "checkpoints",
            "steps": {k: tc.get(k) for k in ("vision_steps", "align_steps", "joint_steps")},
            "batch_size": tc.get("batch_size"), "precision": tc.get("precision"), "threads": tc.get("threads")}


def dense_eval_stage(eval_root: Path, names: Sequence[str]) -> dict[str, Any]:
    """``02 dense + magnitude eval``: the mean of the named evaluations' ``eval.json`` ``seconds``."""
    runs = {n: read_json(eval_root / n / "eval.json") for n in names}
    found = {n: float(r["seconds"]) for n, r in runs.items() if r is not None}
    if not found:
        return {"seconds": None, "source": f"no eval.json under {eval_root}"}
    limits = {n: r["config"].get("limit") for n, r in runs.items() if r is not None}
    return {"seconds": statistics.mean(found.values()), "runs": found, "items_per_suite": limits,
            "source": f"{eval_root}/<run>/eval.json seconds, mean over the runs (the plan's time per run)"}


def sweep_eval_stage(job_dir: Path, others: Path | None) -> dict[str, Any]:
    """``sweep eval (test + calib)``: the quiet job's ``eval_s``; the other jobs' test evaluations (``eval.json``)
    are recorded beside it, not used (they shared the cores with other jobs)."""
    row = read_json(job_dir / "row.json")
    test = read_json(job_dir / "test" / "eval.json")
    if row is None or "eval_s" not in row:
        return {"seconds": None, "source": f"no eval_s in {job_dir / 'row.json'}"}
    out: dict[str, Any] = {"seconds": float(row["eval_s"]), "source": f"{job_dir / 'row.json'} eval_s",
                           "test_seconds": None if test is None else float(test["seconds"]),
                           "items_per_suite": None if test is None else test["config"].get("limit")}
    if others is not None and others.is_dir():
        secs = [float(r["seconds"]) for p in sorted(others.glob("*/test/eval.json"))
                if (r := read_json(p)) is not None]
        if secs:
            out["contended_test_seconds"] = {**spread(secs), "source": f"{others}/*/test/eval.json seconds (run "
                                             "beside other jobs: not used)"}
    return out


def leveldb_seconds(db: Path) -> dict[str, Any]:
    """Per-unit ``build_seconds`` of a level database (safetensors metadata), their sum and per-kind means."""
    from safetensors import safe_open

    units: dict[str, float] = {}
    for path in sorted(db.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "build_seconds" in meta:
            units[meta.get("unit", path.stem)] = float(meta["build_seconds"])
    kinds: dict[str, list[float]] = defaultdict(list)
    for unit, secs in units.items():
        kinds[unit.rsplit(".", 1)[-1]].append(secs)
    return {"units": len(units), "sum": sum(units.values()),
            "mean_per_kind": {k: statistics.mean(v) for k, v in sorted(kinds.items())}}


def leveldb_stage(db: Path, partial: Path | None) -> dict[str, Any]:
    """``level databases``: the complete database's summed ``build_seconds``, its levels and rows; a partial one
    (another run, on shared cores) recorded beside it."""
    config = read_json(db / "config.json")
    if config is None:
        return {"seconds": None, "source": f"no level database at {db}"}
    got = leveldb_seconds(db)
    out: dict[str, Any] = {
        "seconds": got["sum"], "source": f"{db}/*.safetensors metadata build_seconds, summed over the units",
        "units": got["units"], "mean_per_kind": got["mean_per_kind"],
        "levels": len([g for g in config["grid"] if g > 0]), "grid": config["grid"],
        "rows": len(config["calibration"]["ids"]), "store_dtype": config.get("store_dtype")}
    if partial is not None and (partial / "config.json").is_file():
        out["partial"] = {**leveldb_seconds(partial), "source": f"{partial} (unfinished, on shared cores: not used)"}
    return out


# ------------------------------------------------------------------------------------------------ searches


def history_phases(path: Path) -> list[dict[str, Any]]:
    """The search's ``history.csv`` as ``(generation, phase, n_samples)`` rows."""
    with path.open() as f:
        return [{"generation": int(r["generation"]), "phase": r["phase"], "rows": int(r["n_samples"])}
                for r in csv.DictReader(f)]


def search_parts(history: Sequence[Mapping[str, Any]], generations: int, every: int) -> dict[str, dict[str, int]]:
    """Rows and evaluations of a search's history by part: ``init``, ``lambda``, ``select`` (once a search),
    ``generation`` (one generation's children: the least of generations 1..G, whose screen and full phases hold
    only children), ``elites`` (one re-scoring of the elites after a projector round: the rows above
    ``G x generation``, over the ``(G - 1) // every`` re-scorings)."""
    rows: Counter = Counter()
    evals: Counter = Counter()
    per_gen: Counter = Counter()
    per_gen_evals: Counter = Counter()
    for h in history:
        if h["phase"] in ("screen", "full"):
            per_gen[h["generation"]] += h["rows"]
            per_gen_evals[h["generation"]] += 1
        else:
            rows[h["phase"]] += h["rows"]
            evals[h["phase"]] += 1
    gens = range(1, generations + 1)
    gen_rows = min(per_gen[g] for g in gens)
    gen_evals = min(per_gen_evals[g] for g in gens)
    rescores = max(generations - 1, 0) // every if every else 0
    extra_rows = sum(per_gen[g] for g in gens) - generations * gen_rows
    extra_evals = sum(per_gen_evals[g] for g in gens) - generations * gen_evals
    parts = {p: {"rows": rows[p], "evaluations": evals[p]} for p in ("init", "lambda", "select")}
    parts["generation"] = {"rows": gen_rows, "evaluations": gen_evals}
    parts["elites"] = {"rows": extra_rows // rescores if rescores else 0,
                       "evaluations": extra_evals // rescores if rescores else 0}
    return parts


def extrapolate(parts: Mapping[str, Mapping[str, int]], cost: Mapping[str, float], generations: int, every: int,
                gap: bool, projector: bool) -> float:
    """``T(G) = c_row R(G) + c_eval E(G) + dense + other + rounds(G) t_round`` (the formula in the output)."""
    rescores = max(generations - 1, 0) // every if (every and projector) else 0
    rounds = generations // every if (every and projector) else 0
    once = ["init", "select"] + (["lambda"] if gap else [])
    n = {k: sum(parts[p][k] for p in once) + generations * parts["generation"][k] + rescores * parts["elites"][k]
         for k in ("rows", "evaluations")}
    return (cost["row"] * n["rows"] + cost["evaluation"] * n["evaluations"] + cost["dense"] + cost["other"]
            + rounds * cost["round"])


def search_stages(job_dir: Path, preset_generations: int) -> dict[str, Any]:
    """``prune: ellava`` / ``prune: search`` from the measured EfficientLLaVA job (module docstring), and the
    record of the extrapolation."""
    row = read_json(job_dir / "row.json")
    ckpt = read_json(job_dir / "search" / "checkpoint.json")
    cfg = read_json(job_dir / "search" / "search_config.json")
    if row is None or ckpt is None or cfg is None or "timing" not in ckpt:
        return {"prune: ellava": {"seconds": None, "source": f"no measured search under {job_dir}"},
                "prune: search": {"seconds": None, "source": f"no measured search under {job_dir}"}}
    t = ckpt["timing"]
    g_m, every = int(ckpt["generation"]), int(cfg["projector_every"])
    history = history_phases(job_dir / "search" / "history.csv")
    parts = search_parts(history, g_m, every)
    rounds = sorted((job_dir / "search" / "projector_rounds").glob("round-*.json"))
    steps_run = [json.loads(p.read_text()).get("steps_run") for p in rounds]
    total_rows = sum(h["rows"] for h in history)
    cost = {"row": t["evaluate"] / total_rows, "evaluation": t["assemble"] / len(history), "dense": t["dense"],
            "other": row["search_s"] - (t["evaluate"] + t["assemble"] + t["dense"] + t["projector"]),
            "round": t["projector"] / len(rounds) if rounds else 0.0}
    reprune = row["seconds"] - row["search_s"]
    gap = cfg["gap"] != "none"
    ellava = extrapolate(parts, cost, preset_generations, every, gap, True)
    nogap = extrapolate(parts, cost, preset_generations, every, False, False)
    per_gen = cost["row"] * parts["generation"]["rows"] + cost["evaluation"] * parts["generation"]["evaluations"]
    record = {
        "job": str(job_dir), "measured_generations": g_m, "preset_generations": preset_generations,
        "projector_every": every, "gap": cfg["gap"], "init": cfg["init"], "population": cfg["population"],
        "offspring": cfg["offspring"], "search_s": row["search_s"], "row_seconds": row["seconds"],
        "timing": t, "history_rows": total_rows, "history_evaluations": len(history), "parts": parts,
        "cost": cost, "per_generation_seconds": per_gen, "projector_steps_run": steps_run,
        "projector_steps_max": cfg["projector_steps"], "reprune_seconds": reprune,
        "reproduces_measured_search_s": extrapolate(parts, cost, g_m, every, gap, True),
        "formula": (
            "T(G) = c_row * R(G) + c_eval * E(G) + dense + other + rounds(G) * t_round, with c_row = "
            "timing.evaluate / history rows (seconds per scored row), c_eval = timing.assemble / history "
            "evaluations (an assembly per evaluation), t_round = timing.projector / projector rounds run, other = "
            "search_s - (evaluate + assemble + dense + projector); R(G) (E(G) alike) = init + select (+ lambda "
            "with a gap term) + G * generation + rescores(G) * elites, rescores(G) = (G - 1) // every and "
            "rounds(G) = G // every with projector rounds, 0 without. prune: ellava = T(G) + reprune, prune: "
            "search (no gap term, no projector rounds, the same scoring rows) = T_nogap(G) + reprune, reprune = "
            "row.seconds - row.search_s. T(measured G) reproduces search_s.")}
    src = f"{job_dir} (row.json, search/checkpoint.json timing, search/history.csv), extrapolated to " \
          f"{preset_generations} generations (searches.formula)"
    return {"prune: ellava": {"seconds": ellava + reprune, "search_seconds": ellava, "source": src},
            "prune: search": {"seconds": nogap + reprune, "search_seconds": nogap, "source": src},
            "_search": record}


# ------------------------------------------------------------------------------------------------ answers


def batch_generated(items: Sequence[Mapping[str, Any]], key: str, budget: int, batch: int = EVAL_BATCH) -> float:
    """Mean over batches (items in prompt-length order, ``evaluate.generate_answers``: the question's length
    orders the prompts of a suite) of ``min(longest words of key + 1, budget)``: the tokens a batch generates
    until its every row has ended."""
    order = sorted(range(len(items)), key=lambda i: len(str(items[i]["question"])))
    words = [len(str(items[i][key]).split()) for i in order]
    return statistics.mean(min(max(words[k:k + batch]) + 1, budget) for k in range(0, len(words), batch))


def answer_record(predictions: Path) -> dict[str, Any]:
    """Per suite: items, mean reference-answer words, tokens a batch generates for the reference answers and for
    the evaluation's own predictions (:func:`batch_generated`)."""
    by_suite: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in predictions.read_text().splitlines():
        item = json.loads(line)
        by_suite[item["suite"]].append(item)
    return {s: {"items": len(items),
                "answer_words": statistics.mean(len(str(i["answer"]).split()) for i in items),
                "generated_answers": batch_generated(items, "answer", BUDGET[s]),
                "generated_predictions": batch_generated(items, "prediction", BUDGET[s]), "budget": BUDGET[s]}
            for s, items in sorted(by_suite.items())}


def answers(eval_root: Path, names: Sequence[str], job_dir: Path) -> dict[str, Any]:
    """:func:`answer_record` of 02's evaluations and of the measured job's test evaluation; ``answer_words_mean``:
    the suites' mean answer words, averaged over the suites (the dense evaluation's full test split)."""
    runs = {n: eval_root / n / "predictions.jsonl" for n in names}
    runs["job"] = job_dir / "test" / "predictions.jsonl"
    out: dict[str, Any] = {"source": {n: str(p) for n, p in runs.items()},
                           "method": "words of an answer as its SmolLM2 tokens; a batch of 32 (prompt-length order) "
                                     "generates its longest answer + end-of-sequence, at most the budget"}
    for name, path in runs.items():
        if path.is_file():
            out[name] = answer_record(path)
    ref = out.get(names[0]) if names else None
    if ref:
        out["answer_words_mean"] = statistics.mean(v["answer_words"] for v in ref.values())
        out["generated_answers"] = {s: v["generated_answers"] for s, v in ref.items()}
    return out


# ------------------------------------------------------------------------------------------------ main


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """The whole record (module docstring)."""
    from ellava_lib.search.config import SearchConfig

    ledger = Path(args.ledger)
    rows = ledger_rows(ledger)
    stages: dict[str, Any] = {"build": build_stage(Path(args.model_dir)),
                              "02 dense + magnitude eval": dense_eval_stage(Path(args.evals), args.eval_runs),
                              "level databases": leveldb_stage(Path(args.leveldb),
                                                               Path(args.partial_leveldb) if args.partial_leveldb
                                                               else None),
                              "ECoFLaP importances": importance_stage(ledger)}
    searched = search_stages(Path(args.job), SearchConfig.from_preset(args.search_preset).generations)
    record = searched.pop("_search", None)
    stages.update(searched)
    stages.update(prune_stages(rows, ledger))
    stages["sweep eval (test + calib)"] = sweep_eval_stage(Path(args.job), Path(args.sweep_jobs)
                                                           if args.sweep_jobs else None)
    profile = Path(args.profile)
    return {"what": "measured seconds per stage of the smol profile on this machine (benchmarks/smol_stages.py)",
            "machine": machine(), "ledger_machine": rows[0].get("machine") if rows else None,
            "profile_of_measured_search": {"path": str(profile),
                                           "text": profile.read_text() if profile.is_file() else None},
            "stages": stages, "searches": record,
            "eval": {"answers": answers(Path(args.evals), args.eval_runs, Path(args.job))}}


#: Stages ``--update`` can re-read on their own (the ledger's): name -> reader of the parsed arguments.
UPDATABLE = {"ECoFLaP importances": lambda args: importance_stage(Path(args.ledger))}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ledger", default=str(ROOT / "results" / "smol"), help="results ledger of the smol sweep")
    ap.add_argument("--job", default="/tmp/smolm/sweep/jobs/ellava-0.60-s0-n64",
                    help="the measured EfficientLLaVA job folder (cut to a few generations)")
    ap.add_argument("--profile", default="/tmp/troot2/profiles/smolm.yaml", help="that job's profile")
    ap.add_argument("--leveldb", default="/tmp/smolm/sweep/leveldb/s0-n64", help="a complete level database")
    ap.add_argument("--partial-leveldb", default="/work/smolrun/runs/smol/sweep/leveldb/s0-n64",
                    help="an unfinished level database (recorded, not used)")
    ap.add_argument("--model-dir", default=str(Path.home() / ".cache/ellava/models/smol-1c19556b27"),
                    help="the built smol model (ellava.json)")
    ap.add_argument("--evals", default="/work/smolrun/runs/smol/eval", help="notebook 02's evaluation folders")
    ap.add_argument("--eval-runs", nargs="+", default=["dense", "magnitude-0.50", "magnitude-0.70"],
                    help="02's evaluations (the first: the dense model, whose answers are the reference)")
    ap.add_argument("--sweep-jobs", default="/work/smolrun/runs/smol/sweep/jobs",
                    help="other sweep jobs' folders (their evaluations recorded, not used)")
    ap.add_argument("--search-preset", default="smol", help="the search preset whose generations are extrapolated to")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "smol_stages_cpu.json"))
    ap.add_argument("--readme", default=None, help="splice the calibration table into the smol-cpu-plan block of "
                                                   "this README or of the docs/*.md page beside it that holds it")
    ap.add_argument("--splice-only", action="store_true", help="read no artifact: splice from --out as written")
    ap.add_argument("--update", nargs="+", choices=sorted(UPDATABLE), metavar="STAGE",
                    help="re-read only these stages' artifacts and keep the rest of --out as written (the other "
                         f"stages' artifacts may be gone from this machine): {', '.join(sorted(UPDATABLE))}")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.splice_only:
        record = json.loads(out.read_text())
    elif args.update:
        record = json.loads(out.read_text())
        for name in args.update:
            record["stages"][name] = UPDATABLE[name](args)
        record.setdefault("updated", []).append({"stages": list(args.update), "machine": machine()})
        out.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
        print(f"updated {', '.join(args.update)} in {out}")
    else:
        record = collect(args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
        print(f"wrote {out}")
    for name, stage in record["stages"].items():
        secs = stage.get("seconds")
        print(f"{name:28s} {'-' if secs is None else f'{secs:9.1f} s'}")
    if args.readme:
        from ellava_lib.run.smolplan_calibration import splice_calibration

        changed = splice_calibration(args.readme, record)
        print(f"{'spliced' if changed else 'unchanged'}: the smol-cpu-plan block beside {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
