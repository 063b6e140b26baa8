"""The one sample schema every benchmark loader (synthetic or real) produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUITES: tuple[str, ...] = ("sqa", "vizwiz", "mmvet", "llavabench")

#: The most options a multiple-choice (``sqa``) item has: ScienceQA items have 2 to 5.
MAX_CHOICES: int = 5


def option_letter(i: int) -> str:
    """The letter naming option ``i`` (0-based) of a multiple-choice item: ``chr(ord("A") + i)``, so A, B, C, ..."""
    return chr(ord("A") + i)


#: The option letters of an item with :data:`MAX_CHOICES` options, in choice order: ``"ABCDE"``.
OPTION_LETTERS: str = "".join(option_letter(i) for i in range(MAX_CHOICES))


@dataclass
class Sample:
    """One benchmark item.

    ``answer`` is the reference answer: the option letter for ``sqa``, the majority human answer for
    ``vizwiz`` ("unanswerable" when the image cannot answer), the ground truth for ``mmvet`` and the
    reference answer for ``llavabench``. ``image`` is an RGB ``PIL.Image.Image`` (or ``None`` where a
    real item has no image).
    """

    id: str
    suite: str
    split: str
    question: str
    answer: str
    image: Any = None
    choices: list[str] = field(default_factory=list)  # sqa: option texts, in letter order (OPTION_LETTERS)
    context: str = ""  # sqa: the hint / lecture context
    answers: list[str] = field(default_factory=list)  # vizwiz: the 10 annotator answers
    answerable: bool = True  # vizwiz
    capabilities: list[str] = field(default_factory=list)  # mmvet: rec / ocr / know / gen / spat / math
    category: str = ""  # llavabench: conv / detail / complex; synthetic suites: question type
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"unknown suite {self.suite!r}; expected one of {', '.join(SUITES)}")
