"""An OpenAI-compatible GPT judge for MM-Vet and LLaVA-Bench (same interface as ``LocalJudge``).

MM-Vet: the few-shot grader of the official evaluator (yuweihao/MM-Vet ``mm-vet_evaluator.py``): one user
message, ``max_tokens=3``; the first whitespace-separated token of the reply must be a number in [0, 1].
On a parse failure the question is re-sent with "Predict the correctness of the answer (digit): " and the
temperature raised by 0.5, at most ``mmvet_max_tries`` (5) tries in all; 0.0 after the last. (The
official script sends one more request than that and ignores its reply; we parse every reply.)

LLaVA-Bench: the reviewer of LLaVA's ``eval_gpt_review_bench.py`` (also lmms-eval ``llava-in-the-wild``):
system prompt "You are a helpful and precise assistant for checking the quality of the answer.", user
content ``[Context] / [Question] / [Assistant 1] ... [System] <rule for the category>``, temperature 0.2,
``max_tokens=1024``; the two scores are parsed from the first line. Unparsable (or outside 1..10): retried
up to ``llavabench_max_tries`` (3) tries, then ``(-1, -1)`` recorded as a failure.

The ``model`` field of the server's reply (the model that answered: an alias may resolve to a dated snapshot,
a proxy may serve another model) is kept in every judgement, cached with it, and reported beside each judged
number (:meth:`GPTJudge.mmvet_verdict`, :meth:`GPTJudge.llavabench_verdict`; ``"unreported"`` when the reply has
none); ``name`` stays the model requested.

Every judgement is cached in ``<cache_dir>/gpt_judge_cache.sqlite`` keyed by (judge model, sha256 of the
full first prompt, i.e. the canonical JSON of its messages); a cached judgement sends no request. Transport
errors (network, HTTP 429/5xx after retries, other HTTP errors at once) raise :class:`JudgeError` and are
not cached. The API key is kept in a :class:`_Secret`, sent as an unredirected header, and redacted from
every message this module logs or raises; it is never written to the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ellava_lib.eval.judge import Judge, Verdict

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-4-0613"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
CACHE_FILENAME = "gpt_judge_cache.sqlite"
#: Recorded as the answering model when the server's replies carried no ``model`` field.
UNREPORTED = "unreported"

# yuweihao/MM-Vet mm-vet_evaluator.py (the lmms-eval copy names the first column "gpt_query_prompt").
MMVET_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""
MMVET_RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "

# haotian-liu/LLaVA llava/eval/eval_gpt_review_bench.py and llava/eval/table/rule.json.
LLAVA_SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
LLAVA_ROLE = "Assistant"
_LLAVA_BENCH_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the "
    "visual content in the image is represented with a few sentences describing the image. \n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall "
    "performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and "
    "2, respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any "
    "potential bias and ensuring that the order in which the responses were presented does not affect your "
    "judgment."
)
LLAVA_RULES: dict[str, str] = {c: _LLAVA_BENCH_RULE for c in ("conv", "detail", "complex")}

_KEY_LIKE = re.compile(r"\b(?:sk|rk|pk)-[A-Za-z0-9_\-*]{6,}")


class JudgeError(RuntimeError):
    """The judge endpoint could not be reached or answered with an error (never contains the key)."""


class _Secret:
    """Holds the API key; its repr and str never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The key itself (only for the Authorization header)."""
        return self._value

    def __repr__(self) -> str:
        return "_Secret('***')"

    __str__ = __repr__


@dataclass
class Judgement:
    """One cached judgement: parsed scores, the raw replies, and how it was obtained."""

    kind: str
    scores: list[float]
    replies: list[str]
    temperatures: list[float]
    failed: bool
    response_model: str | None = None
    cached: bool = False


def mmvet_query(question: str, gt: str, pred: str) -> str:
    """The MM-Vet grader prompt: the few-shot table plus ``question | gt | pred | `` as the last row."""
    gt_spaced = gt.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return MMVET_PROMPT + "\n" + " | ".join([question, gt_spaced, pred, ""])


def llavabench_content(question: str, reference: str, answer: str, category: str, context: str = "") -> str:
    """The LLaVA-Bench reviewer's user message (reference = Assistant 1, evaluated answer = Assistant 2)."""
    if category not in LLAVA_RULES:
        raise ValueError(f"unknown LLaVA-Bench category {category!r}; expected one of {', '.join(LLAVA_RULES)}")
    role = LLAVA_ROLE
    return (
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
        f"[System]\n{LLAVA_RULES[category]}\n\n"
    )


