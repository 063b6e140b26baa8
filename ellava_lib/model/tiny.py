"""The embedded-default model: a real ``transformers`` ``LlavaForConditionalGeneration`` (CLIP vision tower,
2-layer GELU MLP projector, Llama decoder) with a word-level tokenizer and a ``LlavaProcessor``, so it is
driven exactly like a ``llava-hf`` checkpoint (chat prompt, ``<image>`` token expansion).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from ellava_lib.core.schema import OPTION_LETTERS
from ellava_lib.data import scenes, synth
from ellava_lib.data.encoding import IMAGE_MEAN, IMAGE_STD
from ellava_lib.data.prompts import CHAT_TEMPLATE, SQA_SUFFIX, VIZWIZ_SUFFIX

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIALS = (PAD, UNK, BOS, EOS, IMAGE)


@dataclass
class TinyConfig:
    """Sizes of the tiny LLaVA. ``vit_*`` = CLIP vision tower, ``lm_*`` = Llama decoder."""

    vit_hidden: int = 96
    vit_layers: int = 2
    vit_heads: int = 4
    vit_mlp: int = 192
    lm_hidden: int = 128
    lm_layers: int = 6
    lm_heads: int = 4
    lm_mlp: int = 352
    max_positions: int = 192

    @classmethod
    def micro(cls) -> "TinyConfig":
        """A model small enough to train in seconds, for tests."""
        return cls(vit_hidden=32, vit_layers=1, vit_heads=2, vit_mlp=64, lm_hidden=48, lm_layers=2, lm_heads=2,
                   lm_mlp=96)


def _pretokenize(text: str) -> list[str]:
    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def vocabulary(seed: int = 0, per_suite: int = 1500) -> list[str]:
    """All words the synthetic suite can produce: special tokens, then the word lists and templates.

    The templates are covered by sweeping ``per_suite`` generated items of each suite and split, plus
    every colour, shape, word, glyph and number explicitly; the result is sorted, so it is deterministic.
    """
    words: set[str] = set()
    fixed = [*scenes.COLOURS, *scenes.SHAPES, *scenes.WORDS, *(g.lower() for g in scenes.GLYPHS),
             *(str(i) for i in range(0, 19)), *synth.NUMBER_WORDS, *OPTION_LETTERS, "unanswerable"]
    for w in fixed:
        words.update(_pretokenize(w))
    for text in (SQA_SUFFIX, VIZWIZ_SUFFIX, CHAT_TEMPLATE.replace("{", " ").replace("}", " ")):
        words.update(_pretokenize(text))
    for suite in synth.GENERATORS:
        for split in synth.SPLITS:
            for item in synth.generate_items(suite, split, per_suite // 3, seed):
                for text in (item.question, item.answer, item.context, *item.choices, *item.answers,
                             synth.describe(item.scene)):
                    words.update(_pretokenize(text))
    words.update(_pretokenize("USER: ASSISTANT: Context: A. B. C. D. E."))
    return list(SPECIALS) + sorted(words - set(SPECIALS))


def build_tokenizer(vocab: list[str]) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer: whitespace/punctuation pre-tokenizer, ``<s>`` prepended, ``<image>`` kept
    as one special token; decoding joins words with single spaces."""
    fast = word_tokenizer(vocab, unk=UNK, pad=PAD, bos=BOS, eos=EOS, prepend_bos=True)
    fast.add_special_tokens({"additional_special_tokens": [IMAGE]})
    return fast


def word_tokenizer(vocab: list[str], *, unk: str, pad: str, bos: str, eos: str, prepend_bos: bool,
                   extra_special: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``vocab`` (id = position) with the given special tokens: whitespace and
    punctuation pre-tokenizer; ``bos`` prepended to every encoded text when ``prepend_bos``; ``extra_special``
    names further special tokens (default ``{"image_token": "<image>"}``, as the tiny LLaVA has it)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if prepend_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, vocab.index(bos))])
    extra = {"image_token": IMAGE} if extra_special is None else extra_special
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, unk_token=unk, bos_token=bos, eos_token=eos,
                                   extra_special_tokens=extra, clean_up_tokenization_spaces=False,
                                   padding_side="left")


def build_image_processor():
    """CLIP image processor at the scene size (resize and crop are no-ops on generated images)."""
    try:
        from transformers import (
            CLIPImageProcessorPil as Proc,  # transformers >= 5 without torchvision
        )
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as Proc
    size = scenes.IMAGE_SIZE
    return Proc(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=list(IMAGE_MEAN),
                image_std=list(IMAGE_STD), do_convert_rgb=True)


