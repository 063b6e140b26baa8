"""Judges for the open-ended suites (MM-Vet, LLaVA-Bench).

:class:`Judge` is the interface every judge implements (a GPT-backed one lives in ``gpt_judge.py``);
:class:`LocalJudge` is a deterministic, offline, pure-Python lexical stand-in used only for the
synthetic look-alike suites. Its numbers are not comparable to GPT-4-judged published numbers.

LLaVA-Bench judges receive ``context``: the image caption(s) the upstream GPT reviewer reads in its
``[Context]`` block (the evaluated model never sees them). The GPT judge sends it; the local judge accepts
and ignores it (a lexical overlap with the reference has no use for a caption). A :class:`Verdict` carries
the scores together with the model that produced them (for a GPT judge: the ``model`` field of the server's
reply, which may differ from the model requested, e.g. a dated snapshot behind an alias).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass

from ellava_lib.eval.text import normalize_vqa_answer

AND_SEP = "<AND>"
OR_SEP = "<OR>"

# Small stopword list for content tokens (applied after normalize_vqa_answer, which already drops
# a/an/the; they are listed anyway so the set documents itself).
STOPWORDS: frozenset[str] = frozenset(
    {
        "a", "an", "the", "is", "are", "was", "were", "be", "been", "being", "am",
        "of", "to", "in", "on", "at", "by", "for", "with", "from", "as", "into",
        "and", "or", "but", "it", "its", "it's", "there", "here", "this", "that", "these", "those",
        "which", "who", "has", "have", "had", "do", "does", "did",
    }
)


@dataclass(frozen=True)
class Verdict:
    """One judgement: ``scores`` (MM-Vet: ``(correctness,)``; LLaVA-Bench: ``(reference, answer)``), the model that
    produced them, and whether the judge gave up (no parsable reply: the fallback scores are recorded)."""

    scores: tuple[float, ...]
    model: str
    failed: bool = False


class Judge(ABC):
    """Scores open-ended answers. ``name`` (the judge or judge model requested) goes into the ``judge`` column of
    the metric table; the model that actually answered comes with each :class:`Verdict`."""

    name: str = "abstract"

    @abstractmethod
    def score_mmvet(self, question: str, gt: str, pred: str) -> float:
        """MM-Vet correctness of ``pred`` against ground truth ``gt``, in [0, 1]."""

    @abstractmethod
    def score_llavabench(
        self, question: str, reference: str, answer: str, category: str, *, context: str = ""
    ) -> tuple[float, float]:
        """(reference_score, answer_score), each on the 1..10 scale of the LLaVA-Bench reviewer; ``context`` is
        the image caption(s) of the reviewer's ``[Context]`` block."""

    def mmvet_verdict(self, question: str, gt: str, pred: str) -> Verdict:
        """:meth:`score_mmvet` with the model that answered (default: :attr:`name`)."""
        return Verdict((self.score_mmvet(question, gt, pred),), self.name)

    def llavabench_verdict(
        self, question: str, reference: str, answer: str, category: str, *, context: str = ""
    ) -> Verdict:
        """:meth:`score_llavabench` with the model that answered (default: :attr:`name`)."""
        return Verdict(tuple(self.score_llavabench(question, reference, answer, category, context=context)),
                       self.name)


# --------------------------------------------------------------------------------------------------
# token helpers
# --------------------------------------------------------------------------------------------------


def _tokens(text: str) -> list[str]:
    """Normalized words: ``normalize_vqa_answer(text).split()``."""
    return normalize_vqa_answer(text).split()


def _content(tokens: list[str]) -> list[str]:
    """``tokens`` minus :data:`STOPWORDS`; all ``tokens`` if that would leave nothing."""
    kept = [t for t in tokens if t not in STOPWORDS]
    return kept or list(tokens)


def _contains_phrase(haystack: list[str], phrase: list[str]) -> bool:
    """True when ``phrase`` occurs as a contiguous run of whole tokens in ``haystack``."""
    n = len(phrase)
    if n == 0:
        return False
    return any(haystack[i : i + n] == phrase for i in range(len(haystack) - n + 1))


def token_f1(pred: list[str], ref: list[str]) -> float:
    """Multiset F1: ``overlap = |Counter(pred) & Counter(ref)|``, ``P = overlap/|pred|``,
    ``R = overlap/|ref|``, ``F1 = 2PR/(P+R)`` (0 when overlap is 0; 1 when both are empty)."""
    if not pred and not ref:
        return 1.0
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------------
# local judge
# --------------------------------------------------------------------------------------------------


class LocalJudge(Judge):
    """Deterministic lexical judge (``name = "local-v1"``); no network, no model.

    It stands in for the GPT-4 graders of MM-Vet and LLaVA-Bench on the *synthetic* suites only;
    scores are lexical overlaps, not semantic judgments.
    """

    name = "local-v1"

    def score_mmvet(self, question: str, gt: str, pred: str) -> float:
        """MM-Vet score in {0, 0.5, 1} or an AND-fraction, from ``gt`` syntax (all text normalized with
        :func:`normalize_vqa_answer`).

        * ``<OR>`` splits alternatives (loosest binding): score = max over alternatives.
        * ``<AND>`` inside an alternative: score = (#parts found as whole-word phrases in pred) / #parts.
        * plain gt: 1.0 if norm(pred) == norm(gt), or gt occurs as a whole-word phrase in pred and
          ``len(pred words) - len(gt words) <= 3``; else 0.5 if content-token F1(pred, gt) >= 0.5;
          else 0.0.
        """
        pred_tokens = _tokens(pred)
        return max(self._score_alternative(alt, pred_tokens) for alt in gt.split(OR_SEP))

    def _score_alternative(self, gt: str, pred_tokens: list[str]) -> float:
        """One ``<OR>`` alternative: AND-fraction if it has ``<AND>`` parts, else the plain rule."""
        parts = [p for p in (_tokens(x) for x in gt.split(AND_SEP)) if p]
        if AND_SEP in gt and parts:
            return sum(_contains_phrase(pred_tokens, p) for p in parts) / len(parts)
        return _plain_mmvet(_tokens(gt), pred_tokens)

    def score_llavabench(
        self, question: str, reference: str, answer: str, category: str, *, context: str = ""
    ) -> tuple[float, float]:
        """``(10.0, round(1 + 9 * F1, 1))`` with F1 = multiset F1 of the content tokens (normalized words
        minus :data:`STOPWORDS`) of ``answer`` vs ``reference``. A lexical stand-in for the GPT-4
        reviewer, used only for the synthetic suites; ``question``, ``category`` and ``context`` (the caption)
        are accepted for the interface and ignored."""
        f1 = token_f1(_content(_tokens(answer)), _content(_tokens(reference)))
        return 10.0, round(1.0 + 9.0 * f1, 1)


def _plain_mmvet(gt_tokens: list[str], pred_tokens: list[str]) -> float:
    """Plain-gt MM-Vet rule on normalized tokens (see :meth:`LocalJudge.score_mmvet`)."""
    if not gt_tokens:
        return 1.0 if not pred_tokens else 0.0
    if pred_tokens == gt_tokens:
        return 1.0
    if _contains_phrase(pred_tokens, gt_tokens) and len(pred_tokens) - len(gt_tokens) <= 3:
        return 1.0
    f1 = token_f1(_content(pred_tokens), _content(gt_tokens))
    return 0.5 if f1 >= 0.5 else 0.0
