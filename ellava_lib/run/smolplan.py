"""``ellava plan --profile smol``: the predicted GPU time of the whole smol profile on one GPU, build included,
against issue 18's target of 20 minutes (:data:`TARGET_S`); with ``--gpu cpu-2core`` the time on the 2-core
development machine, calibrated stage by stage against what the profile measured there
(``benchmarks/results/smol_stages_cpu.json``, ``tests/test_smolplan_calibration.py``: each stage within 2x).

Rows and rates. A calibration or training row of the synthetic suites is :data:`smol.TRAIN_TOKENS_MEAN` (46.6)
tokens on average and at most :data:`smol.TRAIN_TOKENS_MAX` (77), 9 of them image tokens; a batch of calibration
rows from all four suites is padded to about its longest row, so its forwards are priced at 77 tokens a row and
what reads only the real tokens (Hessians, the positions a loss reads) at the mean. An evaluation prompt is
``ctx.prompt_tokens`` text tokens: the mean row less its 9 image tokens, its answer (:data:`ANSWER_TOKENS`) and
its end-of-sequence token, 31.9 (batches of one suite in prompt-length order: little padding). Three matmul
paths (:class:`costmodel.DeviceProfile`): ``ctx.prof`` the tier's forward through the kit's oneDNN linears
(:func:`kernels.onednn_linears`: evaluation prefill, candidate scoring, held-out projector losses);
``ctx.plain_prof`` the plain fp32 GEMM (a decode step has fewer rows than ``kernels.MIN_ROWS``; forwards that
need gradients; the pruning walks and ECoFLaP's suffixes, which do not route through oneDNN); ``ctx.train_prof``
the build's bf16 autocast. On a GPU the first two are the same FP32 rate.

The stages and how often the profile runs them (``runs``):

* **build** (notebook 01, :meth:`train_config.TrainConfig.smol`): per training step ``F = sum_parts c * P * N`` FLOPs,
  ``P`` a part's parameters and ``N`` the tokens through it, ``c = 6`` for a trained part (forward ``2 P N``,
  backward ``4 P N``), ``2`` for a frozen part before every trained one (forward only), ``4`` for a frozen part
  after a trained one (forward and the backward to its inputs, no weight gradient) (:func:`train_flops`); the
  step takes ``max(F / (F_bf16 eff), 3 * 4 P_used / (BW eff), 3 t_issue) + 28 P_train / (BW eff)`` (bf16 autocast
  on fp32 master weights read by the forward and the backward; AdamW reads weight, gradient and two moments and
  writes weight and moments, 7 fp32 tensors). ``vision``: the tower on ``2 B`` images of ``T_v`` tokens;
  ``align``: the tower frozen before the trained projector on the ``2 B x 9`` patches, the frozen embedding
  matrix after it (logits ``z E^T``); ``joint``: everything on ``B`` rows of :data:`smol.TRAIN_TOKENS` tokens,
  the tower and projector twice (the aux losses), the aux logits. The rows average 47 tokens (length-grouped
  batches pad little), so ``F`` at 96 is twice the matmuls of a step; on the 2-core CPU the step's other work
  (activations, the 49k-wide logits and their loss, autocast's weight casts, the LoRA adapters' small ops)
  measured about as much again (``train_config.TrainConfig.smol``: about 3 s a joint step against 1.6 s of bf16
  matmuls), which the 96-token bound covers to first order.
* **evaluation** of ``n`` items per suite (02: ``eval_limit``, the sweep jobs: ``sweep_eval_limit``), batch ``B_e``
  (the tier's, else :class:`EvalConfig`'s), ``n // B_e`` full batches and the rest: per batch
  :func:`plan.generate_seconds`, prefill ``roofline(B F_prefill, W)`` of ``ctx.prompt_tokens``-token prompts, then
  ``g - 1`` decode steps ``roofline(B 2 P_lm, W)`` plus their key/value-cache copies (:func:`plan.kv_passes`).
  ``g``: a batch stops when its every row has ended, so it generates its longest answer and the end-of-sequence
  token, :data:`GENERATED_TOKENS` per suite (the suites' reference answers), not the budget
  :data:`evaluate.MAX_NEW_TOKENS`; 02's magnitude-pruned models lose the end-of-sequence token and generate to the
  budget (their predictions are the budget's length). A sweep job also scores its calibration selection rows (one
  batch per suite).
* **level databases** (03-06): one per (seed, calib_n) of the searched jobs, the union of their grids
  (:func:`jobs.level_grid`), on the draw's statistic rows (:func:`stat_rows`): :func:`costmodel.estimate_level_db`
  (its column loop is latency- and bandwidth-bound on a CPU: the in-block updates priced by their bytes).
* **pruning**, on the statistic rows: SparseGPT (``sparsegpt``, and after the allocation ``owl``, ``ecoflap``,
  the exact re-prune) is :func:`costmodel.estimate_level_db` at one level with the sequential walk's two passes;
  Wanda's walk two passes (statistics, then the pruned block's outputs), OWL's statistics one more walk;
  ``llm_pruner``'s Taylor scores one forward and one backward over the rows with the LM head (3 forwards; peak:
  the weights, the decoder linears' gradients and every layer's saved activations, :func:`taylor_bytes`);
  ECoFLaP's zeroth-order importances, once per (seed, calib_n) that needs them (:func:`jobs.needs_importance`),
  are ``2 x ECOFLAP_SAMPLES / ecoflap_batch`` forwards of ``ecoflap_batch`` rows per linear
  (:func:`allocate.zeroth_order_importance`).
* **searches**: :func:`plan._search_seconds` and :func:`plan._projector_seconds` with each job's own
  :func:`jobs.search_config` (the rows, the gap term, the projector rounds), batches from the configuration.
  The projector rounds are priced at their ``steps``; they stop early on a flat held-out loss (``patience``),
  so this is an upper bound (the measured search ran 14 and 6 of 20 steps).

Every forward pass takes at least ``t_issue = (KERNELS_PER_LAYER L + KERNELS_PER_PASS) * op_latency`` seconds
(:func:`issue_seconds`): kernels are issued asynchronously, so a pass takes the longer of the GPU's work and the
host's issue time, and for a 135M-parameter model the host's time is the larger by far (a decode step reads
0.54 GB of fp32 weights, 0.3 ms at half the H100's bandwidth; its ~1,200 kernels take 10 ms to issue).

The jobs are the notebooks' own (:func:`profile_jobs`): 04's ``Job("ellava", sparsity, seed, calib_n)``, 05's
:func:`jobs.jobs_grid` and 06's :func:`jobs.ablation_jobs`, all in one sweep folder, so a job shared by two
notebooks runs once. GPU time only: loading models, generating and encoding data, the local judge and Python
between the stages are not counted. First-order: expect a factor of 2 either way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ellava_lib.run import plan
from ellava_lib.speed import costmodel, memory

#: Issue 18: the whole smol profile, build included, on one GPU.
TARGET_S: float = 20 * 60
#: The docs block the smol plan is spliced into (in docs/tiers.md).
README_MARKER = "smol-plan"
#: The docs block of the 2-core calibration: predicted against measured, stage by stage (in docs/tiers.md).
CALIBRATION_MARKER = "smol-cpu-plan"
#: The device preset the measured stages (``benchmarks/results/smol_stages_cpu.json``) were measured on.
CALIBRATION_DEVICE = "cpu-2core"
#: Kernels one eager Llama decoder layer launches per forward: 2 RMSNorms (~7 each), q/k/v/o, rotary on q and k
#: (~10), the KV cache, attention with grouped-query expansion (~5), the SiLU MLP (5), 2 residual adds.
KERNELS_PER_LAYER: int = 40
#: Kernels of a forward outside the layers: embedding, rotary tables, final norm, LM head, generate's bookkeeping.
KERNELS_PER_PASS: int = 20
#: Build-stage factors of :func:`train_flops`: FLOPs per parameter and token.
ROLE_FACTOR: dict[str, int] = {"trained": 6, "frozen_before": 2, "frozen_after": 4}
#: The train preset the smol plan models (SmolLM2's shape, :data:`smol.SMOLLM2`).
PRESET = "smol"
#: Words of a reference answer of the synthetic test split, averaged over the four suites (sqa 1.0, vizwiz 1.0,
#: mmvet 1.2, llavabench 15.6: ``benchmarks/smol_stages.py``, ``eval.answers``); a word of these answers is about
#: one SmolLM2 token.
ANSWER_TOKENS: float = 4.7
#: Tokens a batch of 32 generates per suite before every row has ended: its longest reference answer plus the
#: end-of-sequence token, at most the budget (:data:`evaluate.MAX_NEW_TOKENS`), averaged over the test split's
#: batches in prompt-length order (``benchmarks/smol_stages.py``, ``eval.answers``; words as tokens).
GENERATED_TOKENS: dict[str, float] = {"sqa": 2.0, "vizwiz": 2.0, "mmvet": 2.19, "llavabench": 22.75}

ASSUMPTIONS = (
    "the build runs on the GPU under bf16 autocast (today `train.py` trains on the CPU: a GPU build needs a "
    "device option there)",
    "the tier on the GPU in its own dtype (fp32: the FP32 matmul rate, TF32 off)",
    "every forward pass costs at least the host's kernel-issue time (module docstring), which bounds this "
    "135M model",
    "evaluation generates the suites' reference answers and the end-of-sequence token (02's magnitude-pruned "
    "models: the whole budget); local judge, no API judges",
    "projector rounds at their full steps (they stop early on a flat held-out loss)",
    "GPU time only: model loading, data generation and encoding, judging and Python between stages not counted",
    "first-order model, about 2x either way (on `cpu-2core` each stage is checked within 2x of a measurement)",
)


def applies(params: dict[str, Any]) -> bool:
    """Whether a profile's parameters describe the smol tier (its build trains :data:`PRESET`)."""
    return params.get("train_preset") == PRESET


