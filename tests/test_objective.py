from __future__ import annotations

import math

import pytest
import torch

from ellava_lib.core.policy import Policy
from ellava_lib.core.units import list_units
from ellava_lib.data import calibration
from ellava_lib.model.losses import answer_loss, per_sample_ce
from ellava_lib.model.specs import load_model
from ellava_lib.prune.prune import magnitude_prune
from ellava_lib.search import objective


@pytest.fixture(scope="module")
def batch(micro_model):
    _, proc = micro_model
    return calibration.encode_calibration(calibration.draw_calibration(8, 0), proc)


# ------------------------------------------------------------------------------------ hand-checked J


def test_j_by_hand_with_the_bernstein_gap():
    # losses 1, 2, 3, 4: mean 2.5, Var (ddof 1) = 5/3, ln(2/0.05) = ln 40 = 3.6888794541139363
    # G = sqrt(2 * 5/3 * ln40 / 4) = 1.753301517640823 (the range term is not part of J) ;
    # J = 2.5 + 0.5 * G = 3.3766507588204115
    s = objective.score_losses([1.0, 2.0, 3.0, 4.0], gap="bernstein", lam=0.5, delta=0.05, loss_cap=10.0)
    assert s.r_hat == pytest.approx(2.5, abs=1e-12)
    assert s.g_hat == pytest.approx(1.753301517640823, rel=1e-12)
    assert s.j == pytest.approx(3.3766507588204115, rel=1e-12)
    assert (s.n_used, s.n_clipped) == (4, 0)


def test_losses_are_clipped_at_the_cap_and_the_gap_uses_them():
    s = objective.score_losses([1.0, 12.0], gap="none", lam=3.0, loss_cap=10.0)
    assert (s.r_hat, s.g_hat, s.j, s.n_clipped) == (5.5, 0.0, 5.5, 1)
    # clipped losses 1, 10: Var = 40.5 ; G = sqrt(2 * 40.5 * ln 40 / 2)
    s = objective.score_losses([1.0, 12.0], gap="bernstein", lam=1.0, loss_cap=10.0)
    assert s.g_hat == pytest.approx(math.sqrt(40.5 * 3.6888794541139363), rel=1e-12)
    # equal losses: no variance, no gap
    assert objective.score_losses([0.0, 0.0], gap="bernstein", lam=1.0, loss_cap=2.0).g_hat == 0.0


def test_capacity_gap_uses_the_full_n():
    units = {"lm.0.attn": 100, "lm.0.mlp": 100}
    sp = {"lm.0.attn": 0.5, "lm.0.mlp": 0.5}
    s = objective.score_losses([1.0, 1.0], gap="capacity", lam=2.0, units=units, sparsities=sp, n_capacity=1000,
                               gap_kw={"h_scale": 10.0})
    # h = 0.5 * 10 = 5: sqrt((5 (ln(2000/5) + 1) + ln 80) / 1000), over its dense value at h = 10
    want = math.sqrt((5 * (math.log(400) + 1) + math.log(80)) / 1000) / math.sqrt(
        (10 * (math.log(200) + 1) + math.log(80)) / 1000)
    assert s.g_hat == pytest.approx(want, rel=1e-12) and s.j == pytest.approx(1.0 + 2 * want, rel=1e-12)


def test_bad_scores():
    with pytest.raises(ValueError, match="NaN"):
        objective.score_losses([1.0, float("nan")], gap="none", lam=1.0)
    with pytest.raises(ValueError, match="unknown gap kind"):
        objective.score_losses([1.0, 2.0], gap="vc", lam=1.0)
    score = objective.Score(1.0, 2.0, 3.0, 4, 1)
    assert objective.Score.from_dict(score.to_dict()) == score


# --------------------------------------------------------------------------------- per-sample losses


