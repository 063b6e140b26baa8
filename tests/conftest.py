"""Shared fixtures: a micro LLaVA trained in seconds, reused by every test that needs a model."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import torch

from ellava_lib.data import calibration
from ellava_lib.model.specs import build_or_load
from ellava_lib.model.train import TrainConfig

# One intra-op thread: the models here are tiny (two threads only add overhead), and results that depend
# on floating-point reduction order are then identical run to run.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory):
    """Folder of a micro tiny-LLaVA (trained from scratch in seconds, cached for the session)."""
    return build_or_load(TrainConfig.micro(), cache=tmp_path_factory.mktemp("cache"), progress=False)


@pytest.fixture(scope="session")
def micro_model(micro_model_dir):
    from ellava_lib.model.specs import load_model

    return load_model(micro_model_dir)


@pytest.fixture(scope="module")
def calib(micro_model):
    """The micro model's calibration batch: 16 samples drawn with seed 0, encoded by its processor (one per
    test module, so no module sees another's batch)."""
    _, proc = micro_model
    return calibration.encode_calibration(calibration.draw_calibration(16, 0), proc)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse every non-loopback connection (nothing may download from the hub)."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else None
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise RuntimeError(f"test tried to reach the network: {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