def issue_seconds(layers: int, prof: costmodel.DeviceProfile) -> float:
    """``(KERNELS_PER_LAYER L + KERNELS_PER_PASS) * op_latency``: the host's time to issue one forward pass."""
    return (KERNELS_PER_LAYER * layers + KERNELS_PER_PASS) * prof.op_latency_s


def train_flops(parts: Sequence[tuple[int, int, str]]) -> float:
    """FLOPs of one training step: ``sum c_role * P * N`` over ``(P parameters, N tokens, role)`` parts, ``c`` from
    :data:`ROLE_FACTOR` (6 trained, 2 frozen before every trained part, 4 frozen after one)."""
    return float(sum(ROLE_FACTOR[role] * p * n for p, n, role in parts))


@dataclass(frozen=True)
class TrainStage:
    """One build stage: ``steps`` steps of ``parts`` (:func:`train_flops`) through ``layers`` sequential layers."""

    name: str
    steps: int
    parts: tuple[tuple[int, int, str], ...]
    layers: int

    @property
    def trained(self) -> int:
        return sum(p for p, _, role in self.parts if role == "trained")

    def step_seconds(self, prof: costmodel.DeviceProfile) -> float:
        """``max(F / (F_bf16 eff), 3 * 4 P_used / (BW eff), 3 t_issue) + 28 P_train / (BW eff)`` (module docstring)."""
        used = sum(p for p, _, _ in self.parts)
        work = max(costmodel.roofline(train_flops(self.parts), 3 * 4.0 * used, prof),
                   3 * issue_seconds(self.layers, prof))
        return work + 28.0 * self.trained / prof.eff(prof.mem_bandwidth)


