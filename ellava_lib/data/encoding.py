"""Batches labelled on their answer: token sequences, right padding, length-grouped batching, pixel values.

``prompt + answer`` is encoded as one sequence whose labels are the answer tokens (``-100`` elsewhere); a batch
is right-padded (:func:`pad_right`) and carries CLIP-normalised pixel values ``(x / 255 - mean) / std``
(:func:`pixel_values`, :func:`collate`). The one encoding and padding routine of the training stages
(:mod:`ellava_lib.model.train`, :mod:`ellava_lib.model.lm_tasks`) and of the calibration batches
(:mod:`ellava_lib.data.calibration`), so the labels the search scores are the labels the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ellava_lib.data import scenes


def encode_pair(tokenizer, prompt: str, answer: str) -> tuple[torch.Tensor, int]:
    """Token ids of ``prompt + " " + answer + eos`` (``eos`` = ``tokenizer.eos_token``, right after the answer;
    ``<image>`` expanded to one token per patch) and the number of prompt tokens (labels start there).

    The end marker is the tokenizer's own: ``</s>`` for the tiny word-level tokenizer (whose pre-tokenizer drops
    the spaces, so this equals the former ``" {answer} </s>"`` token for token), ``<|im_end|>`` for SmolLM2, whose
    byte-level BPE would turn a space before it into a token of its own."""
    prompt = prompt.replace("<image>", "<image>" * (scenes.GRID * scenes.GRID))
    p = tokenizer(prompt)["input_ids"]
    a = tokenizer(f" {answer}{tokenizer.eos_token}", add_special_tokens=False)["input_ids"]
    return torch.tensor(p + a), len(p)


def encode_pairs(tokenizer, prompts: list[str], answers: list[str]) -> list[tuple[torch.Tensor, int]]:
    """:func:`encode_pair` of every ``(prompts[i], answers[i])``, tokenised in two batched calls of the fast
    tokenizer's Rust backend (``backend_tokenizer.encode_batch``: the same ids as one ``tokenizer(text)`` call
    per text, the special tokens added by the same post-processor, without the per-call Python overhead)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        return []
    expanded = [q.replace("<image>", "<image>" * (scenes.GRID * scenes.GRID)) for q in prompts]
    backend = tokenizer.backend_tokenizer
    ps = [e.ids for e in backend.encode_batch(expanded, add_special_tokens=True)]
    As = [e.ids for e in backend.encode_batch([f" {a}{tokenizer.eos_token}" for a in answers],
                                              add_special_tokens=False)]
    return [(torch.tensor(p + a), len(p)) for p, a in zip(ps, As)]


def pad_right(seqs: list[torch.Tensor], n_prompt: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels``: row ``r`` holds ``seqs[r]``, labelled
    from position ``n_prompt[r]`` on (the answer), ``-100`` on the prompt and the padding."""
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, (s, n_p) in enumerate(zip(seqs, n_prompt)):
        input_ids[r, : len(s)] = s
        labels[r, n_p: len(s)] = s[n_p:]
        mask[r, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class LengthGroupedBatches:
    """Random batches of similar length, to cut padding: each refill draws ``group`` x ``batch_size`` indices
    uniformly (with replacement, from ``gen``), sorts them by sequence length, cuts them into ``group``
    batches and serves those in a random order. Every index is as likely as under plain uniform batches;
    only which indices share a batch changes (as in ``group_by_length`` samplers). ``group = 1`` is plain
    uniform batches."""

    def __init__(self, lengths: list[int], batch_size: int, group: int, gen: torch.Generator) -> None:
        if group < 1:
            raise ValueError(f"length group must be >= 1, got {group}")
        self.lengths = torch.tensor(lengths)
        self.batch_size, self.group, self.gen = batch_size, group, gen
        self._queue: list[list[int]] = []

    def next(self) -> list[int]:
        if not self._queue:
            idx = torch.randint(0, len(self.lengths), (self.batch_size * self.group,), generator=self.gen)
            if self.group == 1:
                return idx.tolist()
            batches = idx[torch.sort(self.lengths[idx], stable=True).indices].view(self.group, self.batch_size)
            order = torch.randperm(self.group, generator=self.gen).tolist()
            self._queue = [batches[i].tolist() for i in reversed(order)]
        return self._queue.pop()

    def state_dict(self) -> dict[str, list[list[int]]]:
        """The batches drawn but not yet served (the generator's state is its owner's to save)."""
        return {"queue": [list(b) for b in self._queue]}

    def load_state_dict(self, state: dict[str, list[list[int]]]) -> None:
        """Serve ``state["queue"]`` next, as the batcher that saved it would have."""
        self._queue = [[int(i) for i in b] for b in state["queue"]]
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalization, as llava-hf uses
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Batchable:
    """The tokenised train split: images (uint8 NHWC), token ids, answer-label masks, cell labels, and the
    text-only version of the items (scene described in words, no image) for language pretraining."""

    images: torch.Tensor
    ids: list[torch.Tensor]
    n_prompt: list[int]
    colour: torch.Tensor
    kind: torch.Tensor
    text_ids: list[torch.Tensor] = field(default_factory=list)
    text_n_prompt: list[int] = field(default_factory=list)
    value: list[list[int]] = field(default_factory=list)  # per image item: ids of the correct option's words
    text_value: list[list[int]] = field(default_factory=list)  # the same per text item ([] outside sqa)
    drill_ids: list[torch.Tensor] = field(default_factory=list)
    drill_n_prompt: list[int] = field(default_factory=list)
    drill_value: list[list[int]] = field(default_factory=list)


def pixel_values(images_u8: torch.Tensor) -> torch.Tensor:
    """NHWC uint8 -> normalised NCHW float, identical to the CLIP image processor at native size:
    ``(x / 255 - mean) / std``."""
    x = images_u8.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def collate(data: Batchable, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded image batch with labels = ids on answer tokens, -100 elsewhere."""
    batch = pad_right([data.ids[i] for i in idx], [data.n_prompt[i] for i in idx], pad_id)
    batch["pixel_values"] = pixel_values(data.images[idx])
    return batch
