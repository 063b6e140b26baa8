"""oneDNN fp32 linears for CPU inference: same outputs as ``F.linear`` to rounding, used only where no
gradient is needed and enough rows make it pay, only for the layers of the model given, and the layers are
restored after the block (``nn.Linear`` itself is never touched)."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ellava_lib.model import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="this torch build has no oneDNN")

ORIGINAL = nn.Linear.forward


@pytest.fixture
def onednn_calls(monkeypatch) -> list[torch.Tensor]:
    """The weight of every call to ``torch.ops.mkldnn._linear_pointwise`` (which still computes)."""
    calls: list[torch.Tensor] = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __getattr__(self, name):
            if name == "_linear_pointwise":
                return lambda *a: calls.append(a[1]) or real(*a)
            return getattr(torch.ops.mkldnn, name)

    monkeypatch.setattr(kernels.torch.ops, "mkldnn", Spy(), raising=False)
    return calls


def _routed(layer: nn.Linear) -> bool:
    return "forward" in layer.__dict__


def test_fast_path_matches_f_linear_and_is_restored(onednn_calls):
    lin = nn.Linear(352, 128)
    model = nn.Sequential(lin)
    x = torch.randn(4, 64, 352)
    ref = lin(x)
    with torch.no_grad(), kernels.onednn_linears(model):
        assert _routed(lin) and nn.Linear.forward is ORIGINAL
        with kernels.onednn_linears(model):  # re-entrant
            fast = lin(x)
        small = lin(x[:1, :8])  # 8 rows: below MIN_ROWS, the usual path
        assert _routed(lin)  # the inner block's exit left the outer block's routing in place
    assert not _routed(lin) and nn.Linear.forward is ORIGINAL
    assert [w is lin.weight for w in onednn_calls] == [True]
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small, ref[:1, :8], atol=1e-6, rtol=1e-6)


def test_gradients_and_errors_take_the_usual_path():
    lin = nn.Linear(128, 128)
    x = torch.randn(256, 128, requires_grad=True)
    with kernels.onednn_linears(lin):
        y = lin(x)  # autograd needs it: F.linear, so backward works
        y.sum().backward()
        assert x.grad is not None and lin.weight.grad is not None
        assert not kernels._fast(x.detach().double(), lin.weight.double(), None)
    with pytest.raises(RuntimeError, match="boom"):
        with kernels.onednn_linears(lin):
            raise RuntimeError("boom")
    assert not _routed(lin) and nn.Linear.forward is ORIGINAL
    with kernels.onednn_linears(lin, enabled=False):
        assert not _routed(lin) and nn.Linear.forward is ORIGINAL


def test_only_layers_running_nn_linear_forward_are_routed(onednn_calls):
    """A subclass with its own ``forward`` and a layer whose ``forward`` is already replaced on the instance
    (as an offload hook does) keep theirs, before, during and after the block."""

    class Doubled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * F.linear(x, self.weight, self.bias)

    plain, doubled, hooked = nn.Linear(64, 64), Doubled(64, 64), nn.Linear(64, 64)
    own = hooked.forward
    hooked.forward = own
    model = nn.Sequential(plain, doubled, hooked)
    x = torch.randn(256, 64)
    with torch.no_grad(), kernels.onednn_linears(model):
        assert _routed(plain) and not _routed(doubled) and hooked.forward is own
        model(x)
    assert [w is plain.weight for w in onednn_calls] == [True]
    assert not _routed(plain) and not _routed(doubled) and hooked.__dict__["forward"] is own


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 352), nn.ReLU(), nn.Linear(352, 128))


def _reference(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` through plain ``F.linear``."""
    h = F.relu(F.linear(x, model[0].weight, model[0].bias))
    return F.linear(h, model[2].weight, model[2].bias)


def test_swap_is_per_model_and_thread_safe(onednn_calls):
    """Thread A runs model A inside the swap while thread B runs model B outside it, concurrently: B computes
    exactly ``F.linear`` and never reaches oneDNN, ``nn.Linear.forward`` stays the original function, and A still
    matches the reference to rounding."""
    model_a, model_b = _mlp(0), _mlp(1)
    xs = [torch.randn(2, 128, 128, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    inside, b_done = threading.Event(), threading.Event()
    out_a: list[torch.Tensor] = []
    out_b: list[torch.Tensor] = []
    class_forward: list[object] = []
    errors: list[BaseException] = []

    def run_a() -> None:
        try:
            with torch.no_grad(), kernels.onednn_linears(model_a):
                inside.set()
                while not b_done.is_set() or len(out_a) < len(xs):  # keep A running until B has finished
                    out_a.append(model_a(xs[len(out_a) % len(xs)]))
                    if len(out_a) > 10_000:
                        raise TimeoutError("thread B did not finish")
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
            inside.set()

    def run_b() -> None:
        try:
            assert inside.wait(30)
            with torch.no_grad():
                for x in xs:
                    out_b.append(model_b(x))
                    class_forward.append(nn.Linear.forward)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            b_done.set()

    threads = [threading.Thread(target=run_a), threading.Thread(target=run_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(out_b) == len(xs) and len(out_a) >= len(xs)
    for x, y in zip(xs, out_b):
        assert torch.equal(y, _reference(model_b, x))
    b_weights = {id(model_b[0].weight), id(model_b[2].weight)}
    a_weights = {id(model_a[0].weight), id(model_a[2].weight)}
    assert onednn_calls and not any(id(w) in b_weights for w in onednn_calls)
    assert {id(w) for w in onednn_calls} == a_weights
    assert all(f is ORIGINAL for f in class_forward) and nn.Linear.forward is ORIGINAL
    for k, y in enumerate(out_a):
        torch.testing.assert_close(y, _reference(model_a, xs[k % len(xs)]), atol=1e-5, rtol=1e-5)
    assert not any(_routed(m) for m in (*model_a, *model_b) if isinstance(m, nn.Linear))