def build_stages(config, tc) -> list[TrainStage]:
    """The smol build's stages with their steps (:class:`train_config.TrainConfig` ``tc``) and parts (module
    docstring)."""
    from ellava_lib.model import smol, structure

    model = structure.meta_model(config)
    vision = sum(q.numel() for q in model.model.vision_tower.parameters())
    proj = sum(q.numel() for q in model.model.multi_modal_projector.parameters())
    lm = model.num_parameters() - vision - proj
    t = config.text_config
    emb = t.hidden_size * t.vocab_size
    t_v, n_img = structure.vision_tokens_per_image(config), int(config.image_seq_length)
    v_layers, images = config.vision_config.num_hidden_layers, 2 * tc.batch_size
    rows = tc.batch_size
    # with LoRA the decoder (its tied embedding included) is frozen after the trained tower and projector: forward
    # and the backward to its inputs, no weight gradient; only the adapters train, on every decoder token
    frozen_lm = "frozen_after" if tc.lora_rank else "trained"
    adapters = ((lora_parameters(t, tc), rows * smol.TRAIN_TOKENS, "trained"),) if tc.lora_rank else ()
    return [
        TrainStage("vision", tc.vision_steps, ((vision, images * t_v, "trained"),), v_layers),
        TrainStage("align", tc.align_steps, ((vision, images * t_v, "frozen_before"),
                                             (proj, images * n_img, "trained"),
                                             (emb, images * n_img, "frozen_after")), v_layers + 2),
        TrainStage("joint", tc.joint_steps, ((lm, rows * smol.TRAIN_TOKENS, frozen_lm), *adapters,
                                             (vision, 2 * rows * t_v, "trained"),
                                             (proj, 2 * rows * n_img, "trained"),
                                             (emb, rows * n_img, frozen_lm)),
                   t.num_hidden_layers + 2 * v_layers + 4),
    ]


