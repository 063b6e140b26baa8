"""A sweep's jobs and what identifies their rows: the methods, :class:`Job` (one cell of a sweep),
:class:`SweepSpec` (what every job of a sweep shares), the searched methods' configurations, and the digests
a finished row is matched by.

Two digests: :func:`spec_digest` stamps a row of a run folder (``runs/<name>/sweep/jobs/<job>/row.json``; it names
the model by its folder), :func:`job_digest` a row of the results ledger (:mod:`ledger`; it names the model by its
recipe, so a row made on one machine matches the same job on a fresh clone elsewhere). Running the jobs is
:mod:`sweep`'s; this module loads no model and runs nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ellava_lib.core.policy import DEFAULT_GRID
from ellava_lib.eval.evaluate import input_format
from ellava_lib.run.tier import Tier

METHODS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt", "owl", "ecoflap", "llm_pruner")
SEARCH_METHODS: tuple[str, ...] = ("search", "ellava")
ALL_METHODS: tuple[str, ...] = ("dense", *METHODS, *SEARCH_METHODS)
#: Display names of the methods in the tables and figures.
LABELS: dict[str, str] = {"dense": "dense", "magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT",
                          "owl": "OWL", "ecoflap": "ECoFLaP", "llm_pruner": "LLM-Pruner (structured)",
                          "search": "search (no gap)",
                          "ellava": "EfficientLLaVA"}
SUITE_COLUMNS: tuple[str, ...] = ("sqa", "vizwiz", "mmvet", "llavabench")
#: Bumped when a method's implementation changes what its rows hold, so sweeps re-run those rows
#: (2: OWL prunes its continuous allocation instead of the grid-rounded one; 3: OWL one ratio per decoder
#: layer, ECoFLaP per block with its reference scores and cap, Wanda floors its per-row counts; llm_pruner 2: KV
#: groups, floor(r K) of them, and the MLP channels that meet the budget).
METHOD_REVISION: dict[str, int] = {"owl": 3, "ecoflap": 2, "wanda": 2, "llm_pruner": 2}


@dataclass(frozen=True)
class Job:
    """One cell of a sweep. ``gap`` / ``projector`` override the searched methods' defaults (ablations).
    A searched policy is re-pruned sequentially with SparseGPT (:func:`finalize.exact_reprune`), as every
    baseline's policy is; ``assembled`` (an ablation) keeps the model assembled from the level database instead."""

    method: str
    sparsity: float
    seed: int = 0
    calib_n: int = 64
    gap: str | None = None
    projector: bool | None = None
    assembled: bool = False

    def __post_init__(self) -> None:
        if self.method not in ALL_METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(ALL_METHODS)}")
        if self.method not in SEARCH_METHODS and (self.gap is not None or self.projector is not None
                                                  or self.assembled):
            raise ValueError(f"gap / projector / assembled apply to the searched methods, not {self.method!r}")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity}")
        if self.calib_n < 2:
            raise ValueError(f"calib_n must be at least 2, got {self.calib_n}")

    def name(self) -> str:
        """Folder name, unique per job: ``ellava-0.60-s0-n64[-gap_capacity][-noproj][-assembled]``."""
        parts = [self.method, f"{self.sparsity:.2f}", f"s{self.seed}", f"n{self.calib_n}"]
        if self.gap is not None:
            parts.append(f"gap_{self.gap}")
        if self.projector is not None:
            parts.append("proj" if self.projector else "noproj")
        if self.assembled:
            parts.append("assembled")
        return "-".join(parts)


def jobs_grid(methods: Sequence[str], sparsities: Sequence[float], seeds: Sequence[int], calib_n: int = 64,
              **knobs: Any) -> list[Job]:
    """Every (method, sparsity, seed); ``dense`` gets one job per seed (sparsity 0)."""
    jobs = []
    for seed in seeds:
        for method in methods:
            if method == "dense":
                jobs.append(Job("dense", 0.0, seed, calib_n))
                continue
            jobs += [Job(method, float(s), seed, calib_n, **knobs) for s in sparsities]
    return jobs