def test_per_sample_ce_by_hand_and_answer_loss_is_its_mean():
    # vocabulary of 2, uniform logits except one position: -log softmax([0, 0])[y] = ln 2,
    # -log softmax([ln 3, 0])[0] = ln(4/3). Sample 0 answers at positions 1, 2; sample 1 at position 2 only.
    logits = torch.zeros(2, 3, 2)
    logits[0, 0, 0] = math.log(3.0)
    labels = torch.tensor([[-100, 0, 1], [-100, -100, 1]])
    ce = per_sample_ce(logits.to(torch.bfloat16), labels)
    assert ce.dtype == torch.float32
    assert ce.tolist() == pytest.approx([(math.log(4 / 3) + math.log(2)) / 2, math.log(2)], abs=1e-2)
    exact = per_sample_ce(logits, labels)
    assert exact.tolist() == pytest.approx([(math.log(4 / 3) + math.log(2)) / 2, math.log(2)], rel=1e-6)
    assert torch.equal(answer_loss(logits, labels), exact.mean())
    assert per_sample_ce(logits, torch.full_like(labels, -100)).tolist() == [0.0, 0.0]  # no answer: 0


def test_ce_is_the_per_sample_answer_loss(micro_model, batch):
    model, _ = micro_model
    losses = objective.per_sample_losses(model, batch)
    assert losses.shape == (8,) and (losses > 0).all()
    with torch.no_grad():
        logits = objective.model_logits(model, batch)
    assert float(losses.mean()) == pytest.approx(float(answer_loss(logits, batch["labels"])), rel=1e-5)
    # chunked and subset evaluation give the same per-sample values
    assert torch.allclose(objective.per_sample_losses(model, batch, batch_size=3), losses, atol=1e-5)
    assert torch.allclose(objective.per_sample_losses(model, batch, idx=[6, 1]), losses[[6, 1]], atol=1e-5)


def test_kl_is_zero_for_the_dense_model_and_positive_when_pruned(micro_model_dir, batch):
    model, _ = load_model(micro_model_dir)
    dense = objective.dense_logprobs_of(model, batch, batch_size=4)
    kl = objective.per_sample_losses(model, batch, "kl", dense, batch_size=4)
    assert kl.shape == (8,) and float(kl.abs().max()) < 1e-6
    magnitude_prune(model, Policy.uniform(list_units(model), 0.9))
    kl = objective.per_sample_losses(model, batch, "kl", dense)
    assert (kl > 0).all()


def test_kl_needs_dense_logits(micro_model, batch):
    model, _ = micro_model
    with pytest.raises(ValueError, match="dense"):
        objective.per_sample_losses(model, batch, "kl")
    with pytest.raises(ValueError, match="unknown loss kind"):
        objective.per_sample_losses(model, batch, "mse")


def test_full_position_kl_is_the_hand_computation():
    """Two rows, V = 2, the second right-padded: KL over t predicting t+1 where both are real tokens."""
    logits = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]],
                           [[0.0, 1.0], [2.0, 0.0], [9.0, 9.0], [9.0, 9.0]]])
    dense = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]],
                          [[0.0, 0.0], [0.0, 3.0], [7.0, 0.0]]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    mask = objective.position_mask(attention)
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    logq = torch.log_softmax(dense, -1)

    def kl(d, c):
        p, q = [math.exp(x) for x in d], [math.exp(x) for x in torch.log_softmax(c, -1).tolist()]
        return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))

    want = [sum(kl(logq[0, t].tolist(), logits[0, t]) for t in range(3)) / 3,
            sum(kl(logq[1, t].tolist(), logits[1, t]) for t in range(2)) / 2]
    got = objective.per_sample_kl(logits, logq, mask, chunk=None)
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    for chunk in (1, 2, 5):  # chunked equals unchunked
        assert torch.allclose(objective.per_sample_kl(logits, logq, mask, chunk=chunk), got, atol=1e-7)
    answer = torch.tensor([[False, False, True], [False, True, False]])
    assert objective.per_sample_kl(logits, logq, answer).tolist() == pytest.approx(
        [kl(logq[0, 2].tolist(), logits[0, 2]), kl(logq[1, 1].tolist(), logits[1, 1])], rel=1e-6)