def lora_parameters(text, tc) -> int:
    """Parameters of the recipe's LoRA adapters on a Llama decoder ``text``: ``r (d_in + d_out)`` per adapted
    linear (``A`` is ``r x d_in``, ``B`` is ``d_out x r``), for every decoder layer."""
    head = text.hidden_size // text.num_attention_heads
    h, kv, m = text.hidden_size, (text.num_key_value_heads or text.num_attention_heads) * head, text.intermediate_size
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, m),
              "up_proj": (h, m), "down_proj": (m, h)}
    return tc.lora_rank * text.num_hidden_layers * sum(sum(shapes[name]) for name in tc.lora_targets())


def profile_jobs(params: dict[str, Any], spec) -> list:
    """The sweep jobs of notebooks 04, 05 and 06, as they call :mod:`sweep` (one sweep folder: a job shared by two
    notebooks runs once), in order of first appearance."""
    from ellava_lib.run.jobs import Job, ablation_jobs, jobs_grid

    n, sparsity, seed = int(params["calib_n"]), float(params["sparsity"]), int(params.get("seed", 0))
    jobs = [Job("ellava", sparsity, seed, n)]
    jobs += jobs_grid(params["table_methods"], params["sparsities"], params["seeds"], n)
    jobs += ablation_jobs(spec, sparsity, seed, n, params["gaps"], params["calib_ns"])
    return list({j.name(): j for j in jobs}.values())


@dataclass
class Context:
    """What every estimate needs: the config, its :class:`memory.Dims`, the device profiles (module docstring:
    ``prof`` the tier's forward through oneDNN, ``plain_prof`` the plain GEMM, ``train_prof`` the build's bf16),
    the evaluation batch, and the rows: ``text_tokens`` text tokens of a calibration row as its batch is padded,
    ``mean_text_tokens`` of the real ones, ``prompt_tokens`` of an evaluation prompt (the 9 image tokens aside)."""

    config: Any
    dm: memory.Dims
    prof: costmodel.DeviceProfile
    plain_prof: costmodel.DeviceProfile
    train_prof: costmodel.DeviceProfile
    dtype_bytes: int
    eval_batch: int
    text_tokens: int
    mean_text_tokens: float
    prompt_tokens: float

    @property
    def floor(self) -> float:
        return issue_seconds(self.dm.layers, self.prof)

    def workload(self, calib_n: int = 64, score_rows: int = 24, projector_rows: int = 18) -> memory.Workload:
        """The memory model's workload: every row and prompt at :data:`smol.TRAIN_TOKENS` (the preflight's
        margin), the longest generation budget."""
        from ellava_lib.eval.evaluate import MAX_NEW_TOKENS
        from ellava_lib.model import smol

        text = smol.TRAIN_TOKENS - self.dm.image_tokens
        return memory.Workload(calib_n=calib_n, text_tokens=text, score_rows=score_rows,
                               projector_rows=max(projector_rows, 1), prompt_tokens=text,
                               max_new_tokens=max(MAX_NEW_TOKENS.values()), dtype_bytes=self.dtype_bytes)

    def time_workload(self, calib_n: int = 64, score_rows: int = 24, projector_rows: int = 18) -> memory.Workload:
        """The time model's workload: calibration rows padded to ``text_tokens``, losses reading
        ``mean_text_tokens`` positions a row, prompts of ``prompt_tokens``."""
        return replace(self.workload(calib_n, score_rows, projector_rows), text_tokens=self.text_tokens,
                       prompt_tokens=self.prompt_tokens, logits_tokens=self.mean_text_tokens)


def generated_tokens(suite: str, to_budget: bool = False) -> float:
    """Tokens a batch of ``suite`` generates: :data:`GENERATED_TOKENS` (at most the budget), or with ``to_budget``
    the budget :data:`evaluate.MAX_NEW_TOKENS` (a model that never emits the end-of-sequence token)."""
    from ellava_lib.eval.evaluate import MAX_NEW_TOKENS

    budget = MAX_NEW_TOKENS[suite]
    return float(budget) if to_budget else min(GENERATED_TOKENS[suite], budget)


def _generate(ctx: Context, batch: int, new: float) -> float:
    """:func:`plan.generate_seconds` of one batch: prefill on ``ctx.prof``, decode steps on ``ctx.plain_prof``."""
    return plan.generate_seconds(ctx.config, ctx.dm, ctx.time_workload(), ctx.prof, batch, new, ctx.floor,
                                 ctx.plain_prof)


