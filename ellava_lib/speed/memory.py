"""Predicted peak GPU memory of each stage of a run, and the batch sizes that make every stage fit a GPU.

A first-order model (bytes of what is alive at a stage's peak; no allocator fragmentation, no CUDA context:
:data:`RESERVE_BYTES` is kept free for those), checked against ``torch.cuda.max_memory_allocated`` by
``ellava dryrun`` on a GPU. ``b`` = bytes per weight / activation element (2 in fp16), ``W`` = every weight of
the model times ``b``; language model: ``L`` blocks of width ``d``, MLP width ``f``, ``h`` heads, KV width
``d_kv``, vocabulary ``V``; vision tower: ``L_v`` blocks of width ``d_v`` (MLP ``f_v``, ``h_v`` heads) on
``T_v`` = 577 tokens; ``T = T_img + T_txt`` decoder tokens of a calibration sample.

* **One block forward** of ``B`` rows (no gradient; the block's transient peak, its MLP):
  ``A(B, T) = B T (2 d + 3 f) b + B h T^2 b`` (the second term: attention scores when the kernel materialises
  them; flash attention does not). The vision tower on ``B`` images:
  ``A_v(B) = B T_v (2 d_v + 3 f_v) b + B h_v T_v^2 b + (L_v + 1) B T_v d_v b`` (LLaVA keeps every layer's
  hidden states to pick layer -2).
* ``eval`` (dense and final evaluation, greedy ``generate`` with a KV cache, batch ``B_e``, prompts of
  ``T_p = T_img + T_prompt`` tokens and up to ``G`` new tokens): ``W + 2 L B_e (T_p + G) d_kv b + A(B_e, T_p)
  + A_v(B_e) + 4 B_e V`` (logits of the last position only).
* ``leveldb`` (OBS / level-database building, one block at a time when ``offload``): the weights on the device
  (``W - L w_block b`` non-block modules plus one block ``w_block b`` when offloading, else ``W``), the block's
  inputs and outputs for all ``n`` calibration rows ``2 n T d b``, the block run on all rows at once
  ``A(n, T)``, the fp32 Hessians of its linears ``sum 4 d_in^2``, the solver's work ``2 * 4 d_max^2 + 3 * 4 w_max``
  (as :func:`costmodel.estimate_level_db`) and the fp32 copy of the widest linear's input rows ``4 n T d_max``.
* ``search`` (candidate scoring, batch ``B_s``): ``W`` + the level database's decode cache
  (:data:`leveldb.DECODE_CACHE_BYTES`) + ``A(B_s, T) + A_v(B_s)`` + the full logits ``B_s T V b`` + the KL's fp32
  temporaries ``4 * 4 B_s C V`` (``C`` = :data:`objective.KL_CHUNK` positions at a time).
* ``projector`` (one micro-batch of ``m`` rows, :func:`projector.evolve_projector`): ``W`` + the projector's
  gradient, fp32 master and AdamW moments ``P (b + 4 + 4 + 8)`` + the decoder's saved activations: with
  checkpointing the block inputs ``L m T d b`` plus one block's training activations ``A_t(m, T)``, else
  ``L A_t(m, T)``, ``A_t(B, T) = B T (10 d + 4 f) b + 2 B h T^2 b`` + ``A_v(m)`` + the sliced logits of the
  ``N = m T`` read positions, their gradient and the KL's saved fp32 tensors ``N V (2 b + 8)``.

:func:`choose` picks the largest batches (eval, scoring, projector micro-batch; offloading and checkpointing
only when needed) under ``gpu_bytes - RESERVE_BYTES``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import LlavaConfig

from ellava_lib.model import structure
from ellava_lib.prune.leveldb import DECODE_CACHE_BYTES
from ellava_lib.search.objective import KL_CHUNK
from ellava_lib.speed import flops

#: Bytes per GB in what the plans print and the dry run records (decimal, as GPU datasheets).
GB_BYTES: float = 1e9
#: Bytes of a GPU kept free for the CUDA context, cuBLAS workspaces and allocator fragmentation.
RESERVE_BYTES: float = 1.5e9
#: The default GPU memory the paper profile's batch sizes are chosen for (issue 19: one 40 GB GPU).
DEFAULT_GPU_GB: float = 40.0
#: Batch sizes :func:`choose` tries, largest first.
BATCH_CANDIDATES: tuple[int, ...] = (64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1)


@dataclass(frozen=True)
class Dims:
    """The sizes of a LLaVA config the formulas use (module docstring)."""

    params: int
    block_params: int
    projector_params: int
    layers: int
    d: int
    d_ff: int
    heads: int
    d_kv: int
    vocab: int
    block_linears_in: tuple[int, ...]
    max_in: int
    max_weight: int
    v_layers: int
    v_d: int
    v_ff: int
    v_heads: int
    v_tokens: int
    image_tokens: int

    @classmethod
    def of(cls, config: LlavaConfig) -> Dims:
        model = structure.meta_model(config)
        t, v = config.text_config, config.vision_config
        block = model.model.language_model.layers[0]
        lins = [m for m in block.modules() if m.__class__.__name__ == "Linear"]
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        return cls(params=model.num_parameters(), block_params=sum(p.numel() for p in block.parameters()),
                   projector_params=sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
                   layers=t.num_hidden_layers, d=t.hidden_size, d_ff=t.intermediate_size,
                   heads=t.num_attention_heads, d_kv=t.num_key_value_heads * head_dim, vocab=t.vocab_size,
                   block_linears_in=tuple(m.in_features for m in lins), max_in=max(m.in_features for m in lins),
                   max_weight=max(m.in_features * m.out_features for m in lins), v_layers=v.num_hidden_layers,
                   v_d=v.hidden_size, v_ff=v.intermediate_size, v_heads=v.num_attention_heads,
                   v_tokens=structure.vision_tokens_per_image(config),
                   image_tokens=int(getattr(config, "image_seq_length", 576)))


@dataclass(frozen=True)
class Workload:
    """What the stages work on: ``calib_n`` calibration rows of ``text_tokens`` text tokens each (plus the image
    tokens), ``score_rows`` rows a candidate is scored on at most, ``projector_rows`` training rows of a projector
    step, evaluation prompts of ``prompt_tokens`` text tokens with up to ``max_new_tokens`` generated, elements of
    ``dtype_bytes`` bytes; ``logits_tokens``: the positions per row whose logits the scoring and projector losses
    read (the time model's LM head; ``None``: every position)."""

    calib_n: int = 64
    text_tokens: int = flops.DEFAULT_TEXT_TOKENS
    score_rows: int = 24
    projector_rows: int = 18
    prompt_tokens: float = flops.DEFAULT_TEXT_TOKENS
    max_new_tokens: int = 1024
    dtype_bytes: int = 2
    logits_tokens: float | None = None


@dataclass(frozen=True)
class Batches:
    """The memory knobs of a run and where they live: ``eval_batch`` = ``Tier.eval_batch_size``, ``score_batch``
    = ``SearchConfig.eval_batch_size``, ``micro_batch`` / ``checkpointing`` = ``ProjectorConfig.micro_batch`` /
    ``.checkpointing``, ``offload`` = ``Tier.offload``."""

    eval_batch: int
    score_batch: int
    micro_batch: int
    checkpointing: bool
    offload: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _block(dm: Dims, rows: int, tokens: int, b: int) -> float:
    return rows * tokens * (2 * dm.d + 3 * dm.d_ff) * b + rows * dm.heads * tokens ** 2 * b


def _block_train(dm: Dims, rows: int, tokens: int, b: int) -> float:
    return rows * tokens * (10 * dm.d + 4 * dm.d_ff) * b + 2 * rows * dm.heads * tokens ** 2 * b


def _vision(dm: Dims, images: int, b: int) -> float:
    tv = dm.v_tokens
    return images * tv * (b * (2 * dm.v_d + 3 * dm.v_ff) + dm.v_heads * tv * b + (dm.v_layers + 1) * dm.v_d * b)


def eval_bytes(dm: Dims, wl: Workload, batch: int) -> float:
    """Peak of greedy generation with a KV cache (module docstring, ``eval``)."""
    b, tp = wl.dtype_bytes, dm.image_tokens + wl.prompt_tokens
    kv = 2 * dm.layers * batch * (tp + wl.max_new_tokens) * dm.d_kv * b
    return dm.params * b + kv + _block(dm, batch, tp, b) + _vision(dm, batch, b) + 4 * batch * dm.vocab


def leveldb_bytes(dm: Dims, wl: Workload, offload: bool) -> float:
    """Peak of building the level database (module docstring, ``leveldb``)."""
    b, n, t = wl.dtype_bytes, wl.calib_n, dm.image_tokens + wl.text_tokens
    weights = (dm.params - dm.layers * dm.block_params + dm.block_params) * b if offload else dm.params * b
    capture = _vision(dm, n, b) + n * t * dm.d * b
    solve = (2 * n * t * dm.d * b + _block(dm, n, t, b) + sum(4.0 * i * i for i in dm.block_linears_in)
             + 2 * 4.0 * dm.max_in ** 2 + 3 * 4.0 * dm.max_weight + 4.0 * n * t * dm.max_in)
    return weights + max(capture, solve)


def search_bytes(dm: Dims, wl: Workload, batch: int) -> float:
    """Peak of scoring a candidate ``batch`` rows at a time (module docstring, ``search``)."""
    b, t = wl.dtype_bytes, dm.image_tokens + wl.text_tokens
    return (dm.params * b + DECODE_CACHE_BYTES + _block(dm, batch, t, b) + _vision(dm, batch, b)
            + batch * t * dm.vocab * b + 16.0 * batch * min(KL_CHUNK, t) * dm.vocab)


def projector_bytes(dm: Dims, wl: Workload, micro: int, checkpointing: bool) -> float:
    """Peak of one projector micro-batch of ``micro`` rows (module docstring, ``projector``)."""
    b, t = wl.dtype_bytes, dm.image_tokens + wl.text_tokens
    saved = (dm.layers * micro * t * dm.d * b + _block_train(dm, micro, t, b) if checkpointing
             else dm.layers * _block_train(dm, micro, t, b))
    logits = micro * t * dm.vocab * (2 * b + 8)
    return (dm.params * b + dm.projector_params * (b + 16) + saved + _vision(dm, micro, b) + logits)


def _largest(fits, cap: int) -> int:
    """The largest of :data:`BATCH_CANDIDATES` (at most ``cap``) for which ``fits(batch)``; 0 when none."""
    return next((c for c in BATCH_CANDIDATES if c <= max(cap, 1) and fits(c)), 0)


def choose(dm: Dims, wl: Workload, gpu_bytes: float) -> tuple[Batches, dict[str, float], bool]:
    """``(batches, peak bytes per stage, every stage fits)`` for a GPU of ``gpu_bytes``: the largest eval,
    scoring and projector batches under ``gpu_bytes - RESERVE_BYTES`` (at most the rows there are); offloading
    (one block at a time) only when the level database does not fit with the whole model, checkpointing only
    when a micro-batch of one row does not fit without it. A stage that does not fit even at batch 1 keeps
    batch 1 (and ``fits`` is False)."""
    room = gpu_bytes - RESERVE_BYTES
    offload = leveldb_bytes(dm, wl, False) > room
    e = _largest(lambda c: eval_bytes(dm, wl, c) <= room, 64) or 1
    s = _largest(lambda c: search_bytes(dm, wl, c) <= room, wl.score_rows) or 1
    ck = projector_bytes(dm, wl, 1, False) > room
    m = _largest(lambda c: projector_bytes(dm, wl, c, ck) <= room, wl.projector_rows) or 1
    peaks = {"dense_eval": eval_bytes(dm, wl, e), "leveldb": leveldb_bytes(dm, wl, offload),
             "search": search_bytes(dm, wl, s), "projector": projector_bytes(dm, wl, m, ck),
             "final_eval": eval_bytes(dm, wl, e)}
    return Batches(e, s, m, ck, offload), peaks, all(v <= room for v in peaks.values())
