"""Shared fixtures: a micro LLaVA trained in seconds, reused by every test that needs a model."""

from __future__ import annotations

import pytest
import torch

from ellava_lib.train import TrainConfig, build_or_load

# One intra-op thread: the models here are tiny (two threads only add overhead), and results that depend
# on floating-point reduction order are then identical run to run.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory):
    """Folder of a micro tiny-LLaVA (trained from scratch in seconds, cached for the session)."""
    return build_or_load(TrainConfig.micro(), cache=tmp_path_factory.mktemp("cache"), progress=False)


@pytest.fixture(scope="session")
def micro_model(micro_model_dir):
    from ellava_lib.loading import load_model

    return load_model(micro_model_dir)