def eval_seconds(ctx: Context, limit: int, to_budget: bool = False) -> float:
    """``sum_s (n // B_e) generate(B_e, g_s) + generate(n mod B_e, g_s)`` over the synthetic suites, ``n = limit``
    (0: 500, the whole split), ``g_s`` :func:`generated_tokens` (``to_budget``: the whole budget)."""
    from ellava_lib.eval.evaluate import MAX_NEW_TOKENS

    n = limit or 500
    full, rest = divmod(n, ctx.eval_batch)
    return sum(full * _generate(ctx, ctx.eval_batch, generated_tokens(s, to_budget))
               + (_generate(ctx, rest, generated_tokens(s, to_budget)) if rest else 0.0)
               for s in MAX_NEW_TOKENS)


def calib_eval_seconds(ctx: Context, selection_rows: int) -> float:
    """A sweep job's calibration score: its selection rows, about ``k / 4`` per suite, one batch per suite."""
    from ellava_lib.eval.evaluate import MAX_NEW_TOKENS

    per_suite = max(1, math.ceil(selection_rows / len(MAX_NEW_TOKENS)))
    return sum(_generate(ctx, per_suite, generated_tokens(s)) for s in MAX_NEW_TOKENS)


def stat_rows(spec, n: int) -> int:
    """The statistic rows of a calibration draw of ``n``: ``n - floor(select_frac n + 1/2)`` (:func:`jobs.draw_split`:
    every statistic, the level database's Hessians included, reads only these)."""
    from ellava_lib.run.jobs import select_frac

    return n - math.floor(select_frac(spec) * n + 0.5)


def sparsegpt_seconds(ctx: Context, n: int, levels: int = 1, sequential: bool = False):
    """:func:`costmodel.estimate_level_db` at ``levels`` levels on ``n`` rows padded to ``ctx.text_tokens``
    (Hessians on the ``mean_text_tokens`` real ones) on the plain GEMM path; ``sequential`` (a prune) walks the
    decoder twice."""
    return costmodel.estimate_level_db(ctx.config, ctx.plain_prof, levels, n, n_visual_tokens=ctx.dm.image_tokens,
                                       n_text_tokens=ctx.text_tokens,
                                       hessian_tokens=ctx.dm.image_tokens + ctx.mean_text_tokens,
                                       forward_passes=2 if sequential else 1)


def walk_seconds(ctx: Context, n: int) -> float:
    """One walk of the decoder blocks over ``n`` calibration rows (no LM head) on the plain GEMM path:
    ``roofline(n (F - F_head), W)``."""
    from ellava_lib.speed import flops

    terms = flops.flops_per_token(ctx.config, ctx.dm.image_tokens, ctx.text_tokens)
    return costmodel.roofline(n * (terms["total"] - terms["lm_head"]), ctx.dm.params * ctx.dtype_bytes,
                              ctx.plain_prof)


def taylor_seconds(ctx: Context, n: int) -> float:
    """``llm_pruner``'s Taylor scores: one forward and one backward with weight gradients over ``n`` rows, the LM
    head at every position (the loss's logits), on the plain GEMM path: ``3 roofline(n F, W)``."""
    from ellava_lib.speed import flops

    f = flops.flops_per_token(ctx.config, ctx.dm.image_tokens, ctx.text_tokens)["total"]
    return 3 * costmodel.roofline(n * f, ctx.dm.params * ctx.dtype_bytes, ctx.plain_prof)


def importance_seconds(ctx: Context, n: int, loader_batch: int = 1) -> float:
    """ECoFLaP's importances on ``n`` statistic rows (:func:`allocate.zeroth_order_importance`), per loader batch
    of ``B`` rows (``B`` the tier's ``ecoflap_batch``; ``ceil(min(n, S) / B)`` batches, ``S = ECOFLAP_SAMPLES``):
    one dense forward that captures the decoder blocks' inputs, then for each of the ``k`` linears of each block
    ``b < L`` two forwards of blocks ``b .. L-1`` and the LM head. With ``X`` the decoder's FLOPs of one forward
    and ``H`` the head's, the suffixes of a batch cost ``2 k sum_b ((L - b) / L X + H) = 2 k L ((L + 1) / (2 L) X
    + H)``: each is priced as a forward of ``(L + 1) / (2 L) X + H`` FLOPs reading that share of the weights."""
    from ellava_lib.prune.allocate import ECOFLAP_SAMPLES
    from ellava_lib.speed import flops

    terms = flops.flops_per_token(ctx.config, ctx.dm.image_tokens, ctx.text_tokens)
    rows = min(n, ECOFLAP_SAMPLES)
    b = min(loader_batch, rows)
    batches = math.ceil(rows / b)
    layers = ctx.dm.layers
    share = (layers + 1) / (2 * layers)
    suffix_f = share * (terms["lm_linear"] + terms["lm_attention"]) + terms["lm_head"]
    pp = ctx.plain_prof  # the suffixes run the blocks' plain F.linear (no oneDNN routing)
    suffix = max(costmodel.roofline(b * suffix_f, share * ctx.dm.params * ctx.dtype_bytes, pp), ctx.floor)
    capture = max(costmodel.roofline(b * terms["total"], ctx.dm.params * ctx.dtype_bytes, pp), ctx.floor)
    return batches * (capture + 2 * len(ctx.dm.block_linears_in) * layers * suffix)


