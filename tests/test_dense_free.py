"""Dense-free packed layers on a shrunken LLaVA-1.5-7B (same architecture and head layout: hidden 256, 2 decoder
layers, vocabulary 1000, the full 576-position image + 40 text tokens), bfloat16 with random weights.

- The pruned model with no dense copy anywhere (every decoder linear a BitmaskLinear, prefill through the tile
  decode over several tiles, decode through the row kernel) gives the masked dense model's logits, prefill and one
  decode step with the KV cache, within bf16 tolerance: ``|pruned - masked| <= 2^-6 max|masked|`` elementwise
  (about four bf16 roundings at the logits' scale; the kernel accumulates in float32 and rounds once, like the
  dense GEMM, so the two differ only by summation order). The same bound rejects the unmasked model's logits.
- save_sparse / load_sparse stream one tensor at a time, build no dense weight on load, and round-trip exactly;
  the file is plain safetensors and is smaller than the dense one by the packed ratio.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ellava_lib.core import units
from ellava_lib.model import loading, structure
from ellava_lib.prune.masks import magnitude_mask
from ellava_lib.run.dryrun import synthetic_batch
from ellava_lib.speed import bitmask, sparse
from ellava_lib.speed.export import (
    SPARSE_WEIGHTS,
    load_sparse,
    read_safetensors,
    safetensors_header,
    save_sparse,
    write_safetensors,
)

REL_TOL = 2.0 ** -6


@pytest.fixture(scope="module")
def ext():
    if bitmask.extension() is None:
        pytest.skip(f"bitmask extension not built here: {bitmask.extension_info()['error']}")


@pytest.fixture(scope="module")
def models(ext):
    """``(config, dense, masked, pruned, prompt)``: magnitude 50% on every decoder linear; ``pruned`` = ``masked``
    with every decoder linear packed (bitmask, no dense copy)."""
    config = structure.scaled_config(structure.load_config("llava-1.5-7b"))
    dense = loading.random_weights(config, "cpu", "bfloat16", seed=0)
    masked = copy.deepcopy(dense)
    with torch.no_grad():
        for lins in units.unit_linears(masked).values():
            for lin in lins.values():
                lin.weight[magnitude_mask(lin.weight, 0.5)] = 0
    pruned = copy.deepcopy(masked)
    table = sparse.sparsify_model(pruned, backend="bitmask", example_inputs=[1, 617], min_speedup=0.0,
                                  min_time_s=0.0)
    assert (table["backend_chosen"] == "bitmask").all() and len(table) == 14
    enc = synthetic_batch(config, 1, 40, 0, torch.bfloat16, labels=False)
    return config, dense, masked, pruned, {k: enc[k] for k in ("input_ids", "pixel_values")}


@torch.no_grad()
def _logits(model: nn.Module, enc: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill logits (every position) and the logits of one greedy decode step with the KV cache."""
    out = model(**enc, use_cache=True)
    step = model(input_ids=out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
    return out.logits.float(), step.logits.float()


def _within(got: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool(((got - ref).abs() <= REL_TOL * ref.abs().max()).all())


def test_shrunken_config_keeps_the_7b_layout():
    big = structure.load_config("llava-1.5-7b")
    small = structure.scaled_config(big)
    t, T = small.text_config, big.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.vocab_size) == (256, 2, 1000)
    assert t.hidden_size // t.num_attention_heads == T.hidden_size // T.num_attention_heads == 128
    assert t.num_attention_heads == t.num_key_value_heads  # 7B: 32 heads, 32 KV heads
    assert t.intermediate_size == 704 and small.image_seq_length == 576  # 11008/4096 * 256 = 688 -> 704 (32 | it)
    assert small.image_token_index < small.vocab_size == 1000


def test_pruned_model_holds_no_dense_copy(models):
    _, _, masked, pruned, _ = models
    shapes = {tuple(lin.weight.shape) for lins in units.unit_linears(masked).values() for lin in lins.values()}
    mods = [m for m in pruned.modules() if isinstance(m, bitmask.BitmaskLinear)]
    assert len(mods) == 14 and all(m.dense_weight is None for m in mods)
    for m in mods:
        assert m.nbytes() == m.values.numel() * 2 + m.mask.numel() + m.offsets.numel() * 8
    dense_shaped = [k for k, v in pruned.state_dict().items() if ".layers." in k and tuple(v.shape) in shapes]
    assert dense_shaped == []


def test_dense_free_logits_equal_the_masked_model(models, monkeypatch):
    _, dense, masked, pruned, enc = models
    monkeypatch.setattr(bitmask, "TILE_BYTES", 64 * 256 * 2)  # 64-row tiles: q/k/v/o 4 tiles, up/gate 11
    assert bitmask.tile_rows(256, 2, 704) == 64
    calls = []
    original = bitmask.BitmaskLinear._tiled
    monkeypatch.setattr(bitmask.BitmaskLinear, "_tiled", lambda self, *a: calls.append(1) or original(self, *a))
    ref_pre, ref_dec = _logits(masked, enc)
    got_pre, got_dec = _logits(pruned, enc)
    assert len(calls) == 14  # the prefill ran every packed layer through the tile decode, the decode step none
    assert ref_pre.shape == (1, 617, 1000) and ref_dec.shape == (1, 1, 1000)
    assert _within(got_pre, ref_pre) and _within(got_dec, ref_dec)
    assert torch.equal(got_pre[0, -1].argmax(), ref_pre[0, -1].argmax())
    unmasked_pre, unmasked_dec = _logits(dense, enc)
    assert not _within(unmasked_pre, ref_pre) and not _within(unmasked_dec, ref_dec)  # the bound can fail


def test_sparse_folder_streams_and_round_trips_exactly(models, tmp_path, monkeypatch):
    _, _, masked, pruned, enc = models
    out = save_sparse(pruned, tmp_path / "sparse")

    def no_dense(*args, **kwargs):
        raise AssertionError("load_sparse built a dense weight")

    with monkeypatch.context() as m:
        m.setattr(bitmask, "unpack", no_dense)
        m.setattr(bitmask.BitmaskLinear, "weight_dense", no_dense)
        m.setattr(bitmask, "pack", no_dense)
        back = load_sparse(out)
    mods = dict(back.named_modules())
    assert all(type(mods[n]) is type(m) for n, m in pruned.named_modules())
    assert all(mods[n].dense_weight is None for n, m in pruned.named_modules() if isinstance(m, bitmask.BitmaskLinear))
    assert not any(t.is_meta for t in [*back.parameters(), *back.buffers()])
    ours, theirs = pruned.state_dict(), back.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for a, b in zip(_logits(pruned, enc), _logits(back, enc)):
        assert torch.equal(a, b)
    with safe_open(str(out / SPARSE_WEIGHTS), "pt") as f:  # a plain safetensors file
        key = next(k for k in f.keys() if k.endswith("mlp.up_proj.values"))
        assert torch.equal(f.get_tensor(key), ours[key])

    dense_file = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in masked.state_dict().items()}, str(dense_file))
    header, start = safetensors_header(out / SPARSE_WEIGHTS)
    lins = [lin.weight for lins in units.unit_linears(masked).values() for lin in lins.values()]
    lin_dense = sum(w.numel() * 2 for w in lins)
    lin_packed = sum(int(torch.count_nonzero(w)) * 2 + w.shape[0] * bitmask.row_bytes(w.shape[1])
                     + (w.shape[0] + 1) * 8 for w in lins)
    saved = lin_dense - lin_packed
    size_sparse, size_dense = (out / SPARSE_WEIGHTS).stat().st_size, dense_file.stat().st_size
    assert size_dense - size_sparse == pytest.approx(saved, abs=4096)  # headers differ by a few kB at most
    assert size_sparse < size_dense