def parse_mmvet_score(reply: str) -> float | None:
    """The first token of ``reply`` as a score in [0, 1], else None."""
    tokens = (reply or "").split()
    if not tokens:
        return None
    try:
        score = float(tokens[0])
    except ValueError:
        return None
    return score if 0.0 <= score <= 1.0 else None


def parse_llavabench_scores(review: str) -> tuple[float, float] | None:
    """Two scores in 1..10 from the first line of ``review`` (commas count as spaces), else None."""
    first = (review or "").strip().split("\n")[0].replace(",", " ").split()
    if len(first) != 2:
        return None
    try:
        a, b = float(first[0]), float(first[1])
    except ValueError:
        return None
    return (a, b) if 1.0 <= a <= 10.0 and 1.0 <= b <= 10.0 else None


def prompt_sha256(messages: list[dict[str, str]]) -> str:
    """sha256 of the canonical JSON of a chat message list (the cache key with the model name)."""
    canonical = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class JudgeCache:
    """sqlite store of judgements keyed by (model, prompt sha256)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS judgements (model TEXT NOT NULL, prompt_sha256 TEXT NOT NULL, "
                "kind TEXT NOT NULL, prompt TEXT NOT NULL, record TEXT NOT NULL, created_at REAL NOT NULL, "
                "PRIMARY KEY (model, prompt_sha256))"
            )

    @contextlib.contextmanager
    def _connect(self) -> Any:
        """A committed-and-closed connection."""
        con = sqlite3.connect(self.path, timeout=30.0)
        try:
            with con:
                yield con
        finally:
            con.close()

    def get(self, model: str, sha: str) -> Judgement | None:
        """The cached judgement, if any."""
        with self._connect() as con:
            row = con.execute(
                "SELECT record FROM judgements WHERE model = ? AND prompt_sha256 = ?", (model, sha)
            ).fetchone()
        return Judgement(**json.loads(row[0])) if row else None

    def put(self, model: str, sha: str, prompt: str, judgement: Judgement) -> None:
        """Store (or replace) one judgement."""
        record = json.dumps({**asdict(judgement), "cached": False}, ensure_ascii=False)
        with self._connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?, ?)",
                (model, sha, judgement.kind, prompt, record, time.time()),
            )

    def __len__(self) -> int:
        with self._connect() as con:
            return int(con.execute("SELECT COUNT(*) FROM judgements").fetchone()[0])


class GPTJudge(Judge):
    """GPT judge over any OpenAI-compatible ``/chat/completions`` endpoint.

    Configuration: constructor arguments, else ``ELLAVA_JUDGE_MODEL`` (default ``gpt-4-0613``),
    ``OPENAI_BASE_URL`` (default ``https://api.openai.com/v1``) and ``OPENAI_API_KEY``.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        http_retries: int = 3,
        retry_backoff_s: float = 2.0,
        mmvet_max_tries: int = 5,
        llavabench_max_tries: int = 3,
    ) -> None:
        self.name = model or os.environ.get("ELLAVA_JUDGE_MODEL") or DEFAULT_MODEL
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._key = _Secret(key) if key else None
        if self._key is None and self.base_url == DEFAULT_BASE_URL:
            raise JudgeError("no API key for the OpenAI endpoint: set OPENAI_API_KEY or pass api_key")
        if http_retries < 1 or mmvet_max_tries < 1 or llavabench_max_tries < 1:
            raise ValueError("retry counts must be >= 1")
        self.timeout_s = timeout_s
        self.http_retries = http_retries
        self.retry_backoff_s = retry_backoff_s
        self.mmvet_max_tries = mmvet_max_tries
        self.llavabench_max_tries = llavabench_max_tries
        self.cache = JudgeCache(Path(cache_dir) / CACHE_FILENAME)
        self.requests_sent = 0
        self.cache_hits = 0
        self._opener = urllib.request.build_opener()

    def __repr__(self) -> str:
        key = "set" if self._key else "none"
        return (f"GPTJudge(name={self.name!r}, base_url={self.base_url!r}, api_key={key}, "
                f"cache={str(self.cache.path)!r})")

    # ------------------------------------------------------------------------------------ interface

    def score_mmvet(self, question: str, gt: str, pred: str) -> float:
        """MM-Vet correctness in [0, 1] (0.0 when no parsable score came back)."""
        return self.judge_mmvet(question, gt, pred).scores[0]

    def score_llavabench(
        self, question: str, reference: str, answer: str, category: str, *, context: str = ""
    ) -> tuple[float, float]:
        """(reference score, answer score) on 1..10; (-1, -1) when the review could not be parsed.
        ``context`` is the image caption shown to the reviewer (upstream ``[Context]``)."""
        j = self.judge_llavabench(question, reference, answer, category, context=context)
        return j.scores[0], j.scores[1]

    def mmvet_verdict(self, question: str, gt: str, pred: str) -> Verdict:
        """The MM-Vet score with the model the server said answered (:data:`UNREPORTED` if its replies had none)."""
        j = self.judge_mmvet(question, gt, pred)
        return Verdict((j.scores[0],), j.response_model or UNREPORTED, j.failed)

    def llavabench_verdict(
        self, question: str, reference: str, answer: str, category: str, *, context: str = ""
    ) -> Verdict:
        """The LLaVA-Bench scores with the model the server said answered (:data:`UNREPORTED` if none)."""
        j = self.judge_llavabench(question, reference, answer, category, context=context)
        return Verdict((j.scores[0], j.scores[1]), j.response_model or UNREPORTED, j.failed)

    # ------------------------------------------------------------------------------------ judgements

    def judge_mmvet(self, question: str, gt: str, pred: str) -> Judgement:
        """The full MM-Vet judgement (cached). Try ``a`` (0-based) asks at temperature ``min(0.5 a, 2)``, retries
        with :data:`MMVET_RETRY_SUFFIX` appended, 3 tokens."""
        base = mmvet_query(question, gt, pred)
        messages = [{"role": "user", "content": base}]
        sha = prompt_sha256(messages)
        cached = self._cached(sha)
        if cached is not None:
            return cached
        retry = [{"role": "user", "content": base + MMVET_RETRY_SUFFIX}]

        def ask(attempt: int) -> tuple[list[dict[str, str]], float, int]:
            return (messages if attempt == 0 else retry), min(0.5 * attempt, 2.0), 3

        def miss(attempt: int, temperature: float) -> None:
            log.info("mmvet judge %s: unparsable reply on try %d (temperature %.1f)", sha[:12], attempt + 1,
                     temperature)

        score, replies, temps, model_used = self._ask_until_parsed(self.mmvet_max_tries, ask, parse_mmvet_score, miss)
        failed = score is None
        if failed:
            log.warning("mmvet judge %s: no score after %d tries; scoring 0.0", sha[:12], len(replies))
        judgement = Judgement("mmvet", [0.0 if score is None else score], replies, temps, failed, model_used)
        self.cache.put(self.name, sha, base, judgement)
        return judgement

    def judge_llavabench(
        self, question: str, reference: str, answer: str, category: str, *, context: str = ""
    ) -> Judgement:
        """The full LLaVA-Bench review (cached): every try asks the same prompt at temperature 0.2, 1024 tokens."""
        content = llavabench_content(question, reference, answer, category, context)
        messages = [{"role": "system", "content": LLAVA_SYSTEM_PROMPT}, {"role": "user", "content": content}]
        sha = prompt_sha256(messages)
        cached = self._cached(sha)
        if cached is not None:
            return cached

        def miss(attempt: int, temperature: float) -> None:
            log.info("llavabench judge %s: unparsable review on try %d", sha[:12], attempt + 1)

        scores, replies, temps, model_used = self._ask_until_parsed(
            self.llavabench_max_tries, lambda attempt: (messages, 0.2, 1024), parse_llavabench_scores, miss)
        failed = scores is None
        if failed:
            log.warning("llavabench judge %s: no scores after %d tries; recording (-1, -1)", sha[:12], len(replies))
        final = list(scores) if scores else [-1.0, -1.0]
        judgement = Judgement("llavabench", final, replies, temps, failed, model_used)
        self.cache.put(self.name, sha, json.dumps(messages, ensure_ascii=False), judgement)
        return judgement

    def _ask_until_parsed(self, tries: int, ask: Callable[[int], tuple[list[dict[str, str]], float, int]],
                          parse: Callable[[str], Any], miss: Callable[[int, float], None]
                          ) -> tuple[Any, list[str], list[float], str | None]:
        """Up to ``tries`` chat requests, try ``a`` sending ``ask(a) = (messages, temperature, max_tokens)``, until
        ``parse(reply)`` is not ``None`` (``miss(a, temperature)`` after each reply that does not parse); returns
        ``(parsed or None, replies, temperatures, model reported by the server)``."""
        replies: list[str] = []
        temps: list[float] = []
        parsed, model_used = None, None
        for attempt in range(tries):
            msgs, temperature, max_tokens = ask(attempt)
            reply, model_used = self._chat(msgs, temperature=temperature, max_tokens=max_tokens)
            replies.append(reply)
            temps.append(temperature)
            parsed = parse(reply)
            if parsed is not None:
                break
            miss(attempt, temperature)
        return parsed, replies, temps, model_used

    def _cached(self, sha: str) -> Judgement | None:
        """A cached judgement for this model and prompt, marked ``cached=True``."""
        hit = self.cache.get(self.name, sha)
        if hit is None:
            return None
        self.cache_hits += 1
        hit.cached = True
        log.debug("judge cache hit %s", sha[:12])
        return hit

    # ------------------------------------------------------------------------------------ transport

    def _redact(self, text: str) -> str:
        """``text`` without the API key or anything that looks like one."""
        if self._key is not None:
            text = text.replace(self._key.reveal(), "***")
        return _KEY_LIKE.sub("***", text)

    def _chat(self, messages: list[dict[str, str]], *, temperature: float, max_tokens: int) -> tuple[str, str | None]:
        """POST one chat completion; returns (content, model reported by the server)."""
        body = json.dumps(
            {"model": self.name, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        ).encode("utf-8")
        last = ""
        for attempt in range(1, self.http_retries + 1):
            request = urllib.request.Request(
                f"{self.base_url}/chat/completions", data=body, method="POST",
                headers={"Content-Type": "application/json"},
            )
            if self._key is not None:
                request.add_unredirected_header("Authorization", f"Bearer {self._key.reveal()}")
            self.requests_sent += 1
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read().decode("utf-8"))
                content = payload["choices"][0]["message"]["content"]
                return ("" if content is None else str(content)), payload.get("model")
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:500].decode("utf-8", "replace") if exc.fp is not None else ""
                last = self._redact(f"HTTP {exc.code}: {detail}")
                if exc.code != 429 and exc.code < 500:
                    raise JudgeError(f"judge request to {self.base_url} failed: {last}") from None
            except (urllib.error.URLError, OSError) as exc:
                last = self._redact(f"{type(exc).__name__}: {exc}")
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                last = self._redact(f"malformed response: {type(exc).__name__}: {exc}")
            log.warning("judge request attempt %d/%d failed: %s", attempt, self.http_retries, last)
            if attempt < self.http_retries:
                time.sleep(self.retry_backoff_s * attempt)
        raise JudgeError(f"judge request to {self.base_url} failed after {self.http_retries} attempts: {last}")