def search_seconds(ctx: Context, cfg, n: int) -> float:
    """One searched job's search and projector rounds (:func:`plan._search_seconds`,
    :func:`plan._projector_seconds`) with the batches of its configuration ``cfg`` (0: all rows at once): scoring
    and held-out losses on ``ctx.prof`` (oneDNN, no gradient), the projector's training passes on
    ``ctx.plain_prof``."""
    rows = plan.row_counts(n, cfg)
    wl = ctx.time_workload(n, rows["scoring"], rows["train"])
    score = cfg.eval_batch_size or n
    batches = memory.Batches(ctx.eval_batch, score, cfg.projector.micro_batch or max(rows["train"], 1),
                             cfg.projector.checkpointing, False)
    return (plan._search_seconds(ctx.config, ctx.prof, cfg, rows, wl, score, ctx.floor, ctx.dm.image_tokens)
            + plan._projector_seconds(ctx.config, ctx.dm, wl, ctx.prof, cfg, rows, batches, ctx.floor,
                                      ctx.plain_prof))


def prune_seconds(ctx: Context, spec, job) -> float:
    """A job's pruning or search (module docstring); 0 for ``dense``. ECoFLaP's importances are a stage of their own."""
    from ellava_lib.run.jobs import SEARCH_METHODS, search_config

    if job.method == "dense":
        return 0.0
    n = stat_rows(spec, job.calib_n)
    db = sparsegpt_seconds(ctx, n, sequential=True)
    if job.method in SEARCH_METHODS:
        return search_seconds(ctx, search_config(spec, job), job.calib_n) + (0.0 if job.assembled else db.seconds)
    walk = walk_seconds(ctx, n)
    return {"magnitude": 0.0, "wanda": 2 * walk, "sparsegpt": db.seconds, "owl": db.seconds + walk,
            "ecoflap": db.seconds, "llm_pruner": taylor_seconds(ctx, n)}.get(job.method, db.seconds)


def taylor_bytes(ctx: Context, n: int) -> float:
    """Peak of ``llm_pruner``'s one backward over ``n`` calibration rows: a projector step of ``n`` rows without
    checkpointing (:func:`memory.projector_bytes`: weights, every layer's saved activations, logits) plus the
    gradients of the decoder linears."""
    return memory.projector_bytes(ctx.dm, ctx.workload(n), n, False) + ctx.dm.layers * ctx.dm.block_params * \
        ctx.dtype_bytes


def dense_eval_seconds(ctx: Context, params: dict[str, Any]) -> float:
    """Notebook 02's evaluations, per run (their mean): the dense model generating the suites' answers and one
    magnitude-pruned model per ``magnitude_sparsities`` generating to the budget (:func:`eval_seconds`), on
    ``eval_limit`` items per suite."""
    limit = int(params.get("eval_limit", 0) or 0)
    runs = [eval_seconds(ctx, limit)] + [eval_seconds(ctx, limit, to_budget=True)
                                         for _ in params.get("magnitude_sparsities", [])]
    return sum(runs) / len(runs)


def leveldb_seconds(ctx: Context, spec, jobs: Sequence, n: int) -> float:
    """The level database of one calibration draw of ``n`` rows for its searched ``jobs``: the non-dense levels of
    their union grid (:func:`jobs.level_grid`) on the draw's statistic rows (:func:`sparsegpt_seconds`)."""
    from ellava_lib.run.jobs import level_grid

    levels = len([g for g in level_grid(spec, list(jobs)) if g > 0])
    return sparsegpt_seconds(ctx, stat_rows(spec, n), levels).seconds


