"""Benchmark metrics for the four suites (ScienceQA-IMG, VizWiz-VQA, MM-Vet, LLaVA-Bench).

Rule-based metrics (``sqa``: option-letter accuracy, ``vizwiz``: VQA accuracy) are computed here;
judge-scored suites (``mmvet``, ``llavabench``) take per-item scores from a :class:`~ellava_lib.eval.judge.Judge`
and are aggregated here. Every headline score is on a 0-100 scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from ellava_lib.core.schema import SUITES, Sample
from ellava_lib.eval.text import extract_option_letter, normalize_vqa_answer

if TYPE_CHECKING:  # pragma: no cover - import for type hints only (judge.py imports this module)
    import pandas as pd

    from ellava_lib.eval.judge import Judge


def sqa_score(pred: str, answer_letter: str, n_choices: int) -> float:
    """ScienceQA item score: 1.0 if ``extract_option_letter(pred) == answer_letter`` (case-insensitive) else 0.0."""
    letter = extract_option_letter(pred, n_choices)
    return 1.0 if letter is not None and letter == answer_letter.strip().upper() else 0.0


def vqa_accuracy(pred: str, gt_answers: list[str]) -> float:
    """VQA accuracy of one prediction against k >= 1 annotator answers (all normalized).

    ``acc = (1/k) * sum_i min(1, #{j != i : gt_j == pred} / 3)``: the mean over the k leave-one-out
    subsets. With 10 answers of which m equal the prediction: m=1 -> 0.3, m=2 -> 0.6, m=3 -> 0.9,
    m>=4 -> 1.0. Computed with exact fractions. Raises ValueError on an empty list.
    """
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    target = normalize_vqa_answer(pred)
    hits = [normalize_vqa_answer(gt) == target for gt in gt_answers]
    total_hits = sum(hits)
    per_subset = [min(Fraction(1), Fraction(total_hits - int(hit), 3)) for hit in hits]
    return float(sum(per_subset) / len(per_subset))


# --------------------------------------------------------------------------------------------------
# MM-Vet and LLaVA-Bench aggregation
# --------------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    """Arithmetic mean ``sum(values) / len(values)`` (ValueError when empty)."""
    if not values:
        raise ValueError("mean of an empty list")
    return sum(values) / len(values)


def mmvet_aggregate(scores: list[float], capabilities: list[list[str]]) -> dict[str, float]:
    """MM-Vet report: ``overall = 100 * mean(scores)`` and, for every capability c,
    ``c = 100 * mean(scores[i] for items i tagged with c)``.

    Keys: ``overall`` first, then the capabilities in sorted order. Raises ValueError on empty input or
    mismatched lengths.
    """
    if len(scores) != len(capabilities):
        raise ValueError(f"{len(scores)} scores but {len(capabilities)} capability lists")
    result = {"overall": 100.0 * _mean(scores)}
    for cap in sorted({c for caps in capabilities for c in caps}):
        result[cap] = 100.0 * _mean([s for s, caps in zip(scores, capabilities) if cap in caps])
    return result


def _relative(ref: list[float], ans: list[float]) -> float:
    """``100 * mean(ans) / mean(ref)`` (ValueError when the reference mean is 0)."""
    ref_mean = _mean(ref)
    if ref_mean == 0:
        raise ValueError("mean reference score is 0; relative score undefined")
    return 100.0 * _mean(ans) / ref_mean


def llavabench_relative(
    ref_scores: list[float], ans_scores: list[float], categories: list[str]
) -> dict[str, float]:
    """LLaVA-Bench relative score: ``100 * mean(answer scores) / mean(reference scores)``.

    Keys: ``overall`` (all items) first, then one per category (sorted), each over that category's
    items. Raises ValueError on empty input or mismatched lengths.
    """
    if not len(ref_scores) == len(ans_scores) == len(categories):
        raise ValueError("ref_scores, ans_scores and categories must have the same length")
    result = {"overall": _relative(ref_scores, ans_scores)}
    for cat in sorted(set(categories)):
        idx = [i for i, c in enumerate(categories) if c == cat]
        result[cat] = _relative([ref_scores[i] for i in idx], [ans_scores[i] for i in idx])
    return result


# --------------------------------------------------------------------------------------------------
# Per-suite metric rows
# --------------------------------------------------------------------------------------------------

RULE_JUDGE = "exact"  # judge column value for rule-based suites (sqa, vizwiz)
#: The suites scored by a :class:`~ellava_lib.eval.judge.Judge`.
JUDGED_SUITES: tuple[str, ...] = ("mmvet", "llavabench")
#: The columns of ``metrics.csv``.
FRAME_COLUMNS: tuple[str, ...] = ("suite", "metric", "score", "n", "judge", "judge_model", "split")


@dataclass
class MetricRow:
    """One reported number: ``score`` (0-100) of ``metric`` on ``suite`` over ``n`` items of ``split``, scored by
    ``judge`` (the judge requested); ``judge_model``: the model(s) that answered those items' judgements, ``+``-joined
    when several did (``judge`` again for rule-based and local scores)."""

    suite: str
    metric: str
    score: float
    n: int
    judge: str
    judge_model: str = ""
    split: str = ""


def _joined(values: list[str]) -> str:
    """The distinct values, sorted, joined by ``+``."""
    return "+".join(sorted(set(values)))


def _group_rows(
    suite: str, item_scores: list[float], groups: list[tuple[str, list[bool]]], judge: str,
    models: list[str] | None = None, split: str = "",
) -> list[MetricRow]:
    """``overall`` row plus one row per (name, mask) group: ``100 * mean(item scores in group)``; each row's
    ``judge_model`` joins the answering ``models`` of its items (default: ``judge``).

    Empty groups are skipped.
    """
    models = models if models is not None else [judge] * len(item_scores)
    rows = [MetricRow(suite, "overall", 100.0 * _mean(item_scores), len(item_scores), judge, _joined(models), split)]
    for name, mask in groups:
        picked = [s for s, keep in zip(item_scores, mask) if keep]
        if picked:
            rows.append(MetricRow(suite, name, 100.0 * _mean(picked), len(picked), judge,
                                  _joined([m for m, keep in zip(models, mask) if keep]), split))
    return rows


def _category_groups(samples: list[Sample]) -> list[tuple[str, list[bool]]]:
    """One (category, mask) group per non-empty ``sample.category``, sorted by name."""
    cats = sorted({s.category for s in samples if s.category})
    return [(c, [s.category == c for s in samples]) for c in cats]


ItemRecords = list[dict]


def _sqa_rows(samples: list[Sample], preds: list[str], split: str) -> tuple[list[MetricRow], ItemRecords]:
    """sqa: accuracy (%) overall and per category."""
    scores = [sqa_score(p, s.answer, len(s.choices)) for s, p in zip(samples, preds)]
    rows = _group_rows("sqa", scores, _category_groups(samples), RULE_JUDGE, split=split)
    return rows, [{"score": x} for x in scores]


def _vizwiz_rows(samples: list[Sample], preds: list[str], split: str) -> tuple[list[MetricRow], ItemRecords]:
    """vizwiz: VQA accuracy (%) overall, per category, answerable and unanswerable.

    Raises ValueError for an item without annotator answers (``sample.answers``): a single reference
    would score 0 under the leave-one-out rule, so there is no silent fallback (test-dev items, whose
    answers are withheld, are predicted for EvalAI, never scored here).
    """
    missing = [s.id for s in samples if not s.answers]
    if missing:
        raise ValueError(f"vizwiz items without annotator answers: {missing[:5]}")
    scores = [vqa_accuracy(p, s.answers) for s, p in zip(samples, preds)]
    groups = _category_groups(samples) + [
        ("answerable", [s.answerable for s in samples]),
        ("unanswerable", [not s.answerable for s in samples]),
    ]
    return _group_rows("vizwiz", scores, groups, RULE_JUDGE, split=split), [{"score": x} for x in scores]


def _mmvet_rows(samples: list[Sample], preds: list[str], judge: Judge,
                split: str) -> tuple[list[MetricRow], ItemRecords]:
    """mmvet: judge score per item, :func:`mmvet_aggregate` overall and per capability."""
    verdicts = [judge.mmvet_verdict(s.question, s.answer, p) for s, p in zip(samples, preds)]
    scores = [v.scores[0] for v in verdicts]
    caps = [list(s.capabilities) for s in samples]
    agg = mmvet_aggregate(scores, caps)
    rows = []
    for k, v in agg.items():
        mask = [True] * len(samples) if k == "overall" else [k in c for c in caps]
        rows.append(MetricRow("mmvet", k, v, sum(mask), judge.name,
                              _joined([x.model for x, keep in zip(verdicts, mask) if keep]), split))
    items = [{"score": v.scores[0], "judge_model": v.model, "judge_failed": v.failed} for v in verdicts]
    return rows, items


def _llavabench_rows(samples: list[Sample], preds: list[str], judge: Judge,
                     split: str) -> tuple[list[MetricRow], ItemRecords]:
    """llavabench: judge (reference, answer) scores per item, the item's caption (``meta["caption"]``, real data) as
    the reviewer's context, :func:`llavabench_relative` by category."""
    verdicts = [judge.llavabench_verdict(s.question, s.answer, p, s.category, context=str(s.meta.get("caption", "")))
                for s, p in zip(samples, preds)]
    cats = [s.category for s in samples]
    rel = llavabench_relative([v.scores[0] for v in verdicts], [v.scores[1] for v in verdicts], cats)
    rows = []
    for k, v in rel.items():
        mask = [True] * len(samples) if k == "overall" else [c == k for c in cats]
        rows.append(MetricRow("llavabench", k, v, sum(mask), judge.name,
                              _joined([x.model for x, keep in zip(verdicts, mask) if keep]), split))
    items = [{"reference_score": v.scores[0], "score": v.scores[1], "judge_model": v.model, "judge_failed": v.failed}
             for v in verdicts]
    return rows, items


def suite_scores(
    suite: str, samples: list[Sample], preds: list[str], judge: Judge | None = None
) -> tuple[list[MetricRow], ItemRecords]:
    """Metric rows (see :func:`suite_metrics`) and one record per item: its ``score`` (0-1 for sqa / vizwiz /
    mmvet, 1-10 for llavabench, with ``reference_score``) and, for the judged suites, ``judge_model`` (the model
    that answered) and ``judge_failed``."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}")
    if not samples:
        raise ValueError("no samples")
    if len(samples) != len(preds):
        raise ValueError(f"{len(samples)} samples but {len(preds)} predictions")
    wrong = [s.id for s in samples if s.suite != suite]
    if wrong:
        raise ValueError(f"samples of another suite passed for {suite!r}: {wrong[:5]}")
    split = _joined([s.split for s in samples])
    if suite == "sqa":
        return _sqa_rows(samples, preds, split)
    if suite == "vizwiz":
        return _vizwiz_rows(samples, preds, split)
    if judge is None:
        raise ValueError(f"suite {suite!r} is judge-scored; pass a Judge")
    if suite == "mmvet":
        return _mmvet_rows(samples, preds, judge, split)
    return _llavabench_rows(samples, preds, judge, split)


def suite_metrics(
    suite: str, samples: list[Sample], preds: list[str], judge: Judge | None = None
) -> list[MetricRow]:
    """Headline (``metric == "overall"``, 0-100) and breakdown rows for one suite.

    sqa: option accuracy overall + per category; vizwiz: VQA accuracy overall + per category +
    answerable/unanswerable; mmvet: judge scores aggregated with :func:`mmvet_aggregate` (metric names are
    capabilities); llavabench: judge scores, :func:`llavabench_relative` per category. The ``judge``
    column is ``"exact"`` for sqa/vizwiz and ``judge.name`` otherwise (a judge is required there);
    ``judge_model`` names the model(s) that answered, ``split`` the samples' split(s).
    Raises ValueError on an unknown suite, empty or mismatched inputs, or a sample of another suite.
    """
    return suite_scores(suite, samples, preds, judge)[0]


def rows_to_frame(rows: list[MetricRow]) -> pd.DataFrame:
    """A pandas DataFrame with the columns of :data:`FRAME_COLUMNS`, one line per row."""
    import pandas as pd  # local import: pandas is only needed for reporting

    columns = list(FRAME_COLUMNS)
    return pd.DataFrame([[getattr(r, c) for c in columns] for r in rows], columns=columns)
