"""Calibration samples of the synthetic suite and their encoding as one batch.

The calibration set is ``n`` samples of the synthetic ``calib`` split (disjoint from train and test),
balanced across suites: suite ``k`` of ``K`` gets ``n // K`` samples, plus one for the first ``n % K``
suites, drawn without replacement from the first ``pool_size`` items of its split with
``random.Random(f"calib/{seed}/{suite}")``. :func:`calibration_fingerprint` hashes an encoded batch, so a
level database or a search can check it is reused on the same rows.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import numpy as np
import torch

from ellava_lib.core.schema import SUITES, Sample
from ellava_lib.data import synth
from ellava_lib.data.encoding import Batchable, collate, encode_pair, pad_right
from ellava_lib.data.prompts import sample_prompt
from ellava_lib.data.real_image import prepare_image

#: Per-suite pool the calibration samples are drawn from (the first items of each ``calib`` split).
POOL_SIZE = 256


def pool_capacity(suites: Sequence[str] = SUITES, pool_size: int = POOL_SIZE) -> int:
    """Largest ``n`` :func:`draw_calibration` accepts."""
    return pool_size * len(suites)


def draw_calibration(n: int, seed: int, suites: Sequence[str] = SUITES, pool_size: int = POOL_SIZE,
                     data_seed: int = 0) -> list[Sample]:
    """``n`` rendered samples of the ``calib`` split, balanced across ``suites`` and drawn with ``seed``.

    ``data_seed`` is the generator seed of the synthetic suite (keep 0: the tiny model's vocabulary is
    built from it). Sample ids (``{suite}-calib-{index}``) identify the draw.
    """
    suites = tuple(suites)
    if not suites:
        raise ValueError("no suites to draw calibration samples from")
    for s in suites:
        synth.check_suite_split(s, "calib")
    if n <= 0:
        raise ValueError(f"the number of calibration samples must be positive, got {n}")
    if n > pool_capacity(suites, pool_size):
        raise ValueError(f"{n} calibration samples exceed the calibration pool ({pool_size} per suite x "
                         f"{len(suites)} suites = {pool_capacity(suites, pool_size)})")
    out: list[Sample] = []
    for k, suite in enumerate(suites):
        quota = n // len(suites) + (1 if k < n % len(suites) else 0)
        if quota == 0:
            continue
        picks = sorted(random.Random(f"calib/{seed}/{suite}").sample(range(pool_size), quota))
        items = synth.generate_items(suite, "calib", picks[-1] + 1, data_seed)
        out += [synth.to_sample(items[i], suite, "calib", i) for i in picks]
    return out


def encode_calibration(samples: Sequence[Sample], processor) -> dict[str, torch.Tensor]:
    """One right-padded batch: ``input_ids, attention_mask, labels, pixel_values``.

    Each row is ``sample_prompt(s) + " " + answer + eos`` with ``<image>`` expanded (``eos`` = the tokenizer's
    end token, ``</s>`` for the tiny model); ``labels`` are the answer tokens and ``eos``, ``-100`` elsewhere.
    Same encoding as the trainer (:func:`encoding.encode_pair`, :func:`encoding.collate`).
    """
    if not samples:
        raise ValueError("no calibration samples to encode")
    ids, n_prompt, images = [], [], []
    for s in samples:
        if s.image is None:
            raise ValueError(f"calibration sample {s.id} has no image")
        seq, n_p = encode_pair(processor.tokenizer, sample_prompt(s), s.answer)
        ids.append(seq)
        n_prompt.append(n_p)
        images.append(np.asarray(s.image.convert("RGB")))
    data = Batchable(torch.from_numpy(np.stack(images)), ids, n_prompt, torch.empty(0), torch.empty(0))
    return collate(data, list(range(len(samples))), processor.tokenizer.pad_token_id)


def encode_with_processor(samples: Sequence[Sample], processor, prompt_format: str = "vicuna_v1",
                          image_mode: str = "pad") -> dict[str, torch.Tensor]:
    """The same batch as :func:`encode_calibration` for any LLaVA processor (hub checkpoints, real images).

    Each row is the processor's encoding of ``sample_prompt(s, prompt_format)`` (its ``<image>`` expansion and pixel
    preprocessing of the image prepared by ``image_mode``) followed by the tokens of the answer and ``eos``;
    ``labels`` are those answer tokens. The defaults are the real benchmarks' evaluation inputs (LLaVA-1.5's
    ``vicuna_v1`` conversation, pad-to-square: ``evaluate.input_format("real")``), so calibration sees what the
    evaluation will.
    """
    if not samples:
        raise ValueError("no calibration samples to encode")
    tok = processor.tokenizer
    seqs, n_prompt, pixels = [], [], []
    for s in samples:
        if s.image is None:
            raise ValueError(f"calibration sample {s.id} has no image")
        image = prepare_image(s.image.convert("RGB"), processor, image_mode)
        enc = processor(text=sample_prompt(s, prompt_format), images=image, return_tensors="pt")
        prompt = enc["input_ids"][0]
        answer = torch.tensor(tok(s.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        seqs.append(torch.cat([prompt, answer.to(prompt.dtype)]))
        n_prompt.append(len(prompt))
        pixels.append(enc["pixel_values"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return {**pad_right(seqs, n_prompt, pad), "pixel_values": torch.cat(pixels)}


def calibration_fingerprint(batch: dict[str, torch.Tensor]) -> str:
    """12 hex chars of sha1 over the batch's token ids, labels and pixels (identifies the calibration data)."""
    h = hashlib.sha1()
    for key in ("input_ids", "labels", "pixel_values"):
        if key in batch:
            h.update(batch[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]
