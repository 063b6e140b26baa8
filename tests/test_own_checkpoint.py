"""The newcomer's path: the README's "Prune your own LLaVA checkpoint" commands, run as written (placeholders
replaced, size flags appended) on a random micro LLaVA saved in llava-hf's layout, for each supported decoder
(Llama, Mistral, Qwen2), and the one-line refusal of any other decoder."""

from __future__ import annotations

import shlex
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import exit_code
from PIL import Image
from transformers import (
    AutoProcessor,
    GPT2Config,
    LlamaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    PhiConfig,
    Qwen2Config,
)

from ellava_lib import cli
from ellava_lib.core.policy import Policy
from ellava_lib.core.units import unit_linears
from ellava_lib.model import smol, tiny
from ellava_lib.search.projector import load_projector, projector_state

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Prune your own LLaVA checkpoint"
#: Flags appended to each README command so that it runs in seconds on a micro model (argparse: the last wins).
FAST = {"search": ["--calib", "8", "--preset", "ci", "--generations", "2", "--population", "3", "--offspring", "4",
                   "--screen", "4", "--survivors", "2", "--projector-steps", "3", "--quiet"],
        "prune": ["--calib", "8", "--quiet"],
        "eval": ["--limit", "2", "--quiet"]}
#: Micro decoder: hidden 48, 2 layers, 3 query heads of width 16 sharing 1 key/value head, MLP 96.
MICRO = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
             num_key_value_heads=1, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)
#: Decoder weights of the micro LLaVA: per layer q 48x48 + k 16x48 + v 16x48 + o 48x48 = 6,144 (attention) and
#: 3 x 48x96 = 13,824 (MLP); two layers.
DECODER_WEIGHTS = 2 * (6_144 + 13_824)


def readme_commands() -> list[list[str]]:
    """The argument lists of the fenced ``bash`` block under :data:`SECTION` (comments dropped)."""
    section = README.read_text().split(SECTION + "\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def runnable(command: list[str], paths: dict[str, Path]) -> list[str]:
    """``command`` without its leading ``ellava``, each placeholder replaced by its path, :data:`FAST` appended."""
    assert command[0] == "ellava", command
    args = [str(paths.get(a, a)) for a in command[1:]]
    return [*args, *FAST[args[0]]]


def save_micro_llava(text_config, folder: Path) -> Path:
    """A random LLaVA (the kit's micro CLIP tower, 2-layer projector, ``text_config``'s decoder) and its processor
    (a word-level tokenizer in SmolLM2's special-token layout plus ``<image>``), saved by ``save_pretrained`` as
    llava-hf's checkpoints are."""
    words = [w for w in tiny.vocabulary(per_suite=30) if w not in tiny.SPECIALS]
    tokenizer = tiny.word_tokenizer([smol.UNK, smol.BOS, smol.EOS, *words], unk=smol.UNK, pad=smol.EOS,
                                    bos=smol.BOS, eos=smol.EOS, prepend_bos=False, extra_special={})
    processor = smol.smol_processor(tokenizer)
    tok = processor.tokenizer
    text = text_config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    with tiny.torch_seeded(0):
        model = tiny.init_llava(tiny.vision_config(tiny.TinyConfig.micro()), text, tok)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _decoder_sparsity(model) -> float:
    lins = [lin for unit in unit_linears(model).values() for lin in unit.values()]
    assert sum(lin.weight.numel() for lin in lins) == DECODER_WEIGHTS
    return sum(int((lin.weight == 0).sum()) for lin in lins) / DECODER_WEIGHTS


@pytest.mark.parametrize("text_config", [
    lambda **kw: LlamaConfig(**MICRO, **kw),
    lambda **kw: MistralConfig(**MICRO, sliding_window=64, **kw),
    lambda **kw: Qwen2Config(**MICRO, **kw),  # q/k/v with biases
], ids=["llama", "mistral", "qwen2"])
def test_readme_commands_prune_evaluate_and_export_your_own_llava(tmp_path, no_network, text_config):
    base = save_micro_llava(lambda **kw: text_config(**kw), tmp_path / "llava")
    paths = {"path/to/llava": base, "my-llava-search": tmp_path / "search", "my-llava-pruned": tmp_path / "pruned",
             "my-llava-eval": tmp_path / "eval"}
    commands = readme_commands()
    assert [c[1] for c in commands] == ["search", "prune", "eval"]
    for command in commands:
        assert exit_code(lambda c=command: cli.main(runnable(c, paths))) == 0, command

    pruned, info = LlavaForConditionalGeneration.from_pretrained(paths["my-llava-pruned"], output_loading_info=True)
    assert not any(info.values()), info  # plain transformers: no missing, unexpected or mismatched keys
    assert _decoder_sparsity(pruned) == pytest.approx(0.5, abs=0.01)  # the README's --sparsity 0.5
    report = pd.read_csv(paths["my-llava-pruned"] / "sparsity.csv")
    assert len(report) == 14  # 2 layers x 7 linears
    searched = Policy.from_json(paths["my-llava-search"] / "policy.json")
    assert Policy.from_json(paths["my-llava-pruned"] / "policy.json").sparsities == searched.sparsities
    dense = LlavaForConditionalGeneration.from_pretrained(base)
    # the projector the search returned (its task guard's choice) is loaded before pruning: the evolved one, or the
    # model's own when the guard kept it
    chosen = paths["my-llava-search"] / "projector.safetensors"
    assert chosen.is_file() == searched.meta["guard"].endswith("+projector")
    expected = load_projector(chosen)[0] if chosen.is_file() else projector_state(dense)
    assert all(torch.equal(projector_state(pruned)[k], v) for k, v in expected.items())
    for new, old in zip(unit_linears(pruned).values(), unit_linears(dense).values()):
        for name, lin in new.items():  # only weights are pruned; Qwen2's q/k/v biases stay as they were
            assert (lin.bias is None) == (old[name].bias is None) and (lin.bias is None or
                                                                       torch.equal(lin.bias, old[name].bias))

    metrics = pd.read_csv(paths["my-llava-eval"] / "metrics.csv")
    assert set(metrics["suite"]) == {"sqa", "vizwiz", "mmvet", "llavabench"}

    processor = AutoProcessor.from_pretrained(paths["my-llava-pruned"])
    inputs = processor(images=Image.new("RGB", (48, 48), "red"), text="USER: <image>\nWhat colour? ASSISTANT:",
                       return_tensors="pt")
    out = pruned.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)


UNSUPPORTED = {
    "phi": lambda **kw: PhiConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                                  **kw),
    "gpt2": lambda **kw: GPT2Config(n_embd=48, n_layer=2, n_head=3, n_positions=512, tie_word_embeddings=False,
                                    **kw),
}


@pytest.mark.parametrize("arch", sorted(UNSUPPORTED))
@pytest.mark.parametrize("step", [0, 1], ids=["search", "prune"])
def test_unsupported_decoder_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, arch, step):
    base = save_micro_llava(UNSUPPORTED[arch], tmp_path / "llava")
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "policy.json").write_text('{"sparsities": {}}')  # prune must refuse before reading it
    out = {0: tmp_path / "search-out", 1: tmp_path / "pruned"}[step]
    paths = {"path/to/llava": base, "my-llava-search": out if step == 0 else tmp_path / "search",
             "my-llava-pruned": out}
    capsys.readouterr()
    assert exit_code(lambda: cli.main(runnable(readme_commands()[step], paths))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"unsupported language model '{arch}'" in err
    assert "llama, mistral, qwen2" in err
    assert not out.exists()
