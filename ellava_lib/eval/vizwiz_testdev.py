"""VizWiz-VQA test-dev predictions in the EvalAI submission format (answers withheld: scored by the server only).

The kit scores VizWiz on the labelled **val** split (every reported VizWiz number is a val number); LLaVA-1.5's
paper reports **test-dev**, scored by uploading predictions to EvalAI. This module writes that upload file from the
manifest's ``test`` split (lmms-lab/VizWiz-VQA ``test``, 8000 rows, the same columns with no answers), as
haotian-liu/LLaVA ``scripts/convert_vizwiz_for_submission.py`` does: a JSON list with one object per question,
``{"image": "<image file name>", "answer": evalai_answer(prediction)}``. The image file name is the question id,
with ``.jpg`` appended unless it has it (lmms-eval's vizwiz_vqa test task appends ``.jpg`` to ``question_id``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ellava_lib.core import files
from ellava_lib.core.schema import Sample
from ellava_lib.eval.text import normalize_vqa_answer

#: The upstream split holding the test-dev questions.
TESTDEV_SPLIT = "test"


def evalai_answer(prediction: str) -> str:
    """The EvalAI answer processing LLaVA applies before upload (``EvalAIAnswerProcessor``, from
    facebookresearch/mmf ``pythia/tasks/processors.py``): lower-case, drop ``,`` and ``?``, split ``'s`` off
    (``"'s"`` -> ``" 's"``), strip, then the VQA normalization (:func:`text.normalize_vqa_answer`)."""
    word = prediction.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_vqa_answer(word)


def submission_image(question_id: str) -> str:
    """The EvalAI ``image`` field of a question: its id as a ``.jpg`` file name (``VizWiz_test_00000000.jpg``)."""
    return question_id if question_id.lower().endswith(".jpg") else f"{question_id}.jpg"


def submission_records(samples: list[Sample], predictions: list[str]) -> list[dict[str, str]]:
    """One ``{"image", "answer"}`` object per sample, in sample order."""
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
    return [{"image": submission_image(s.id), "answer": evalai_answer(p)} for s, p in zip(samples, predictions)]


def load_testdev(data_dir: str | Path | None = None, limit: int | None = None) -> Any:
    """The test-dev questions (a :class:`~ellava_lib.data.real.LoadReport`): the VizWiz manifest's repos (or
    ``data_dir/vizwiz/`` parquet copies), split ``test``, rows without answers kept (``unlabelled``)."""
    from ellava_lib.data.real import benchmark_dir, load_real_suite

    return load_real_suite("vizwiz", split=TESTDEV_SPLIT, limit=limit, data_dir=benchmark_dir(data_dir, "vizwiz"),
                           unlabelled=True)


def write_testdev(model, processor, out: str | Path, *, data_dir: str | Path | None = None, limit: int | None = None,
                  batch_size: int = 32, progress: bool = True, prompt_format: str = "vicuna_v1",
                  image_mode: str = "pad") -> dict[str, Any]:
    """Generate answers to the test-dev questions (the same prompt, inputs and token budget as the val
    evaluation) and write the EvalAI upload file ``out`` atomically. Returns a summary (questions, skipped rows,
    source, revision) for ``eval.json``."""
    from ellava_lib.eval.evaluate import REAL_MAX_NEW_TOKENS, generate_answers

    report = load_testdev(data_dir, limit)
    if not report.samples:
        raise ValueError(f"no VizWiz test-dev questions could be loaded ({len(report.skipped)} rows skipped)")
    preds = generate_answers(model, processor, report.samples, REAL_MAX_NEW_TOKENS["vizwiz"], batch_size, progress,
                             desc="vizwiz test-dev", prompt_format=prompt_format, image_mode=image_mode)
    files.write_text(Path(out), json.dumps(submission_records(report.samples, preds)))
    return {"file": str(out), "split": report.split, "questions": len(report.samples),
            "skipped": len(report.skipped), "source": report.source, "revision": report.revision}