@dataclass
class SweepSpec:
    """What every job of a sweep shares: the model, the evaluation, the searched methods' configuration.

    The searched methods' configuration is ``search_preset`` (:data:`config.PRESETS`; the full method's
    settings, :meth:`config.SearchConfig.from_preset`) with the fields named in ``search`` replaced for both
    searched methods and those named in ``ellava`` for the full method only (override keys as in
    :meth:`config.SearchConfig.to_dict`: ``projector_every``, ...). The ``search`` method then runs without the
    gap term and without projector evolution (``gap="none"``, ``projector_every=0``; its unused projector knobs
    are :class:`config.ProjectorConfig`'s defaults plus those named in ``search``, not the preset's, so its
    configuration does not depend on the preset's projector schedule; except ``projector_rows``, the full
    method's: both searches set the same projector rows aside and score on the same rows, :func:`evolve.score_rows`).
    """

    model_dir: str
    eval_limit: int | None = None
    search_preset: str = "default"
    search: dict[str, Any] = field(default_factory=dict)
    ellava: dict[str, Any] = field(default_factory=dict)
    calib_eval: bool = True
    tier: dict[str, Any] = field(default_factory=dict)  # :class:`tier.Tier` fields ({} = the embedded default)

    def __post_init__(self) -> None:
        from ellava_lib.search.config import PRESETS

        if self.search_preset not in PRESETS:
            raise ValueError(f"unknown search preset {self.search_preset!r}; choose from {', '.join(PRESETS)}")

    def get_tier(self) -> Tier:
        return Tier.from_dict(self.tier)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def full_method_config(spec: SweepSpec, sparsity: float):
    """The full method's :class:`config.SearchConfig` at ``sparsity`` before a job's own overrides (seed 0)."""
    from ellava_lib.search.config import SearchConfig

    return SearchConfig.from_preset(spec.search_preset, **{**spec.search, **spec.ellava, "target": sparsity})


def search_config(spec: SweepSpec, job: Job):
    """The :class:`config.SearchConfig` of a searched job: the spec's preset and overrides for its method
    (:class:`SweepSpec`), then the job's own (sparsity, seed, gap / projector ablation, calibration size)."""
    from ellava_lib.search.config import ProjectorConfig, SearchConfig

    cfg = {**spec.search, "target": job.sparsity, "seed": job.seed}
    if job.method == "ellava":
        cfg.update(spec.ellava)
    else:  # no gap term, no projector rounds; the unused projector knobs at their defaults, whatever the preset
        cfg = {"projector": ProjectorConfig(), **cfg, "gap": "none", "projector_every": 0,
               "projector_rows": full_method_config(spec, job.sparsity).projector.rows}  # the same scoring rows
    if job.gap is not None:
        cfg["gap"] = job.gap
    if job.projector is not None:  # on: the full method's schedule (the default preset's when that is off)
        every = full_method_config(spec, job.sparsity).projector.every or ProjectorConfig().every
        cfg["projector_every"] = every if job.projector else 0
    cfg["extra"] = {"calib_n": job.calib_n, "db_method": "sparsegpt"}
    return SearchConfig.from_preset(spec.search_preset, **cfg)


def select_frac(spec: SweepSpec) -> float:
    """The share of every calibration draw held out as selection rows: the full method's ``select_frac`` (the
    spec's preset with its ``search`` and ``ellava`` overrides; it does not depend on the sparsity)."""
    from ellava_lib.search.config import SearchConfig

    overrides = {**spec.search, **spec.ellava}
    return float(overrides.get("select_frac", getattr(SearchConfig, spec.search_preset)().select_frac))


def draw_split(spec: SweepSpec, seed: int, samples: Sequence[Any]) -> tuple[list[int], list[int]]:
    """``(statistic rows, selection rows)`` of a calibration draw of ``samples`` with ``seed``
    (:func:`evolve.split_rows` with :func:`select_frac`, stratified by suite; what the searches of that seed
    split their rows into). Every statistic of every method (Hessians, the level database, OWL's outlier
    ratios, ECoFLaP's and Wanda's scores, the structured baseline's Taylor scores, the projector's training)
    is computed on the statistic rows only; the selection rows are where the searched methods choose their lambda
    and their returned policy and where every method's ``calib`` score is measured."""
    from ellava_lib.search.evolve import split_rows

    return split_rows(len(samples), select_frac(spec), seed, [s.suite for s in samples])


def calib_rows(spec: SweepSpec, job: Job, samples: Sequence[Any]) -> list[int]:
    """The selection rows of the job's calibration samples (:func:`draw_split`): where every method's ``calib``
    score is measured; no method computes a statistic on them."""
    return draw_split(spec, job.seed, samples)[1]


#: Methods whose pruning reads calibration statistics (all but ``dense`` and ``magnitude``): their rows record
#: that the statistics come from the statistic rows of :func:`draw_split` only (``stat_rows``).
CALIBRATED: tuple[str, ...] = tuple(m for m in (*METHODS, *SEARCH_METHODS) if m != "magnitude")


def level_grid(spec: SweepSpec, jobs: Sequence[Job]) -> tuple[float, ...]:
    """The levels a level database must hold for ``jobs``: the union of their searches' grids
    (:func:`policy.search_grid` around each target); the 0.1 grid when none of them searches."""
    levels = set(DEFAULT_GRID)
    for job in jobs:
        if job.method in SEARCH_METHODS:
            levels |= set(search_config(spec, job).levels)
    return tuple(sorted(levels))


def db_levels(spec: SweepSpec, targets: Sequence[float], seed: int, calib_n: int) -> tuple[float, ...]:
    """The levels the level database of the draw ``(seed, calib_n)`` holds for both searched methods at every
    sparsity of ``targets`` (:func:`level_grid`): what notebook 03 builds, so the sweeps of 04-06 reuse it as is."""
    return level_grid(spec, [Job(m, float(t), seed, calib_n) for m in SEARCH_METHODS for t in sorted(set(targets))])