def job_seconds(ctx: Context, spec, job, limit: int) -> float:
    """One sweep job: pruning or search, then the test evaluation and the calibration score."""
    from ellava_lib.run.jobs import full_method_config

    select = plan.row_counts(job.calib_n, full_method_config(spec, job.sparsity))["selection"]
    return prune_seconds(ctx, spec, job) + eval_seconds(ctx, limit) + calib_eval_seconds(ctx, select)


def _stage(name: str, seconds: float, runs: int, peak: float, knob: str, gpu_gb: float) -> plan.Stage:
    """A :class:`plan.Stage`: ``seconds`` per run (the mean when runs differ), ``peak`` bytes."""
    return plan.Stage(name, peak / plan.GB, 0.0, seconds, knob, peak <= gpu_gb * plan.GB - memory.RESERVE_BYTES,
                      runs)


def context(params: dict[str, Any], device: str | None = None) -> tuple[Context, Any]:
    """The :class:`Context` and the tier of a smol profile on device profile ``device`` (default the profile's
    ``gpu``). ``ValueError`` (one line) for an unknown device profile."""
    from ellava_lib.eval.evaluate import EvalConfig
    from ellava_lib.model import smol
    from ellava_lib.run.tier import Tier

    tier = Tier.from_dict(params.get("tier"))
    gpu = plan.device_profile(device or str(params.get("gpu", "h100")))
    config = smol.llava_config()
    fp32 = tier.dtype == "float32"
    prof = replace(gpu, matmul_flops=gpu.fp32_forward(), forward_bytes=4) if fp32 else gpu
    plain = replace(gpu, matmul_flops=gpu.solver_flops, forward_bytes=4) if fp32 else gpu
    image = int(config.image_seq_length)
    ctx = Context(config, memory.Dims.of(config), prof, plain, gpu, 4 if fp32 else 2,
                  tier.eval_batch_size or EvalConfig().batch_size, smol.TRAIN_TOKENS_MAX - image,
                  smol.TRAIN_TOKENS_MEAN - image, smol.TRAIN_TOKENS_MEAN - image - ANSWER_TOKENS - 1)
    return ctx, tier


