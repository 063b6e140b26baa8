"""Faster fp32 linear layers for CPU inference: oneDNN's matmul instead of the BLAS ``sgemm``, one model at a time.

PyTorch's x86 CPU wheels run an fp32 ``nn.Linear`` through MKL's ``sgemm``. On CPUs MKL does not recognise
(AMD's among them) that path stays on AVX2 code; oneDNN's fp32 matmul (the kernel ``torch.compile`` emits for
CPU linears) uses AVX-512 and ran at about twice the throughput on the 2-core AMD EPYC this kit was built on
(88 vs 191 GFLOP/s at 1088 x 128 x 352 by ``benchmarks/cpu_speed.py``; its results file was not kept, so
not measured in this version).
Still fp32 throughout: outputs agree with ``sgemm``'s to rounding (the two sum in different orders), not bit
for bit.

:func:`linear` computes ``y = x W^T + b`` (``x``: ``(..., K)``, ``W``: ``(N, K)``, ``b``: ``(N,)`` or none) with
``torch.ops.mkldnn._linear_pointwise(x, W, b, "none", [], "")`` when all of these hold, and with
``F.linear(x, W, b)`` otherwise:

- ``x`` is on the CPU and both ``x`` and ``W`` are ``float32``;
- autograd does not need the result: grad mode is off, or none of ``x``, ``W``, ``b`` requires a gradient;
- ``x`` has at least ``MIN_ROWS`` rows, ``numel(x) / K >= MIN_ROWS`` (decoding one token at a time, oneDNN's
  call overhead costs more than it saves).

:func:`onednn_linears` routes the linears of ONE model through :func:`linear` for the duration of a ``with``
block: each ``nn.Linear`` inside the model whose ``forward`` is ``nn.Linear.forward`` itself (not overridden
by a subclass, not already replaced on the instance, e.g. by an offload hook) gets an instance attribute
``forward`` that calls :func:`linear` with its own weight and bias; on exit (also on an exception) the
attribute is deleted again, so the layer is back to its class's ``forward``. The class ``nn.Linear`` and
every other module in the process are never touched, so other models and other threads see the usual
``F.linear``. The swap is counted per layer under a lock, so nested or concurrent blocks over the same model
restore the layer only when the last of them exits. The search's candidate scoring
(:func:`ellava_lib.search.objective.model_logits`) and evaluation
(:func:`ellava_lib.eval.evaluate.generate_answers`) use it.
"""

from __future__ import annotations

import contextlib
import threading
import types
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 128  # below this many rows (tokens x batch) sgemm was as fast or faster

_lock = threading.Lock()
#: layer -> number of open :func:`onednn_linears` blocks that route it through :func:`linear`
_routed: weakref.WeakKeyDictionary[nn.Linear, int] = weakref.WeakKeyDictionary()


def available() -> bool:
    """Whether this torch build has oneDNN's fp32 linear kernel on the CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _fast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`linear` takes oneDNN for these operands (the rule in the module docstring)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        return False
    return x.numel() // max(x.shape[-1], 1) >= MIN_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b``: oneDNN when :func:`_fast` allows it, else ``F.linear``."""
    if _fast(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The routed layer's forward: :func:`linear` with the layer's current weight and bias."""
    return linear(x, self.weight, self.bias)


def _swappable(module: nn.Module) -> bool:
    """An ``nn.Linear`` that runs ``nn.Linear.forward`` itself (or is routed already by an open block)."""
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
        return False
    return "forward" not in module.__dict__ or module in _routed


def _route(layers: list[nn.Linear]) -> None:
    """Count one more open block for each layer; give a layer the routed forward when it has none yet."""
    for layer in layers:
        if _routed.get(layer, 0) == 0:
            layer.forward = types.MethodType(_forward, layer)
        _routed[layer] = _routed.get(layer, 0) + 1


def _unroute(layers: list[nn.Linear]) -> None:
    """Count one block fewer for each layer; drop the routed forward when no block is left."""
    for layer in layers:
        _routed[layer] -= 1
        if _routed[layer] == 0:
            del _routed[layer]
            del layer.__dict__["forward"]


@contextlib.contextmanager
def onednn_linears(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, every eligible ``nn.Linear`` of ``model`` (see the module docstring) computes through
    :func:`linear`; on exit they are restored. Only ``model``'s own layers change: the class and every other
    model are left alone. Re-entrant and safe to open from several threads; a no-op when ``enabled`` is false
    or oneDNN is missing."""
    if not enabled or not available():
        yield
        return
    with _lock:
        layers = [m for m in model.modules() if _swappable(m)]
        _route(layers)
    try:
        yield
    finally:
        with _lock:
            _unroute(layers)