def needs_importance(spec: SweepSpec, job: Job) -> bool:
    """Whether a job uses ECoFLaP's unit importances: the ECoFLaP baseline, or a search starting from it."""
    return job.method == "ecoflap" or (job.method in SEARCH_METHODS and "ecoflap" in search_config(spec, job).init)


def spec_digest(spec: SweepSpec, job: Job) -> str:
    """12 hex chars over what a job's row depends on besides the job itself (:func:`_row_identity`): the stamp of
    a run folder's rows."""
    return _hash(_row_identity(spec, job))


def _row_identity(spec: SweepSpec, job: Job) -> dict[str, Any]:
    """Model folder, evaluation size, for the searched methods the resolved search configuration and how the
    model is reconstructed (exact re-prune or assembled), the method's :data:`METHOD_REVISION`, the rows the
    ``calib`` score is measured on, the rows statistics come from (:data:`CALIBRATED`), and on real data the
    evaluation inputs (:func:`evaluate.input_format`)."""
    d: dict[str, Any] = {"model_dir": spec.model_dir, "eval_limit": spec.eval_limit, "calib_eval": spec.calib_eval}
    tier = spec.get_tier()
    if tier.identity() != Tier().identity():  # the embedded default keeps the digests it had before tiers existed
        d["tier"] = tier.identity()  # batch sizes, offloading and level-database disk mode aside
    if tier.data == "real":  # real rows depend on the evaluation inputs (LLaVA-1.5's prompt and pad-to-square)
        d["inputs"] = input_format(tier.data)
    if job.method in SEARCH_METHODS:
        d["search"] = search_config(spec, job).identity()  # batch sizes aside (checkpoint.MEMORY_FIELDS)
        d["reconstruction"] = "assembled" if job.assembled else "exact"  # exact: sequential SparseGPT re-prune
    if job.method in METHOD_REVISION:
        d["revision"] = METHOD_REVISION[job.method]
    # every row's ``calib`` is measured on the selection rows (:func:`calib_rows`), no longer on all of them
    d["calib_rows"] = {"split": "selection", "select_frac": select_frac(spec)}
    if job.method in CALIBRATED:  # statistics on the statistic rows only (:func:`draw_split`), not on all rows
        d["stat_rows"] = "search"
    return d


def ablation_jobs(spec: SweepSpec, sparsity: float, seed: int = 0, calib_n: int = 64,
                  gaps: Sequence[str] = ("none", "capacity", "bernstein", "norm"),
                  calib_ns: Sequence[int] = (16, 32, 64, 128), assembled: bool = True) -> list[Job]:
    """The ablations of the full method at one (sparsity, seed): each gap estimator; projector evolution
    off; ``n`` calibration samples with and without the gap term (``ellava`` / ``search``); the model assembled
    from the level database instead of re-pruned. Overrides equal to the method's default are dropped, so these
    jobs share rows (and folders) with the main table's."""
    default_gap = full_method_config(spec, sparsity).gap
    jobs = [Job("ellava", sparsity, seed, calib_n, gap=None if g == default_gap else g) for g in gaps]
    jobs.append(Job("ellava", sparsity, seed, calib_n, projector=False))
    for n in calib_ns:
        jobs += [Job("ellava", sparsity, seed, n), Job("search", sparsity, seed, n)]
    if assembled:
        jobs.append(Job("ellava", sparsity, seed, calib_n, assembled=True))
    unique: dict[str, Job] = {}
    for j in jobs:
        unique.setdefault(j.name(), j)
    return list(unique.values())


def model_identity(model_dir: str | Path) -> dict[str, Any]:
    """What names the model of a ledger row, wherever it lives: a model the kit built (its ``ellava.json``) by
    its recipe, ``{"kind", "digest"}`` (:meth:`train_config.TrainConfig.digest`: the shipped weights of a recipe are
    SHA-256-checked against it); a hub name as given; any other folder by its resolved path."""
    record = Path(model_dir) / "ellava.json"
    if record.is_file():
        meta = json.loads(record.read_text())
        if meta.get("digest"):
            return {"kind": meta.get("kind"), "digest": meta["digest"]}
    if not Path(model_dir).exists():
        return {"name": str(model_dir)}
    return {"path": str(Path(model_dir).resolve())}


def job_digest(spec: SweepSpec, job: Job, threads: int) -> str:
    """12 hex chars over everything a ledger row depends on: the job itself (method, sparsity, seed, calibration
    size, ablation knobs), what :func:`spec_digest` covers with the model named by its recipe
    (:func:`model_identity`) instead of its folder and the tier's identity always, and ``threads``, the intra-op
    thread count the job ran with (a floating-point reduction order: fitness values move by up to 1e-3 relative
    between thread counts)."""
    d = _row_identity(spec, job)
    del d["model_dir"]
    d.update({"model": model_identity(spec.model_dir), "tier": spec.get_tier().identity(), "job": asdict(job),
              "threads": int(threads)})
    return _hash(d)


def _hash(d: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
