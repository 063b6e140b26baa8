"""Answer normalisation shared by the metrics and the judges.

- :func:`extract_option_letter`: the option letter a free-form ScienceQA answer names ("B", "(B)",
  "The answer is B."), or ``None`` when it names none or an invalid one;
- :func:`normalize_vqa_answer`: the official VQA evaluation's normalisation (punctuation, digits for number
  words, articles dropped, contractions restored).
"""

from __future__ import annotations

import re
from typing import Callable

from ellava_lib.core.schema import MAX_CHOICES, OPTION_LETTERS

# --------------------------------------------------------------------------------------------------
# ScienceQA: option-letter extraction
# --------------------------------------------------------------------------------------------------

# The whole (stripped) prediction is a bare label: "B", "b", "B.", "B)", "B:", "(B)".
_BARE_LABEL = re.compile(r"\(([A-Za-z])\)|([A-Za-z])[.:)]?")
# The prediction opens with an upper-case label that carries a delimiter: "B. ...", "B) ...", "(B) ...".
_LEADING_LABEL = re.compile(r"(?:\(([A-Z])\)|([A-Z])[.:)])(?=\s|$)")
# "... answer is B", "Answer: (B)", "the correct option is C." (keyword case-insensitive).
_ANSWER_IS = re.compile(r"(?i:\b(?:answer|option|choice)\s*(?:is|:))\s*\(?([A-Za-z])\)?")


def _valid_letters(n_choices: int) -> str:
    """The option letters of an item with ``n_choices`` options: ``OPTION_LETTERS[:n_choices]``."""
    if not 1 <= n_choices <= MAX_CHOICES:
        raise ValueError(f"n_choices must be in 1..{MAX_CHOICES}, got {n_choices}")
    return OPTION_LETTERS[:n_choices]


def _answer_is_letter(text: str) -> str | None:
    """The letter after an "answer is" phrase, or None.

    An upper-case letter counts when no letter/digit follows it ("The answer is B, because ...");
    a lower-case one only when nothing but punctuation/whitespace follows ("the answer is b."), so
    "the answer is a red circle" is not read as option A.
    """
    for match in _ANSWER_IS.finditer(text):
        letter = match.group(1)
        rest = text[match.end():]
        if letter.isupper() and not re.match(r"[A-Za-z0-9]", rest):
            return letter
        if letter.islower() and re.fullmatch(r"[\s.,;:!?)]*", rest):
            return letter.upper()
    return None


def extract_option_letter(pred: str, n_choices: int) -> str | None:
    """The option letter (upper case) a prediction names, or None.

    Rules, tried in order on the stripped prediction; the first one that yields a letter among the
    first ``n_choices`` letters (A..E) wins:

    1. the whole prediction is a label, any case: ``B``, ``b``, ``B.``, ``B)``, ``B:``, ``(B)``;
    2. the prediction opens with an upper-case label that carries a delimiter and is followed by
       whitespace or the end: ``B. red circle``, ``(B) red circle``, ``B) ...``, ``B: ...``;
    3. an "answer is X" / "answer: X" / "option is X" / "choice is X" phrase (see
       :func:`_answer_is_letter` for the case rule).

    A bare leading word is never read as a label, so "A red circle" gives None, while "A", "A."
    and "(A) red circle" give "A". Raises ValueError unless ``1 <= n_choices <= 5``.
    """
    valid = _valid_letters(n_choices)
    text = pred.strip()
    candidates: list[Callable[[str], str | None]] = [
        lambda t: _first_group(_BARE_LABEL.fullmatch(t)),
        lambda t: _first_group(_LEADING_LABEL.match(t)),
        _answer_is_letter,
    ]
    for rule in candidates:
        letter = rule(text)
        if letter is not None and letter.upper() in valid:
            return letter.upper()
    return None


def _first_group(match: re.Match[str] | None) -> str | None:
    """The first non-empty capture group of ``match`` (None when there is no match)."""
    if match is None:
        return None
    return next((g for g in match.groups() if g), None)


# --------------------------------------------------------------------------------------------------
# VizWiz / VQA: official answer normalization and accuracy
# --------------------------------------------------------------------------------------------------

# Constants of the official VQA / VizWiz evaluation (vqaEval.py). The contractions map uses straight
# apostrophes (as in the VQA-Challenge / EvalAI release); some older copies carry typographic ones.
# Keys with a capital "I" are kept for fidelity although the lookup runs on lower-cased words.
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
# Official manualMap: note that "none" also maps to "0".
_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
# VizWiz / VQA v2 punctuation list (no period, apostrophe or colon: those are kept or handled apart).
_PUNCT: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)
# Official regexes, verbatim in behaviour. ``(?!<=\d)`` is a (buggy) lookahead, not a lookbehind, so
# in effect a period is dropped unless a digit follows it: "3.5" keeps it, "3." and "cat." lose it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    """Official ``processPunctuation``.

    For each mark p in the punctuation list: if ``p + " "`` or ``" " + p`` occurs in the *input*, or the
    input contains a digit-comma-digit group, every p is deleted; otherwise every p becomes a space.
    Then periods not followed by a digit are deleted.
    """
    out = text
    strip_all = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if strip_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, split on whitespace, number words -> digits, drop
    articles, expand contractions, join with single spaces."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(ans: str) -> str:
    """Official VQA/VizWiz answer normalization.

    ``processDigitArticle(processPunctuation(ans.replace("\\n", " ").replace("\\t", " ").strip()))``.
    Examples: "Two" -> "2", "the cat." -> "cat", "3.5" -> "3.5", "1,000" -> "1000", "dont" -> "don't",
    "yes!" -> "yes".
    """
    text = ans.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))
