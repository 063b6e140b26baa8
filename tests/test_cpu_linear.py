"""oneDNN fp32 linears for CPU inference: same outputs as ``F.linear`` to rounding, used only where no
gradient is needed and enough rows make it pay, and the class is restored after the block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ellava_lib.model import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="this torch build has no oneDNN")


def test_fast_path_matches_f_linear_and_is_restored(monkeypatch):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __getattr__(self, name):
            if name == "_linear_pointwise":
                return lambda *a: calls.append(a[0].shape) or real(*a)
            return getattr(torch.ops.mkldnn, name)

    monkeypatch.setattr(kernels.torch.ops, "mkldnn", Spy(), raising=False)
    lin = nn.Linear(352, 128)
    x = torch.randn(4, 64, 352)
    ref = lin(x)
    original = nn.Linear.forward
    with torch.no_grad(), kernels.onednn_linear():
        assert nn.Linear.forward is not original
        with kernels.onednn_linear():  # re-entrant
            fast = lin(x)
        small = lin(x[:1, :8])  # 8 rows: below MIN_ROWS, the usual path
        assert nn.Linear.forward is not original
    assert nn.Linear.forward is original
    assert calls == [x.shape]
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small, ref[:1, :8], atol=1e-6, rtol=1e-6)


def test_gradients_and_errors_take_the_usual_path():
    lin = nn.Linear(128, 128)
    x = torch.randn(256, 128, requires_grad=True)
    with kernels.onednn_linear():
        y = lin(x)  # autograd needs it: F.linear, so backward works
        y.sum().backward()
        assert x.grad is not None and lin.weight.grad is not None
        assert not kernels._fast(x.detach().double(), lin.weight.double(), None)
    with pytest.raises(RuntimeError, match="boom"):
        with kernels.onednn_linear():
            raise RuntimeError("boom")
    assert nn.Linear.forward is kernels._ORIGINAL
    with kernels.onednn_linear(enabled=False):
        assert nn.Linear.forward is kernels._ORIGINAL
