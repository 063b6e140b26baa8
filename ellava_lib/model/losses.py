"""Training and calibration losses of a LLaVA batch.

- :func:`per_sample_ce`: per-sample answer cross-entropy ``l_b = (1/|A_b|) sum_{t in A_b} -log p(y_t | y_<t)``,
  ``A_b`` the positions of sample ``b`` whose label is not ``-100``; the logits are upcast to fp32 first.
- :func:`answer_loss`: its mean over the batch, ``(1/B) sum_b l_b`` (the training loss; a short answer weighs
  as much as a long one).
- :func:`calibration_loss`: the model's own ``labels=`` path, the *token* mean over the whole batch,
  ``sum_b sum_{t in A_b} -log p(y_t | y_<t) / sum_b |A_b|`` (one float).
- :class:`CellHeads` / :func:`alignment_loss`: the tiny build's vision and alignment stages, per-patch
  cross-entropy of the colour and kind of the object in each 16-pixel cell, ``CE(colour) + CE(kind)``.
- :func:`model_inputs`: the keys of an encoded batch a LLaVA forward accepts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ellava_lib.data import scenes


@torch.no_grad()
def calibration_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Token-mean answer cross-entropy of ``model`` on the batch, ``sum_b sum_{t in A_b} -log p(y_t | y_<t) /
    sum_b |A_b|`` over the answer positions (``labels != -100``), by the model's own ``labels=`` loss."""
    model.eval()
    out = model(**model_inputs(batch), labels=batch["labels"], use_cache=False)
    return float(out.loss)


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of an encoded batch a LLaVA forward takes (``input_ids``, ``attention_mask``,
    ``pixel_values``; not ``labels``)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}


class CellHeads(torch.nn.Module):
    """Linear per-patch classifiers for vision pretraining (colour and kind of the object in the cell)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.colour = torch.nn.Linear(hidden, scenes.N_COLOUR_LABELS)
        self.kind = torch.nn.Linear(hidden, scenes.N_KIND_LABELS)

    def loss(self, patch_feats: torch.Tensor, colour: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
        lc = F.cross_entropy(self.colour(patch_feats).float().flatten(0, 1), colour.flatten(), ignore_index=-100)
        lk = F.cross_entropy(self.kind(patch_feats).float().flatten(0, 1), kind.flatten(), ignore_index=-100)
        return lc + lk


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """``(B, T-1)`` bool: position ``t`` predicts an answer token (``labels[:, t+1] != -100``)."""
    return labels[:, 1:] != -100


def per_sample_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` per-sample mean answer-token cross-entropy
    ``l_b = (1/|A_b|) sum_{t in A_b} -log p(y_{t+1} | y_<=t)``, ``A_b`` = :func:`answer_mask` of sample ``b``
    (``|A_b|`` clamped to 1: a sample without answer tokens scores 0). Logits in fp32 even when the forward
    ran in bf16."""
    logits, target = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=-100, reduction="none")
    mask = answer_mask(labels)
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(1/B) sum_b l_b``, the batch mean of :func:`per_sample_ce`: unlike the token mean, a one-word answer
    weighs as much as a long description."""
    return per_sample_ce(logits, labels).mean()


def cell_word_ids(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Lookup tables from cell labels (see ``scenes.cell_labels``) to the token id of the word naming them:
    colour label -> colour word (glyphs -> "white"), kind label -> shape word or the glyph's character;
    the empty label maps to -100 (ignored). A word's id is the first token of ``" " + word`` (:func:`word_id`)."""
    colour = [-100] + [word_id(tokenizer, c) for c in scenes.COLOURS] + [word_id(tokenizer, "white")]
    kind = [-100] + [word_id(tokenizer, s) for s in scenes.SHAPES] + [word_id(tokenizer, g.lower())
                                                                      for g in scenes.GLYPHS]
    return torch.tensor(colour), torch.tensor(kind)


def word_id(tokenizer, word: str) -> int:
    """The id of the first token of ``" " + word``, the form the word takes inside an answer: the word itself for
    the tiny word-level tokenizer, ``"Ġred"`` (not ``"red"``) for a byte-level BPE such as SmolLM2's."""
    return tokenizer(f" {word}", add_special_tokens=False)["input_ids"][0]


def alignment_loss(model, feats: torch.Tensor, colour: torch.Tensor, kind: torch.Tensor,
                   words: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``CE(z E^T, colour word) + CE(z E^T, kind word)`` for projected patches ``z`` (ignoring empty cells)."""
    z = model.model.multi_modal_projector(feats)
    logits = (z @ model.get_input_embeddings().weight.T).float().flatten(0, 1)
    cw = torch.where(colour >= 0, words[0][colour.clamp(min=0)], -100).flatten()
    kw = torch.where(kind >= 0, words[1][kind.clamp(min=0)], -100).flatten()
    return F.cross_entropy(logits, cw, ignore_index=-100) + F.cross_entropy(logits, kw, ignore_index=-100)


def patch_features(model, pixels: torch.Tensor) -> torch.Tensor:
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    return out.hidden_states[-1][:, 1:]  # the layer and the CLS-dropping the projector sees
