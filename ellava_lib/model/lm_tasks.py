"""Language-model pretraining tasks of the tiny build (used by :mod:`train`'s induction and text stages).

- copy sequences ``<s> w_1..w_n w_1..w_n`` (:func:`induction_batch`), which form induction heads;
- option-matching drills of the multiple-choice items (:func:`drill_text`): the value is given, only its
  letter is asked;
- the logit-lens *value loss* (:func:`value_loss`): a decoder layer's state at the answer position must already
  name the correct option's words, so the value is formed before the layers that match it to a letter.

``benchmarks/sqa_probe.py`` measures each of them on the language model alone.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ellava_lib.core.schema import OPTION_LETTERS
from ellava_lib.data import synth
from ellava_lib.data.encoding import pad_right
from ellava_lib.data.prompts import SQA_SUFFIX
from ellava_lib.model import tiny


def content_word_ids(tokenizer) -> list[int]:
    """Ids of the vocabulary's words (special tokens and punctuation excluded), sorted by id."""
    specials = set(tiny.SPECIALS)
    return sorted(i for w, i in tokenizer.get_vocab().items() if w not in specials and any(c.isalnum() for c in w))


def induction_batch(word_ids: list[int], size: int, rng: random.Random, bos: int, pad: int,
                    lengths: tuple[int, int] = (8, 16)) -> dict[str, torch.Tensor]:
    """A batch of copy sequences ``<s> w_1..w_n w_1 w_2..w_n`` (``n`` uniform in ``lengths``, words drawn
    from ``word_ids``); labels on ``w_2..w_n`` of the copy, where the next word is predictable only by
    finding the current word earlier in the sequence and reading what followed it (an induction head)."""
    seqs, n_prompt = [], []
    for _ in range(size):
        ws = [rng.choice(word_ids) for _ in range(rng.randint(*lengths))]
        seqs.append(torch.tensor([bos, *ws, *ws]))
        n_prompt.append(len(ws) + 2)  # <s>, the words, and the copy's first word
    return pad_right(seqs, n_prompt, pad)


def drill_text(item: synth.Item) -> str:
    """The option-matching drill of a multiple-choice item: the answer's value is given and only its letter is
    asked (``Which option is {value} ?`` + the options + the ScienceQA instruction)."""
    value = item.choices[OPTION_LETTERS.index(item.answer)]
    options = "\n".join(f"{OPTION_LETTERS[j]}. {c}" for j, c in enumerate(item.choices))
    return f"Which option is {value} ?\n{options}\n{SQA_SUFFIX}"


def value_ids(tokenizer, item: synth.Item) -> list[int]:
    """Token ids of the correct option's words of a multiple-choice item (``[]`` for an open item)."""
    if not item.choices:
        return []
    return tokenizer(" " + item.choices[OPTION_LETTERS.index(item.answer)], add_special_tokens=False)["input_ids"]


def value_loss(model, hidden: torch.Tensor, answer_pos: list[int], values: list[list[int]],
               norm: float | None = None) -> torch.Tensor | None:
    """Logit-lens loss on the rows B' that have a value: with ``h_b`` the layer state at row b's answer
    position and ``V_b`` the ids of its correct option's words,
    ``(1/|B'|) sum_{b in B'} (1/|V_b|) sum_{w in V_b} -log softmax(W_out norm(h_b))_w``
    (``norm`` replaces ``|B'|`` when given). None when no row has a value."""
    rows = [r for r, v in enumerate(values) if v]
    if not rows:
        return None
    h = hidden[rows, [answer_pos[r] for r in rows]]
    logp = F.log_softmax(model.lm_head(model.model.language_model.norm(h)).float(), -1)
    return torch.stack([-logp[k, values[r]].mean() for k, r in enumerate(rows)]).sum() / (norm or len(rows))
