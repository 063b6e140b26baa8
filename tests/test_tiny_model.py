from __future__ import annotations

import pytest
import torch

from ellava_lib.core.schema import OPTION_LETTERS, SUITES
from ellava_lib.data import encoding, prompts, scenes, synth
from ellava_lib.model import losses, specs, tiny, train

N_IMG = scenes.GRID * scenes.GRID


def _processor():
    return tiny.build_processor(tiny.vocabulary())


def test_vocabulary_is_deterministic_and_covers_every_suite():
    vocab = tiny.vocabulary()
    assert vocab == tiny.vocabulary()
    assert vocab[: len(tiny.SPECIALS)] == list(tiny.SPECIALS)
    tok = tiny.build_tokenizer(vocab)
    for suite in SUITES:
        for s in synth.generate(suite, "test", 500, render=False):
            ids = tok(prompts.question_text(s) + " " + s.answer + " " + " ".join(s.answers))["input_ids"]
            assert tok.unk_token_id not in ids, (suite, s.question, s.answer)


def test_tokenizer_round_trip_and_image_token():
    tok = _processor().tokenizer
    text = "there are 2 objects . a red circle is at the top left ."
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_tokens_to_ids("<image>") not in (tok.unk_token_id, None)
    assert len(tok("USER: <image>\nhi", add_special_tokens=False)["input_ids"]) == 4


def test_processor_expands_image_token_like_llava_hf():
    proc = _processor()
    s = synth.generate("sqa", "test", 1)[0]
    enc = proc(text=[prompts.sample_prompt(s)], images=[s.image], return_tensors="pt")
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert int((enc["input_ids"] == image_id).sum()) == N_IMG
    assert enc["pixel_values"].shape == (1, 3, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)
    # the chat template renders the same LLaVA-1.5 prompt as prompts.chat_prompt
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompts.question_text(s)}]}]
    assert proc.apply_chat_template(msgs, add_generation_prompt=True) == prompts.sample_prompt(s)


def test_training_fast_path_matches_the_processor():
    """Training pre-computes pixels and ids itself; they must equal what the processor gives at eval."""
    proc = _processor()
    cfg = train.TrainConfig.micro()
    cfg.n_train = {s: 2 for s in SUITES}
    data = train.encode_train(cfg, proc)
    item = synth.generate_items("sqa", "train", 1)[0]
    sample = synth.to_sample(item, "sqa", "train", 0)
    enc = proc(text=[prompts.sample_prompt(sample)], images=[sample.image], return_tensors="pt")
    n = data.n_prompt[0]
    assert data.ids[0][:n].tolist() == enc["input_ids"][0].tolist()
    assert torch.allclose(encoding.pixel_values(data.images[:1]), enc["pixel_values"], atol=1e-5)
    answer = proc.tokenizer.decode(data.ids[0][n:], skip_special_tokens=True)
    assert answer == item.answer


def test_micro_model_is_a_real_llava_and_generates(micro_model):
    from transformers import LlavaForConditionalGeneration

    model, proc = micro_model
    assert isinstance(model, LlavaForConditionalGeneration)
    s = synth.generate("vizwiz", "test", 2)
    enc = proc(text=[prompts.sample_prompt(x) for x in s], images=[x.image for x in s], return_tensors="pt",
               padding=True)
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= enc["input_ids"].shape[1] + 3


def test_build_is_seeded_and_cached(tmp_path, micro_model_dir):
    cfg = train.TrainConfig.micro()
    again = specs.build_or_load(cfg, cache=tmp_path, progress=False)
    from safetensors.torch import load_file

    a, b = load_file(micro_model_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mtime = (again / "model.safetensors").stat().st_mtime
    assert specs.build_or_load(cfg, cache=tmp_path, progress=False) == again  # cached: no retrain
    assert (again / "model.safetensors").stat().st_mtime == mtime
    assert not list(tmp_path.glob("models/*.tmp*"))
    meta = specs.model_meta(again)
    assert meta["digest"] == cfg.digest() and train.TrainConfig.from_dict(meta["train_config"]) == cfg


def test_cell_labels_map_to_the_words_that_name_them():
    tok = _processor().tokenizer
    colour_words, kind_words = losses.cell_word_ids(tok)
    scene = scenes.Scene((scenes.Obj(0, 0, "blue", "diamond"), scenes.Obj(1, 2, "white", "glyph", "K")))
    colour, kind = (torch.tensor(x) for x in scenes.cell_labels(scene))
    assert tok.convert_ids_to_tokens([int(colour_words[colour[0]]), int(kind_words[kind[0]])]) == ["blue", "diamond"]
    assert tok.convert_ids_to_tokens([int(colour_words[colour[5]]), int(kind_words[kind[5]])]) == ["white", "k"]
    assert int(colour_words[colour[1]]) == -100 and tok.unk_token_id not in colour_words.tolist() + kind_words.tolist()


def test_training_refuses_more_than_one_process():
    """Training runs in one process: a config asking for two still hashes (the cache names of existing configs
    keep the field) and loads, but :func:`train` refuses it before doing any work."""
    from dataclasses import replace

    from ellava_lib.model.train import TrainConfig, train

    cfg = replace(TrainConfig.micro(), processes=2)
    assert cfg.digest() != TrainConfig.micro().digest() and TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="one process"):
        train(cfg, progress=False)


