"""The task scorer a search's guard reads (:data:`ellava_lib.search.evolve.TaskScore`): the generated answers of
calibration rows, scored by the suites' metrics as the tables score test items."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ellava_lib.core.schema import Sample
from ellava_lib.eval.evaluate import generation_budget, input_format, task_scores
from ellava_lib.eval.judge import Judge
from ellava_lib.run.tier import Tier


def calibration_task_scorer(tier: Tier, processor: Any, samples: Sequence[Sample], judge: Judge,
                            batch_size: int = 32):
    """``task_score(model, rows)``: each calibration row's contribution to the unweighted suite mean of
    ``samples[rows]`` (:func:`ellava_lib.eval.evaluate.task_scores`), answered by ``model`` as it is, with the
    tier's prompt format, image mode and generation budget (what the ``calib`` column and the test evaluation use).
    The rows index ``samples`` (the calibration batch's rows, in order)."""
    fmt = input_format(tier.data)
    budget = generation_budget(tier.data)

    def task_score(model: nn.Module, rows: Sequence[int]) -> list[float]:
        return task_scores(model, processor, [samples[i] for i in rows], judge, batch_size, budget, **fmt)

    return task_score
