"""Faster fp32 linear layers for CPU inference: oneDNN's matmul instead of the BLAS ``sgemm``.

PyTorch's x86 CPU wheels run an fp32 ``nn.Linear`` through MKL's ``sgemm``. On CPUs MKL does not recognise
(AMD's among them) that path stays on AVX2 code; oneDNN's fp32 matmul (the kernel ``torch.compile`` emits for
CPU linears) uses AVX-512 and ran at about twice the throughput on the 2-core AMD EPYC this kit was built on
(``benchmarks/cpu_speed.py`` -> ``benchmarks/results/cpu_speed.json``: 88 vs 191 GFLOP/s at 1088 x 128 x 352). Still fp32 throughout: outputs agree with ``sgemm``'s to rounding
(the two sum in different orders), not bit for bit.

:func:`onednn_linear` routes ``y = x W^T + b`` through oneDNN for the duration of a ``with`` block, for
inference only: when autograd needs the result, for non-CPU or non-fp32 tensors, and for fewer than
``MIN_ROWS`` input rows (decoding one token at a time, where oneDNN's call overhead costs more than it
saves) the layer runs as usual. The search's candidate scoring (:func:`objective.model_logits`) and
evaluation (:func:`evaluate.generate_answers`) use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 128  # below this many rows (tokens x batch) sgemm was as fast or faster


def available() -> bool:
    """Whether this torch build has oneDNN's fp32 linear kernel on the CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _fast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return x.numel() // max(x.shape[-1], 1) >= MIN_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b``: oneDNN when :func:`_fast` allows it, else ``F.linear``."""
    if _fast(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


_ORIGINAL = nn.Linear.forward
_depth = 0


@contextlib.contextmanager
def onednn_linear(enabled: bool = True) -> Iterator[None]:
    """Within the block, every ``nn.Linear`` (and subclass that keeps its ``forward``) computes through
    :func:`linear`. Re-entrant; a no-op when ``enabled`` is false or oneDNN is missing. It patches the class,
    so it applies to the whole process for the block's duration."""
    global _depth
    if not enabled or not available():
        yield
        return
    if _depth == 0:
        nn.Linear.forward = _forward
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            nn.Linear.forward = _ORIGINAL