def test_packed_layer_on_disk_is_smaller_by_the_sparsity_ratio(ext, tmp_path):
    """One 64 x 128 bfloat16 layer at 50%: dense 64*128*2 = 16384 bytes; packed = 4096 values * 2 = 8192 +
    mask 64 rows * 16 bytes = 1024 + offsets 65 * 8 = 520 -> 9736 bytes, ratio 9736 / 16384 = 0.594
    (``(1 - s) + 1/16 + 4 / d_in`` in bf16: 0.5 + 0.0625 + 0.03125)."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    w[magnitude_mask(w, 0.5)] = 0
    mod = bitmask.BitmaskLinear(w)
    entries = [(f"l.{k}", t.dtype, tuple(t.shape), lambda t=t: t)
               for k, t in (("values", mod.values), ("mask", mod.mask), ("offsets", mod.offsets))]
    packed_file, dense_file = tmp_path / "p.safetensors", tmp_path / "d.safetensors"
    n_packed = write_safetensors(packed_file, entries)
    n_dense = write_safetensors(dense_file, [("l.weight", w.dtype, (64, 128), lambda: w)])
    data_packed = n_packed - safetensors_header(packed_file)[1]
    data_dense = n_dense - safetensors_header(dense_file)[1]
    assert (data_packed, data_dense) == (9736, 16384)
    assert data_packed / data_dense == pytest.approx(0.594, abs=5e-4)
    back = dict(read_safetensors(packed_file))
    assert torch.equal(bitmask.unpack(back["l.values"], back["l.mask"], 128), w)
    with pytest.raises(ValueError, match="expected"):
        write_safetensors(tmp_path / "bad.safetensors", [("x", torch.float32, (2, 2), lambda: torch.ones(3))])
