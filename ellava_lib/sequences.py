"""Token sequences labelled on their answer: encode ``prompt + answer`` and right-pad a batch of them.

The one encoding and padding routine of the training stages (:mod:`train`, :mod:`lm_tasks`) and of the
calibration batches (:mod:`calibration`), so the labels the search scores are the labels the model was
trained on.
"""

from __future__ import annotations

import torch

from . import scenes


def encode_pair(tokenizer, prompt: str, answer: str) -> tuple[torch.Tensor, int]:
    """Token ids of ``prompt + " " + answer + " </s>"`` (``<image>`` expanded to one token per patch) and the
    number of prompt tokens (labels start there)."""
    prompt = prompt.replace("<image>", "<image>" * (scenes.GRID * scenes.GRID))
    p = tokenizer(prompt)["input_ids"]
    a = tokenizer(f" {answer} </s>", add_special_tokens=False)["input_ids"]
    return torch.tensor(p + a), len(p)


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