def build_processor(vocab: list[str]) -> LlavaProcessor:
    """A ``LlavaProcessor`` wired like llava-hf's: one ``<image>`` expands to (size/patch)^2 tokens."""
    return llava_processor(build_tokenizer(vocab))


def llava_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """``tokenizer`` (which holds ``<image>`` as a special token) in a ``LlavaProcessor`` wired like llava-hf's:
    the CLIP image processor at the scene size (:func:`build_image_processor`), one ``<image>`` expanded to
    (size/patch)^2 tokens (patch = one scene cell; the CLS token counted by ``num_additional_image_tokens`` and
    dropped by the ``default`` feature strategy), the kit's LLaVA-1.5 chat template."""
    return LlavaProcessor(image_processor=build_image_processor(), tokenizer=tokenizer,
                          patch_size=scenes.CELL, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE, image_token=IMAGE)


@contextlib.contextmanager
def torch_seeded(seed: int) -> Iterator[None]:
    """Within the block, torch's global CPU generator starts from ``seed`` (the state ``torch.manual_seed(seed)``
    gives it, so the draws are the same); on exit its previous state is restored (``torch.random.fork_rng``
    over the CPU generator only), so code outside the block sees no change. Module initialisation on the CPU
    draws from this generator."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def build_model(cfg: TinyConfig, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlavaForConditionalGeneration:
    """A randomly initialised tiny LLaVA: :func:`init_model` under :func:`torch_seeded` ``(seed)``, so the same
    seed gives the same weights and torch's global generator is left as it was."""
    with torch_seeded(seed):
        return init_model(cfg, tokenizer)


def init_model(cfg: TinyConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    """A randomly initialised tiny LLaVA drawn from torch's global CPU generator as it stands: the caller seeds
    it (:func:`build_model`; training, which keeps drawing from the same stream after the model)."""
    return init_llava(vision_config(cfg), text_config(cfg, tokenizer), tokenizer)


def text_config(cfg: TinyConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The Llama decoder of ``cfg`` (``lm_*`` sizes, one key/value head per query head, untied output head) over
    ``tokenizer``'s vocabulary, with its pad, bos and eos ids."""
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.lm_hidden, intermediate_size=cfg.lm_mlp,
                       num_hidden_layers=cfg.lm_layers, num_attention_heads=cfg.lm_heads,
                       num_key_value_heads=cfg.lm_heads, max_position_embeddings=cfg.max_positions,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)


def vision_config(cfg: TinyConfig) -> CLIPVisionConfig:
    """The CLIP vision tower of ``cfg`` (``vit_*`` sizes): one patch per scene cell, the scene size as image."""
    return CLIPVisionConfig(hidden_size=cfg.vit_hidden, intermediate_size=cfg.vit_mlp,
                            num_hidden_layers=cfg.vit_layers, num_attention_heads=cfg.vit_heads,
                            image_size=scenes.IMAGE_SIZE, patch_size=scenes.CELL, projection_dim=cfg.vit_hidden)


def init_llava(vision: CLIPVisionConfig, text: PretrainedConfig,
               tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    """A randomly initialised ``LlavaForConditionalGeneration`` (drawn from torch's global CPU generator) with the
    vision tower ``vision``, the decoder ``text`` and a 2-layer GELU projector between them, wired like llava-hf's
    (patch features of the last layer without the CLS token, ``<image>`` = one token per patch); the pad, bos
    and eos ids of ``tokenizer`` go into the config (:func:`llava_config`) and the generation config."""
    model = LlavaForConditionalGeneration(llava_config(vision, text, tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def llava_config(vision: CLIPVisionConfig, text: PretrainedConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """The ``LlavaConfig`` of :func:`init_llava` (nothing is built): the vision tower ``vision``, the decoder
    ``text``, a 2-layer GELU projector, patch features of the last layer without the CLS token, one ``<image>``
    token (``tokenizer``'s id) per scene cell, ``tokenizer``'s pad id."""
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
                       projector_hidden_act="gelu", vision_feature_select_strategy="default",
                       vision_feature_layer=-1, image_seq_length=scenes.GRID * scenes.GRID,
                       pad_token_id=tokenizer.pad_token_id)
