"""Text-only probe of the tiny decoder's training recipe: can it learn ``sqa``'s option-matching step?

The embedded default answers ``sqa`` at chance while it answers the same questions open-form in the other
suites (issue 2). This probe trains the language model alone, as the build's first stages do (optional
induction pre-training, then the text stage on the train items with the scene described in words), and
measures next-token accuracy of the answer letter on held-out ``sqa`` items every ``--eval-every`` steps:

- ``sqa_text``: the scene described in words + the benchmark prompt (reasoning + matching);
- ``drill``: ``Which option is {value} ?`` + the options (matching only: the value is given).

Levers it tests (flags): ``--induction`` steps of the copy task (:func:`ellava_lib.model.lm_tasks.induction_batch`),
``--drill-frac`` share of drill items mixed into the text stage, and ``--aux-layer K``: a logit-lens loss that
asks decoder layer ``K``'s state at the answer position to predict the words of the correct option
(``-mean_w log softmax(W_out norm(h_K))_w``), so the value is formed before the matching layers.

Usage::

    python benchmarks/sqa_probe.py --out benchmarks/results/sqa_probe_base.json
    python benchmarks/sqa_probe.py --induction 1000 --drill-frac 0.3 --aux-layer 3 --out ...

One thread, seeded; one run of the defaults takes about 10 minutes on this machine's CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from ellava_lib.core import files
from ellava_lib.data import encoding, synth
from ellava_lib.data.prompts import chat_prompt, question_text
from ellava_lib.model import lm_tasks, tiny, train
from ellava_lib.model.losses import answer_loss
from ellava_lib.model.tiny import TinyConfig

Encoded = tuple[torch.Tensor, int, list[int]]  # ids, prompt length, ids of the correct option's words


def encode_items(tok, items: list[synth.Item], suite: str, split: str, drill: bool = False) -> list[Encoded]:
    """Text-only encodings (degraded scenes skipped): described scene + prompt, or the drill prompt."""
    out = []
    for i, it in enumerate(items):
        if it.scene.degrade:
            continue
        if drill:
            text = lm_tasks.drill_text(it)
        else:
            text = f"{synth.describe(it.scene)}\n{question_text(synth.to_sample(it, suite, split, i, render=False))}"
        seq, n_p = encoding.encode_pair(tok, chat_prompt(text, with_image=False), it.answer)
        out.append((seq, n_p, lm_tasks.value_ids(tok, it) if suite == "sqa" else []))
    return out


@torch.no_grad()
def letter_accuracy(model, data: list[Encoded], pad: int, batch: int = 64) -> list[bool]:
    """Per item: is the argmax next token after the prompt the answer's first token?"""
    model.eval()
    hits: list[bool] = []
    for i in range(0, len(data), batch):
        xs = data[i:i + batch]
        prompts = [x[0][: x[1]] for x in xs]
        b = encoding.pad_right(prompts, [len(p) for p in prompts], pad)
        b.pop("labels")
        logits = model(**b).logits
        last = torch.tensor([len(p) - 1 for p in prompts])
        pred = logits[torch.arange(len(xs)), last].argmax(-1)
        hits += (pred == torch.tensor([int(x[0][x[1]]) for x in xs])).tolist()
    model.train()
    return hits


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file for the run's settings and accuracies")
    p.add_argument("--induction", type=int, default=800, help="copy-task steps before the text stage (0: none)")
    p.add_argument("--steps", type=int, default=1000, help="text-stage steps")
    p.add_argument("--drill-frac", type=float, default=0.0, help="share of drill items in the text stage")
    p.add_argument("--aux-layer", type=int, default=0, help="decoder layer of the logit-lens value loss (0: off)")
    p.add_argument("--n-train", type=int, default=0, help="train items per suite (0: the build's)")
    p.add_argument("--n-test", type=int, default=400, help="held-out sqa items")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--micro", action="store_true", help="the micro model (for tests)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not 0 <= a.drill_frac <= 1:
        p.error("--drill-frac must lie in [0, 1]")
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    cfg = train.TrainConfig()
    proc = tiny.build_processor(tiny.vocabulary(0))
    tok, pad = proc.tokenizer, proc.tokenizer.pad_token_id
    model = tiny.build_model(TinyConfig.micro() if a.micro else TinyConfig(), tok, a.seed)
    if not 0 <= a.aux_layer < model.config.text_config.num_hidden_layers:
        p.error(f"--aux-layer must lie in [0, {model.config.text_config.num_hidden_layers})")
    model.train()
    params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    n_train = {s: a.n_train or cfg.n_train[s] for s in synth.SUITES}
    pool = [x for s in synth.SUITES
            for x in encode_items(tok, synth.generate_items(s, "train", n_train[s]), s, "train")]
    drill = encode_items(tok, synth.generate_items("sqa", "train", n_train["sqa"]), "sqa", "train", drill=True)
    test_items = synth.generate_items("sqa", "test", a.n_test)
    test, test_drill = (encode_items(tok, test_items, "sqa", "test", drill=d) for d in (False, True))
    cats = [it.category for it in test_items if not it.scene.degrade]
    log: list[dict] = []
    if a.induction:
        words, rng = lm_tasks.content_word_ids(tok), random.Random(f"induction/{a.seed}")

        def copy_step(step: int) -> dict[str, torch.Tensor]:
            b = lm_tasks.induction_batch(words, cfg.batch_size, rng, tok.bos_token_id, pad)
            labels = b.pop("labels")
            return {"copy": answer_loss(model(**b).logits, labels)}

        train._run_stage(train.Stage("induction", a.induction, params, cfg.induction_lr, copy_step), cfg, log, True)
    rng = random.Random(a.seed + 1)
    evals: list[dict] = []

    def record(step: int) -> None:
        hits, drill_hits = letter_accuracy(model, test, pad), letter_accuracy(model, test_drill, pad)
        by = {c: round(100 * sum(h for h, k in zip(hits, cats) if k == c) / cats.count(c), 1)
              for c in sorted(set(cats))}
        evals.append({"step": step, "sqa_text": round(100 * sum(hits) / len(hits), 1),
                      "drill": round(100 * sum(drill_hits) / len(drill_hits), 1), **by})
        print(evals[-1], file=sys.stderr, flush=True)

    def text_step(step: int) -> dict[str, torch.Tensor]:
        if step and step % a.eval_every == 0:
            record(step)
        xs = [rng.choice(drill) if rng.random() < a.drill_frac else rng.choice(pool) for _ in range(cfg.batch_size)]
        b = encoding.pad_right([x[0] for x in xs], [x[1] for x in xs], pad)
        labels = b.pop("labels")
        out = model(**b, output_hidden_states=bool(a.aux_layer))
        losses = {"text": answer_loss(out.logits, labels)}
        aux = (lm_tasks.value_loss(model, out.hidden_states[a.aux_layer], [x[1] - 1 for x in xs], [x[2] for x in xs])
               if a.aux_layer else None)
        if aux is not None:
            losses["aux"] = aux
        return losses

    t0 = time.time()
    train._run_stage(train.Stage("text", a.steps, params, cfg.lr, text_step), cfg, log, True)
    record(a.steps)
    copy_loss = [r["copy"] for r in log if r["stage"] == "induction"]
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "induction_final_loss": copy_loss[-1] if copy_loss else None, "evals": evals,
              "text_stage_s": round(time.time() - t0, 1), "torch": torch.__version__}
    files.write_text(a.out, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