def test_kl_kinds_chunked_and_answer_only(micro_model_dir, batch):
    model, _ = load_model(micro_model_dir)
    dense = objective.dense_logprobs_of(model, batch, batch_size=3)
    magnitude_prune(model, Policy.uniform(list_units(model), 0.7))
    full = objective.per_sample_losses(model, batch, "kl", dense)
    assert torch.allclose(objective.per_sample_losses(model, batch, "kl", dense, batch_size=3), full, atol=1e-6)
    assert torch.allclose(objective.per_sample_losses(model, batch, "kl", dense, idx=[5, 2]), full[[5, 2]], atol=1e-6)
    old = objective.KL_CHUNK
    try:
        objective.KL_CHUNK = 3
        chunked = objective.per_sample_losses(model, batch, "kl", dense)
    finally:
        objective.KL_CHUNK = old
    assert torch.allclose(chunked, full, atol=1e-6)
    answer = objective.per_sample_losses(model, batch, "kl_answer", dense)
    assert answer.shape == full.shape and not torch.allclose(answer, full)


# ------------------------------------------------------------------------------------- text-position KL


def test_text_position_kl_leaves_out_the_image_placeholders_by_hand():
    """One sample, input tokens [5, IMG, IMG, 7, 8, 9], V = 2: positions t = 0..4 predict token t+1; t = 1, 2 read
    the image token (left out), t = 0, 3, 4 are text; the answer is tokens 4, 5 (positions 3, 4)."""
    img = 3
    batch = {"input_ids": torch.tensor([[5, img, img, 7, 8, 9]]), "attention_mask": torch.ones(1, 6, dtype=torch.long),
             "labels": torch.tensor([[-100, -100, -100, -100, 8, 9]])}
    ln3, ln9 = math.log(3.0), math.log(9.0)
    # dense log-probs per position: (1/2, 1/2), (1/2, 1/2) x2 at the image, (1/2, 1/2), (3/4, 1/4)
    dense = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.75, 0.25]]]))
    # candidate: softmax(ln 3, 0) = (3/4, 1/4) at t = 0; (1/10, 9/10) at the image; = dense at t = 3; (1/2, 1/2) at 4
    logits = torch.tensor([[[ln3, 0.0], [0.0, ln9], [0.0, ln9], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    # KL per position: t=0: 0.5 ln(4/3) = 0.14384103622589042 ; t=1, 2: 0.5 ln 5 + 0.5 ln(5/9) = 0.5108256237659907 ;
    # t=3: 0 ; t=4: 0.75 ln 1.5 - 0.25 ln 2 = 0.13081203594113697
    text = objective.loss_mask("kl", batch, img)
    assert text.tolist() == [[True, False, False, True, True]]
    # text positions: (0.14384103622589042 + 0 + 0.13081203594113697) / 3
    got = objective.per_sample_kl(logits, dense, text, chunk=None)
    assert got.tolist() == pytest.approx([0.09155102405567579], abs=1e-7)
    for chunk in (1, 2, 4):
        assert torch.allclose(objective.per_sample_kl(logits, dense, text, chunk=chunk), got, atol=1e-7)
    # every real position (kl_all, the old kl): (0.14384... + 2 * 0.51082... + 0 + 0.13081...) / 5
    every = objective.per_sample_kl(logits, dense, objective.loss_mask("kl_all", batch), chunk=None)
    assert every.tolist() == pytest.approx([0.25926086393980174], abs=1e-7)
    # answer positions 3, 4: 0.13081203594113697 / 2
    answer = objective.per_sample_kl(logits, dense, objective.loss_mask("kl_answer", batch), chunk=None)
    assert answer.tolist() == pytest.approx([0.06540601797056848], abs=1e-7)
    # the image positions do not count: changing the candidate there leaves the text KL as it was
    changed = logits.clone()
    changed[0, 1:3] = torch.tensor([7.0, -7.0])
    assert objective.per_sample_kl(changed, dense, text).tolist() == pytest.approx(got.tolist(), abs=1e-7)
    # no image token (a text-only model): every real position
    assert objective.loss_mask("kl", batch, None).tolist() == [[True] * 5]
    with pytest.raises(ValueError, match="not a KL kind"):
        objective.loss_mask("ce", batch, img)


def test_kl_on_the_micro_model_reads_the_text_positions(micro_model_dir, batch):
    model, _ = load_model(micro_model_dir)
    img = objective.image_token_id(model)
    assert img is not None and int((batch["input_ids"] == img).sum(1).min()) == 9  # 3 x 3 patches per sample
    dense = objective.dense_logprobs_of(model, batch)
    magnitude_prune(model, Policy.uniform(list_units(model), 0.7))
    kl = objective.per_sample_losses(model, batch, "kl", dense)
    with torch.no_grad():
        logits = objective.model_logits(model, batch)
    text = objective.position_mask(batch["attention_mask"]) & (batch["input_ids"][:, :-1] != img)
    assert torch.allclose(kl, objective.per_sample_kl(logits, dense, text), atol=1e-6)
    every = objective.per_sample_losses(model, batch, "kl_all", dense)
    assert not torch.allclose(kl, every)
    # the head and the KL run at the mask's positions only (logits_at, kl_at): the full-logit losses of every kind
    assert torch.allclose(every, objective.per_sample_kl(logits, dense, objective.loss_mask("kl_all", batch)),
                          atol=1e-6)
    answer = objective.per_sample_losses(model, batch, "kl_answer", dense, idx=[6, 1, 3])
    assert torch.allclose(answer, objective.per_sample_kl(logits[[6, 1, 3]], dense[[6, 1, 3]],
                                                          objective.loss_mask("kl_answer", batch)[[6, 1, 3]]),
                          atol=1e-6)
    with torch.no_grad():
        gathered = objective.logits_at(model, batch, torch.cat([text, torch.zeros_like(text[:, :1])], 1))
    assert gathered.shape == (int(text.sum()), logits.shape[-1]) and torch.allclose(gathered, logits[:, :-1][text],
                                                                                     atol=1e-5)


def test_gathered_kl_by_hand():
    """Two rows, V = 2, three gathered positions: row 0 at (3/4, 1/4) against dense (1/2, 1/2) and at dense itself,
    row 1 at (1/2, 1/2) against dense (3/4, 1/4); row 2 has none (0)."""
    ln3 = math.log(3.0)
    logits = torch.tensor([[ln3, 0.0], [0.0, 0.0], [0.0, 0.0]])
    dense = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.75, 0.25]]))
    # KL: 0.5 ln(4/3) = 0.14384103622589042 ; 0 ; 0.75 ln 1.5 - 0.25 ln 2 = 0.13081203594113697
    for chunk in (1, 2, None):
        got = objective.kl_at(logits, dense, torch.tensor([0, 0, 1]), 3, chunk=chunk)
        assert got.tolist() == pytest.approx([0.07192051811294521, 0.13081203594113697, 0.0], abs=1e-7)


def test_the_default_kl_fitness_has_a_revision_in_the_serialised_config():
    from ellava_lib.search.config import SearchConfig

    cfg = SearchConfig()
    assert cfg.loss_kind == "kl" and cfg.to_dict()["loss_revision"] == objective.LOSS_REVISION["kl"] == 2
    old = {k: v for k, v in cfg.to_dict().items() if k != "loss_revision"}  # as written before the change
    assert SearchConfig.from_dict(old) == SearchConfig.from_dict(cfg.to_dict()) == cfg
    assert SearchConfig.from_dict(old).to_dict() != old  # an old folder's config does not match: no silent resume
    for kind in ("ce", "kl_answer", "kl_all"):
        assert "loss_revision" not in SearchConfig(loss_kind=kind).to_dict()
    assert SearchConfig(loss_kind="kl_all").digest() != cfg.digest()