def test_induction_batch_labels_only_predictable_copies():
    """Copy sequences ``<s> w_1..w_n w_1..w_n``: labels only on ``w_2..w_n`` of the copy, each equal to the
    token ``n`` positions earlier (what an induction head reads); seeded draws repeat."""
    import random

    from ellava_lib.model.lm_tasks import content_word_ids, induction_batch

    proc = tiny.build_processor(tiny.vocabulary(0))
    words = content_word_ids(proc.tokenizer)
    specials = {proc.tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIALS}
    assert words and not specials & set(words)
    b = induction_batch(words, 6, random.Random(0), bos=1, pad=0)
    for ids, labels, mask in zip(b["input_ids"], b["labels"], b["attention_mask"]):
        L = int(mask.sum())
        n = (L - 1) // 2
        assert ids[0] == 1 and ids[1: n + 1].tolist() == ids[n + 1: L].tolist() and 8 <= n <= 16
        lab = labels.tolist()
        assert all(x == -100 for x in lab[: n + 2] + lab[L:])
        assert all(lab[p] == ids[p] == ids[p - n] for p in range(n + 2, L))
    again = induction_batch(words, 6, random.Random(0), bos=1, pad=0)
    assert torch.equal(again["input_ids"], b["input_ids"])


def test_value_loss_is_the_logit_lens_cross_entropy_of_the_option_words():
    """``value_loss`` = mean over value rows of the mean ``-log softmax(W_out norm(h))`` of the option's words,
    read at each row's answer position; rows without a value are ignored; ``norm`` replaces the row count."""
    from ellava_lib.model.lm_tasks import value_loss
    from ellava_lib.model.train import TrainConfig

    proc = _processor()
    model = tiny.build_model(TrainConfig.micro().model, proc.tokenizer, 0)
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, model.config.text_config.hidden_size)
    pos, values = [4, 2, 1], [[7, 9], [], [11]]
    logp = torch.log_softmax(model.lm_head(model.model.language_model.norm(hidden)), -1)
    by_hand = (-(logp[0, 4, 7] + logp[0, 4, 9]) / 2 - logp[2, 1, 11]) / 2
    assert torch.allclose(value_loss(model, hidden, pos, values), by_hand, atol=1e-6)
    assert torch.allclose(value_loss(model, hidden, pos, values, norm=4.0), by_hand / 2, atol=1e-6)
    assert value_loss(model, hidden, pos, [[], [], []]) is None


def test_drills_name_the_value_and_are_built_for_sqa_only():
    from ellava_lib.model.lm_tasks import drill_text, value_ids
    from ellava_lib.model.train import TrainConfig, encode_train

    proc = _processor()
    tok = proc.tokenizer
    item = next(it for it in synth.generate_items("sqa", "train", 10) if not it.scene.degrade)
    value = item.choices[OPTION_LETTERS.index(item.answer)]
    text = drill_text(item)
    assert text.startswith(f"Which option is {value} ?")
    assert all(f"{L}. {c}" in text for L, c in zip(OPTION_LETTERS, item.choices))
    assert tok.decode(value_ids(tok, item)).split() == value.split()
    open_item = synth.generate_items("vizwiz", "train", 1)[0]
    assert value_ids(tok, open_item) == []
    data = encode_train(TrainConfig.micro(), proc)
    n_sqa = TrainConfig.micro().n_train["sqa"]
    assert all(data.value[:n_sqa]) and not any(data.value[n_sqa:])
    assert len(data.drill_ids) == sum(bool(v) for v in data.text_value) > 0
    assert len(data.text_value) == len(data.text_ids)


def test_disabled_levers_do_not_change_the_digest():
    """The presets with a lever off keep the cache names they had before the lever existed; a lever that is on
    names a different model."""
    from dataclasses import replace

    from ellava_lib.model.train import TrainConfig

    ci = TrainConfig.ci()
    assert ci.digest() == "be0d58e324"  # the CI model the nbval references were made with
    # full precision, ungrouped batches, one thread: the cache names from before those options existed
    assert replace(ci, precision="fp32", length_group=1, threads=1).digest() == "9b67261ff1"
    assert replace(TrainConfig(), precision="fp32", length_group=1, threads=1, processes=2, induction_steps=1500,
                   text_steps=500, joint_steps=1700).digest() == "30c0232581"
    assert replace(ci, value_weight=5.0).digest() == ci.digest()  # value loss off: its weight is moot
    assert replace(ci, induction_lr=1.0).digest() == ci.digest()
    for lever in ({"value_layer": 2}, {"drill_frac": 0.1}, {"induction_steps": 10}):
        assert replace(ci, **lever).digest() != ci.digest(), lever