def make_plan(profile: str = "smol", device: str | None = None, gpu_gb: float | None = None,
              root: str | Path | None = None) -> plan.Plan:
    """The :class:`plan.Plan` of a smol profile: every stage (module docstring) on one GPU of the device profile
    ``device`` (default the profile's ``gpu``) with ``gpu_gb`` GB (default that profile's memory).
    ``ValueError`` (one line) for an unknown profile or device, a profile that is not the smol tier, or a bad
    ``gpu_gb``."""
    from ellava_lib.model import smol, train
    from ellava_lib.run.jobs import SEARCH_METHODS, SweepSpec, full_method_config, needs_importance

    params = plan.profile_params(profile, root)
    if not applies(params):
        raise ValueError(f"profile {profile!r} does not build the smol tier (train_preset {PRESET!r})")
    ctx, tier = context(params, device)
    gpu_gb = ctx.prof.mem_bytes / plan.GB if gpu_gb is None else gpu_gb
    plan.check_gpu_gb(gpu_gb)
    tc = train.preset(PRESET)
    spec = SweepSpec("smol", params.get("sweep_eval_limit") or None,
                     search_preset=params.get("search_preset", "default"),
                     search=dict(params.get("search") or {}), ellava=dict(params.get("ellava") or {}),
                     tier=dict(params.get("tier") or {}))
    jobs = profile_jobs(params, spec)
    limit = int(params.get("sweep_eval_limit", 0) or 0)
    dm, wl = ctx.dm, ctx.workload(int(params["calib_n"]))
    train_peak = smol.train_memory_bytes(smol.SMOLLM2, tc.batch_size, smol.TRAIN_TOKENS)
    stages = [_stage(f"build: {s.name}", s.steps * s.step_seconds(ctx.train_prof), 1, train_peak,
                     f"{s.steps} steps", gpu_gb) for s in build_stages(ctx.config, tc)]
    eval_peak = memory.eval_bytes(dm, wl, ctx.eval_batch)
    stages.append(_stage("02 dense + magnitude eval", dense_eval_seconds(ctx, params),
                         1 + len(params.get("magnitude_sparsities", [])), eval_peak, f"eval_batch {ctx.eval_batch}",
                         gpu_gb))
    draws = sorted({(j.seed, j.calib_n) for j in jobs if j.method in SEARCH_METHODS})
    db = [leveldb_seconds(ctx, spec, [j for j in jobs if (j.seed, j.calib_n) == (s, n)], n) for s, n in draws]
    db_peak = max(memory.leveldb_bytes(dm, ctx.workload(n), False) for _, n in draws) if draws else 0.0
    stages.append(_stage("level databases", sum(db) / max(len(db), 1), len(db), db_peak, "whole model on the GPU",
                         gpu_gb))
    imp = sorted({(j.seed, j.calib_n) for j in jobs if needs_importance(spec, j)})
    eco_b = spec.get_tier().ecoflap_batch
    stages.append(_stage("ECoFLaP importances", sum(importance_seconds(ctx, stat_rows(spec, n), eco_b)
                                                    for _, n in imp)
                         / max(len(imp), 1), len(imp), eval_peak,
                         "one row per forward" if eco_b == 1 else f"{eco_b} rows per forward", gpu_gb))
    for method in dict.fromkeys(j.method for j in jobs if j.method != "dense"):
        mine = [j for j in jobs if j.method == method]
        secs = [prune_seconds(ctx, spec, j) for j in mine]
        if method in SEARCH_METHODS:
            peak = max(memory.search_bytes(dm, ctx.workload(j.calib_n), j.calib_n) for j in mine)
        elif method == "llm_pruner":
            peak = max(taylor_bytes(ctx, j.calib_n) for j in mine)
        else:
            peak = db_peak or memory.leveldb_bytes(dm, wl, False)
        stages.append(_stage(f"prune: {method}", sum(secs) / len(secs), len(secs), peak,
                             "search" if method in SEARCH_METHODS else "SparseGPT / scores", gpu_gb))
    evals = [eval_seconds(ctx, limit) + calib_eval_seconds(
        ctx, plan.row_counts(j.calib_n, full_method_config(spec, j.sparsity))["selection"]) for j in jobs]
    stages.append(_stage("sweep eval (test + calib)", sum(evals) / len(evals), len(evals), eval_peak,
                         f"eval_batch {ctx.eval_batch}", gpu_gb))
    batches = memory.Batches(ctx.eval_batch, 0, 0, False, False)
    return plan.Plan(profile, "smol (SmolLM2-135M + tiny CLIP tower)", float(gpu_gb), ctx.prof.name, batches,
                     stages, {"jobs": len(jobs), "level_databases": len(db), "importances": len(imp)})


def total_seconds(p: plan.Plan) -> float:
    """``sum seconds * runs`` over the stages."""
    return sum(s.seconds * s.runs for s in p.stages)


def _fmt(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def markdown(p: plan.Plan) -> str:
    """The smol plan as a markdown table, the verdict against :data:`TARGET_S` and the assumptions."""
    lines = ["| stage | peak GPU | time per run | runs | total |", "|---|---:|---:|---:|---:|"]
    for s in p.stages:
        lines.append(f"| {s.name} | {s.peak_gb:.1f} GB | {_fmt(s.seconds)} | {s.runs} | {_fmt(s.seconds * s.runs)} |")
    total = total_seconds(p)
    verdict = "fits" if total <= TARGET_S else "does NOT fit"
    lines.append(f"| **total** | {max(s.peak_gb for s in p.stages):.1f} GB | | | **{_fmt(total)}** |")
    lines += ["", f"*`ellava plan --profile {p.profile} --gpu {p.device}`: predicted {total / 60:.1f} min of GPU time "
              f"for the whole profile ({p.overrides['jobs']} sweep jobs, {p.overrides['level_databases']} level "
              f"databases) on one `{p.device}` ({p.gpu_gb:g} GB; "
              f"{'every stage fits its memory' if p.fits else 'NOT every stage fits its memory'}): {verdict} the "
              f"{TARGET_S / 60:.0f}-minute target. "
              "Assumptions: " + "; ".join(ASSUMPTIONS) + ".*"]
    return "\n".join(lines)


def format_plan(p: plan.Plan) -> str:
    """What ``ellava plan --profile smol`` prints."""
    return f"SMOL PLAN (predicted; run/smolplan.py on speed/costmodel.py + speed/memory.py)\n{markdown(p)}"


def splice_readme(readme: str | Path, p: plan.Plan) -> bool:
    """Write :func:`markdown` of ``p`` between the ``smol-plan`` markers of the project whose README is ``readme``
    (the block's page: :func:`report.update_readme`); whether it changed."""
    from ellava_lib.run.report import update_readme

    return update_readme(Path(readme), README_MARKER, markdown(p))
