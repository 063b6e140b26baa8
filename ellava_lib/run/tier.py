"""The tier a run works on: where its model, data and judge come from, behind one interface.

The embedded default (``Tier()``) is the kit's tiny model on the synthetic suite with the local judge, on the
CPU. The paper setting is a hub LLaVA (``llava-1.5-7b`` in fp16), the real benchmarks through
``ellava_lib/data/manifests/`` (calibration drawn from a *training* split, scores on the evaluation split) and the GPT
judges, on one GPU. The notebooks (notebook 01 records the tier in ``model.json``), the sweep
(:class:`~ellava_lib.run.jobs.SweepSpec` ``tier``) and the CLI build the same object.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ellava_lib.core.schema import Sample
from ellava_lib.eval.evaluate import DATA_KINDS, EvalConfig
from ellava_lib.eval.judge import Judge, LocalJudge

JUDGES: tuple[str, ...] = ("local", "gpt")
#: How a sweep keeps its level databases on disk (:attr:`Tier.level_dbs`).
LEVEL_DB_MODES: tuple[str, ...] = ("keep", "one")


@dataclass
class Tier:
    """Model, data, judge and hardware of a run.

    ``model``: ``tiny`` (the kit's own build), a model folder, or a hub name of
    :data:`specs.HUB_MODELS`. ``data``: ``synthetic`` or ``real``; real data comes from the hub, or from
    local parquet copies in the upstream schema under ``data_dir/<benchmark>/``. ``calib_benchmarks``: the
    manifests whose ``calibration_split`` (a training split) the real calibration samples are drawn from.
    ``device``: where solver blocks, the search and evaluation run; ``dtype``: weights of hub models.
    ``db_dtype``: how level databases store the pruned weights (``store_dtype`` of
    :func:`leveldb.build_level_db`: ``auto`` = the weights' own dtype, else ``float16`` / ``bfloat16`` /
    ``float32``; a model held in fp32 stores 16-bit databases with ``bfloat16``); left out of :meth:`to_dict`
    at ``auto``, so the tiers before it keep their digests.
    ``offload``: prune and build level databases with one decoder block at a time on ``device`` while the model
    stays on the CPU (:func:`block_device`, ``device=`` of :func:`walk.walk_blocks`); the sweep and the CLI honour
    it. ``eval_batch_size``: prompts per ``generate`` batch of the evaluations (0: :class:`EvalConfig`'s default);
    :mod:`ellava_lib.speed.memory` chooses it for a GPU size. Both are left out of :meth:`to_dict` at their
    defaults (``False``, 0).
    ``level_dbs``: how a sweep holds its level databases (one per calibration draw ``(seed, n)``) on disk:
    ``keep`` every one of them, or ``one`` at a time (:func:`sweep.run_sweep` then runs the jobs database by
    database and deletes the others before building the next: peak disk one database instead of one per draw;
    a database deleted is rebuilt if a later sweep needs it). Left out of :meth:`to_dict` at ``keep``; not part
    of :meth:`identity` (where results are kept on disk changes no result).
    ``ecoflap_batch``: calibration rows per forward of ECoFLaP's zeroth-order importance (``loader_batch`` of
    :func:`allocate.zeroth_order_importance`; 1 = one row per forward, ECoFLaP's LLaMA loader); it changes the
    estimate, so it is part of :meth:`identity`, and left out of :meth:`to_dict` at 1.
    """

    model: str = "tiny"
    data: str = "synthetic"
    data_dir: str | None = None
    judge: str = "local"
    device: str = "cpu"
    dtype: str = "float32"
    calib_benchmarks: tuple[str, ...] = ("scienceqa",)
    db_dtype: str = "auto"
    offload: bool = False
    eval_batch_size: int = 0
    level_dbs: str = "keep"
    ecoflap_batch: int = 1

    def __post_init__(self) -> None:
        from ellava_lib.data.manifest import BENCHMARKS
        from ellava_lib.model.loading import DTYPES
        from ellava_lib.prune.leveldb import STORE_DTYPES

        self.calib_benchmarks = tuple(self.calib_benchmarks)
        if self.data not in DATA_KINDS:
            raise ValueError(f"tier data must be one of {', '.join(DATA_KINDS)}, got {self.data!r}")
        if self.judge not in JUDGES:
            raise ValueError(f"tier judge must be one of {', '.join(JUDGES)}, got {self.judge!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"tier dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        unknown = [b for b in self.calib_benchmarks if b not in BENCHMARKS]
        if unknown or not self.calib_benchmarks:
            raise ValueError(f"tier calib_benchmarks must name benchmarks of {', '.join(sorted(BENCHMARKS))}, "
                             f"got {list(self.calib_benchmarks)}")
        if self.db_dtype != "auto" and self.db_dtype not in STORE_DTYPES:
            raise ValueError(f"tier db_dtype must be auto or one of {', '.join(STORE_DTYPES)}, got {self.db_dtype!r}")
        if self.level_dbs not in LEVEL_DB_MODES:
            raise ValueError(f"tier level_dbs must be one of {', '.join(LEVEL_DB_MODES)}, got {self.level_dbs!r}")
        if self.ecoflap_batch < 1:
            raise ValueError(f"tier ecoflap_batch must be >= 1, got {self.ecoflap_batch}")
        if self.eval_batch_size < 0:
            raise ValueError(f"tier eval_batch_size must be >= 0, got {self.eval_batch_size}")
        if self.data_dir is not None and self.data != "real":
            raise ValueError("tier data_dir is only used with data: real")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Tier":
        """A tier from a profile / JSON mapping; unknown keys are an error naming the known ones."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown tier keys {unknown}; known: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["calib_benchmarks"] = list(self.calib_benchmarks)
        for key, default in (("db_dtype", "auto"), ("offload", False), ("eval_batch_size", 0), ("level_dbs", "keep"),
                             ("ecoflap_batch", 1)):
            if d[key] == default:
                del d[key]
        return d

    def identity(self) -> dict[str, Any]:
        """:meth:`to_dict` without the memory and disk knobs (``offload``, ``eval_batch_size``, ``level_dbs``):
        what a sweep row and a cache depend on, so a run moved to a GPU of another size keeps its rows."""
        return {k: v for k, v in self.to_dict().items() if k not in ("offload", "eval_batch_size", "level_dbs")}

    @property
    def is_default(self) -> bool:
        """The embedded default (its runs keep the identifiers they had before tiers existed)."""
        return self == Tier()

    @property
    def builds_model(self) -> bool:
        """True when the model is the kit's own tiny build (notebook 01 trains it)."""
        return self.model == "tiny"


def check_device(tier: Tier) -> None:
    """A clear error before any work when the tier's device is not available here."""
    import torch

    if tier.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"tier device {tier.device!r} is not available on this machine (no CUDA); "
                           "use device: cpu or run on a GPU box")


def model_record(tier: Tier, train_preset: str = "tiny", force: bool = False) -> dict[str, Any]:
    """What notebook 01 writes to ``model.json``: the model to load (``model_dir``), its size and the tier.

    ``tiny``: the cached build of ``train_preset`` (trained now if missing, or if ``force``). A hub name:
    nothing is downloaded here; the parameter count comes from the shipped config on the ``meta`` device.
    A folder: its own build record (``ellava.json``) when it has one.
    """
    from ellava_lib.model import specs, structure, train

    if tier.builds_model:
        model_dir = specs.build_or_load(train.preset(train_preset), force=force)
        return {"model_dir": str(model_dir), "preset": train_preset, **specs.model_meta(model_dir),
                "tier": tier.to_dict()}
    from ellava_lib.model.specs import HUB_MODELS, resolve_model_dir

    if tier.model in HUB_MODELS:  # every hub model has a shipped config (structure.CONFIG_ALIASES)
        info = structure.inspect_model(tier.model, meta=True)
        return {"model_dir": tier.model, "preset": tier.model, "params": info["params_total"], "tier": tier.to_dict()}
    model_dir = resolve_model_dir(tier.model, progress=False)  # a one-line error for a bad folder
    record = specs.model_meta(model_dir) if (model_dir / "ellava.json").is_file() else {}
    if "params" not in record:
        model, _ = load_model(tier, model_dir)
        record["params"] = sum(p.numel() for p in model.parameters())
    return {**record, "model_dir": str(model_dir), "preset": Path(model_dir).name, "tier": tier.to_dict()}


def load_model(tier: Tier, model_dir: str | Path, progress: bool = False):
    """``(model, processor)`` of the run's model (hub models in ``tier.dtype``), left on the CPU: pruning and
    database building bring one block at a time to ``tier.device``; :func:`place` moves the whole model."""
    from ellava_lib.model.specs import load_model as _load

    return _load(model_dir, progress=progress, dtype=tier.dtype)


#: The model :func:`place` last put on each device (weakly held): placing another one moves it back to the CPU.
_PLACED: dict[str, weakref.ref] = {}


def place(tier: Tier, model, batch: dict | None = None):
    """Move the model (and a calibration batch) to ``tier.device`` for the search and evaluation.

    One model on the device at a time: a model placed earlier on the same device and still alive is moved back
    to the CPU first (:func:`release`), so a dense model and its pruned copy (notebook 02's magnitude rows, the
    sweep's exact re-prune) never share the GPU (two fp16 7B models: 27 GB of weights)."""
    if tier.device != "cpu":
        check_device(tier)
        ref = _PLACED.get(tier.device)
        previous = ref() if ref is not None else None
        if previous is not None and previous is not model:
            release(previous)
        model.to(tier.device)
        _PLACED[tier.device] = weakref.ref(model)
        if batch is not None:
            batch = {k: v.to(tier.device) for k, v in batch.items()}
    return model, batch


def release(model) -> None:
    """Move ``model`` back to the CPU and return the freed blocks of CUDA's caching allocator to the driver."""
    import torch

    model.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def block_device(tier: Tier) -> str | None:
    """Where pruning and level-database building bring one decoder block at a time (``device=`` of
    :func:`prune.prune_model` and :func:`leveldb.build_level_db`): ``tier.device`` when ``tier.offload``,
    else None (they run wherever the model is)."""
    return tier.device if tier.offload else None


def calibration_samples(tier: Tier, n: int, seed: int) -> list[Sample]:
    """``n`` calibration samples drawn with ``seed``.

    Synthetic: :func:`calibration.draw_calibration` (the ``calib`` split, balanced across suites). Real:
    benchmark ``k`` of ``K`` in ``calib_benchmarks`` gets ``n // K`` (+1 for the first ``n % K``) rows of its
    manifest's calibration (training) split, chosen by :func:`real.draw_calibration_rows`; a row that
    cannot be used (undecodable image, missing field) is reported and replaced by the next ranked row.
    """
    if tier.data == "synthetic":
        from ellava_lib.data.calibration import draw_calibration

        return draw_calibration(n, seed)
    from ellava_lib.data.real import (
        benchmark_dir,
        calibration_num_rows,
        load_real_suite,
        rank_rows,
    )

    if n <= 0:
        raise ValueError(f"calibration size must be positive, got {n}")
    out: list[Sample] = []
    K = len(tier.calib_benchmarks)
    for k, name in enumerate(tier.calib_benchmarks):
        quota = n // K + (1 if k < n % K else 0)
        if quota == 0:
            continue
        man = _calibration_manifest(name)
        data_dir = benchmark_dir(tier.data_dir, name)
        total = calibration_num_rows(man, data_dir=data_dir)
        if quota > total:
            raise ValueError(f"{quota} calibration samples exceed the {total} rows of {name}'s calibration split")
        order = rank_rows(total, seed)  # its first `quota` rows are draw_calibration_rows(total, quota, seed)
        got: list[Sample] = []
        start = 0
        while len(got) < quota and start < total:
            take = order[start: start + (quota - len(got))]
            start += len(take)
            report = load_real_suite(man, split=man.calibration.split, rows=take, data_dir=data_dir)
            for sample in report.samples:  # provenance, for record_calibration
                sample.meta.update(source=report.source, revision=report.revision)
            got += report.samples
        if len(got) < quota:
            raise ValueError(f"{name}: only {len(got)} usable calibration rows, {quota} requested")
        out += sorted(got, key=lambda s: s.id)
    return out


def record_calibration(tier: Tier, samples: list[Sample], seed: int, out_dir: str | Path) -> list[Path]:
    """Real data: write ``out_dir/<benchmark>.yaml``, the benchmark's manifest plus a ``calibration_drawn``
    block (seed, n, the drawn ids, the source and revision they came from), so the run's manifests record
    which training rows calibrated it. Synthetic data: nothing (the ids are in ``calibration.json``)."""
    import yaml

    from ellava_lib.core import files
    from ellava_lib.data.manifest import SUITE_BENCHMARKS, _manifest_path

    if tier.data != "real":
        return []
    written = []
    for name in tier.calib_benchmarks:
        mine = [s for s in samples if SUITE_BENCHMARKS.get(s.suite) == name]
        raw = yaml.safe_load(_manifest_path(name).read_text())
        raw["calibration_drawn"] = {
            "seed": seed, "n": len(mine), "split": _calibration_manifest(name).calibration.split,
            "ids": [s.id for s in mine],
            "source": sorted({str(s.meta.get("source")) for s in mine}),
            "revision": sorted({str(s.meta.get("revision")) for s in mine})}
        path = Path(out_dir) / f"{name}.yaml"
        files.write_text(path, yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
        written.append(path)
    return written


def _calibration_manifest(name: str):
    """The benchmark's manifest; a clear error when it names no calibration (training) split."""
    from ellava_lib.data.manifest import load_manifest

    man = load_manifest(name)
    if man.calibration is None:
        raise ValueError(f"benchmark {name!r} has no calibration_split in its manifest")
    return man


def encode_calibration(tier: Tier, samples: list[Sample], processor):
    """The calibration batch: the trainer's encoding for synthetic samples (bit-identical to training),
    the processor's encoding of the evaluation's inputs for real images (LLaVA-1.5's vicuna_v1 prompt, images padded
    to square: :func:`calibration.encode_with_processor`)."""
    from ellava_lib.data.calibration import encode_calibration as synthetic
    from ellava_lib.data.calibration import encode_with_processor

    return synthetic(samples, processor) if tier.data == "synthetic" else encode_with_processor(samples, processor)


def eval_config(tier: Tier, limit: int | None = None, **kw: Any) -> EvalConfig:
    """The :class:`EvalConfig` of the tier's test data (``limit`` items per suite; ``None`` or 0: all), with the
    tier's ``eval_batch_size`` unless ``kw`` names a batch size."""
    if tier.eval_batch_size:
        kw.setdefault("batch_size", tier.eval_batch_size)
    return EvalConfig(limit=limit or None, data=tier.data, data_dir=tier.data_dir, **kw)


def eval_samples(tier: Tier, suite: str, limit: int) -> list[Sample]:
    """The first ``limit`` evaluation items of ``suite`` on the tier's data."""
    from ellava_lib.eval.evaluate import load_samples

    return load_samples(eval_config(tier, limit), suite)


def make_judge(tier: Tier, cache_dir: str | Path) -> Judge:
    """The local deterministic judge, or the GPT judge (endpoint, model and key from the environment;
    every judgement cached under ``cache_dir``)."""
    if tier.judge == "local":
        return LocalJudge()
    from ellava_lib.eval.gpt_judge import GPTJudge

    return GPTJudge(cache_dir)