def test_cli_build_takes_a_preset_and_a_seed(tmp_path, monkeypatch, capsys):
    """``ellava build --preset micro --seed 3`` trains the micro recipe with seed 3 into the cache folder its
    digest names, beside (not over) the seed-0 model; a second call finds it cached."""
    from dataclasses import replace

    from ellava_lib import cli
    from ellava_lib.model.train import TrainConfig

    monkeypatch.setenv("ELLAVA_CACHE", str(tmp_path))
    assert cli.main(["build", "--preset", "micro", "--seed", "3", "--quiet"]) == 0
    expected = tmp_path / "models" / f"tiny-{replace(TrainConfig.micro(), seed=3).digest()}"
    assert str(expected) in capsys.readouterr().out and (expected / "model.safetensors").is_file()
    assert specs.model_meta(expected)["train_config"]["seed"] == 3
    assert replace(TrainConfig.micro(), seed=3).digest() != TrainConfig.micro().digest()
    mtime = (expected / "model.safetensors").stat().st_mtime
    assert cli.main(["build", "--preset", "micro", "--seed", "3", "--quiet"]) == 0
    assert (expected / "model.safetensors").stat().st_mtime == mtime
    with pytest.raises(SystemExit) as e:
        cli.main(["build", "--preset", "nope"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_length_grouped_batches_keep_the_uniform_draws():
    """Group 1 draws exactly the plain uniform batches; a larger group serves the same G x B uniform draws,
    cut into batches of ascending length (served in random order), so padding shrinks and nothing is lost."""
    import torch

    from ellava_lib.data.encoding import LengthGroupedBatches

    lengths = [int(x) for x in torch.randint(5, 100, (500,), generator=torch.Generator().manual_seed(1))]
    plain = LengthGroupedBatches(lengths, 16, 1, torch.Generator().manual_seed(0))
    ref = torch.Generator().manual_seed(0)
    for _ in range(3):
        assert plain.next() == torch.randint(0, 500, (16,), generator=ref).tolist()
    grouped = LengthGroupedBatches(lengths, 16, 8, torch.Generator().manual_seed(0))
    batches = [grouped.next() for _ in range(8)]
    draws = torch.randint(0, 500, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    assert sorted(i for b in batches for i in b) == sorted(draws) and all(len(b) == 16 for b in batches)
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    assert all(hi <= nxt_lo for (_, hi), (nxt_lo, _) in zip(spans, spans[1:]))  # no two batches interleave
    assert [s[0] for s in spans] != [min(lengths[i] for i in b) for b in batches]  # not served in length order
    padded = sum(16 * max(lengths[i] for i in b) for b in batches)
    padded_plain = sum(16 * max(lengths[i] for i in draws[k * 16:(k + 1) * 16]) for k in range(8))
    assert padded < 0.8 * padded_plain
    with pytest.raises(ValueError, match="length group"):
        LengthGroupedBatches(lengths, 16, 0, torch.Generator())


def test_bf16_training_keeps_fp32_weights_and_losses():
    """The bf16 recipe runs the forward under CPU autocast but keeps fp32 weights, computes its losses in fp32
    (not rounded to bf16's 8-bit mantissa) and restores the model's attention implementation; an unknown
    precision is refused when the config is made."""
    from dataclasses import replace

    from ellava_lib.model.train import TrainConfig, train

    cfg = replace(TrainConfig.micro(), text_steps=3, vision_steps=1, align_steps=1, joint_steps=3)
    assert cfg.precision == "bf16"
    model, _, log = train(cfg, progress=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.text_config._attn_implementation == "sdpa"
    answers = [r["answer"] for r in log if r["stage"] == "joint"]
    as_bf16 = [float(torch.tensor(a).to(torch.bfloat16).float()) for a in answers]
    assert any(abs(a - b) > 1e-6 for a, b in zip(answers, as_bf16))
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")


def test_build_model_is_seeded_and_leaves_the_global_rngs_alone():
    """The same seed gives the same weights whatever the global state before; another seed other weights; torch's
    global generator and Python's ``random`` are as they were."""
    import random

    from ellava_lib.model.train import TrainConfig

    tok = _processor().tokenizer
    torch.manual_seed(5)
    random.seed(5)
    before_torch, before_py = torch.get_rng_state(), random.getstate()
    a = tiny.build_model(TrainConfig.micro().model, tok, 0).state_dict()
    assert torch.equal(torch.get_rng_state(), before_torch) and random.getstate() == before_py
    torch.rand(3)
    b = tiny.build_model(TrainConfig.micro().model, tok, 0).state_dict()
    c = tiny.build_model(TrainConfig.micro().model, tok, 1).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_leaves_the_global_rngs_alone():
    """A short micro build draws its initialisation from a forked, seeded torch generator and its batches from
    generators of its own: torch's global generator and Python's ``random`` are untouched afterwards."""
    import random
    from dataclasses import replace

    from ellava_lib.model.train import TrainConfig, train

    torch.manual_seed(7)
    random.seed(7)
    before_torch, before_py = torch.get_rng_state(), random.getstate()
    cfg = replace(TrainConfig.micro(), text_steps=2, vision_steps=1, align_steps=1, joint_steps=2)
    train(cfg, progress=False)
    assert torch.equal(torch.get_rng_state(), before_torch) and random.getstate() == before_py
