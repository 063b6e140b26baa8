"""What becomes of a searched policy at the end of a search: the *exact* model.

During the search every candidate is *assembled* from the level database: each unit's weights were pruned by
SparseGPT on the **dense** model's block inputs, one unit at a time. The exact model instead re-prunes the best
policy sequentially with SparseGPT (:func:`prune.prune_model` with ``sequential=True``): block ``b`` is pruned on
the outputs of the already pruned blocks ``< b``, as one-shot SparseGPT does, and the search's final projector
(when it evolved one) is loaded first, so every block sees the activations of the model that will be used.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ellava_lib.core.policy import Policy
from ellava_lib.prune.prune import prune_model
from ellava_lib.search.projector import load_projector, set_projector_state


def exact_reprune(dense: nn.Module, policy: Policy, projector: Path | None, batch: dict[str, torch.Tensor],
                  progress: bool = False) -> pd.DataFrame:
    """Turn ``dense`` (a freshly loaded dense model, in place) into the exact model of a searched ``policy``:
    load the searched ``projector`` file (:func:`projector.load_projector`; ``None``: keep the model's own),
    then prune every unit ``u`` (block or matrix unit, :func:`units.policy_linears`) to ``policy.sparsities[u]``
    with SparseGPT, block by block on the calibration ``batch``, each block on the outputs of the pruned ones
    before it. Returns the sparsity report (:func:`prune.prune_model`)."""
    if projector is not None:
        set_projector_state(dense, load_projector(projector)[0])
    return prune_model(dense, policy, "sparsegpt", batch, sequential=True, progress=progress)
