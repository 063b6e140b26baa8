"""Non-uniform policy allocation under a budget: OWL and ECoFLaP (one sparsity per decoder layer, as their
reference code), and rounding a continuous allocation to the grid.

Budget: the parameter-weighted mean sparsity ``S(pi) = sum_u n_u s_u / N`` must reach the target ``S``.
Both allocators compute a continuous allocation with weighted mean exactly ``S`` and then round it to
the policy grid with :func:`round_to_grid`: every unit goes to the grid point at or below its value,
then units are raised one grid step, largest fractional remainder first, until ``S(pi) >= S`` (once a
single raise can close the gap, the unit whose raise overshoots least is taken). So every unit ends
at the grid point just below or just above its continuous value, and
``S <= S(pi) < S + step * max_u n_u / N`` (the last raise overshoots by at most one step of the largest
unit; ``step`` = the widest grid gap).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ellava_lib.core.policy import DEFAULT_GRID, GRID_TOL, Policy, weighted_mean
from ellava_lib.core.units import is_vision_unit, list_units, lm_layers, unit_linears
from ellava_lib.model.losses import calibration_loss
from ellava_lib.prune.walk import BlockInputs, InputNorms, capture_all_layer_inputs, walk_blocks, wanda_scores


def _bisect(fn: Callable[[float], float], target: float, lo: float, hi: float, iters: int = 200) -> float:
    """``x`` in ``[lo, hi]`` with ``fn(x) ~= target`` for a nondecreasing ``fn`` (the upper end, so
    ``fn(x) >= target`` whenever reachable)."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fn(mid) < target else (lo, mid)
    return hi


def round_to_grid(raw: Mapping[str, float], sizes: Mapping[str, int], target: float,
                  grid: tuple[float, ...] = DEFAULT_GRID) -> dict[str, float]:
    """Round a continuous allocation to ``grid`` keeping ``S(pi) >= target`` (see the module docstring)."""
    g = sorted(set(float(x) for x in grid))
    step_of: dict[str, int] = {}
    frac: dict[str, float] = {}
    for u, s in raw.items():
        s = min(max(float(s), g[0]), g[-1])
        j = max(i for i, v in enumerate(g) if v <= s + GRID_TOL)
        step_of[u] = j
        frac[u] = 0.0 if j == len(g) - 1 else (s - g[j]) / (g[j + 1] - g[j])

    def mean() -> float:
        return weighted_mean({u: g[j] for u, j in step_of.items()}, sizes)

    def gain(u: str) -> float:
        return sizes[u] * (g[step_of[u] + 1] - g[step_of[u]]) / total

    total = sum(sizes.values())
    order = sorted((u for u in step_of if frac[u] > GRID_TOL), key=lambda u: -frac[u])
    while order and mean() < target - 1e-9:
        enough = [u for u in order if gain(u) >= target - mean() - 1e-12]
        u = min(enough, key=gain) if enough else order[0]  # min() keeps the larger remainder on ties
        step_of[u] += 1
        order.remove(u)
    if mean() < target - 1e-9:
        raise ValueError(f"cannot reach mean sparsity {target} on the grid {tuple(g)}")
    return {u: g[j] for u, j in step_of.items()}


def _grid_range(grid: tuple[float, ...], target: float) -> tuple[float, float]:
    lo, hi = min(grid), max(grid)
    if not lo - GRID_TOL <= target <= hi + GRID_TOL:
        raise ValueError(f"target sparsity {target} is outside the grid range [{lo}, {hi}]")
    return lo, hi


# ------------------------------------------------------------------------------------------------- OWL

#: OWL's default range ``lam`` (layer sparsities span ``2 lam``; luuyin/OWL ``--Lamda 0.08``).
OWL_LAMBDA: float = 0.08
#: ECoFLaP's per-layer sparsity cap above the target (ylsung/ECoFLaP scripts: ``max_sparsity_per_layer =
#: 1 - keep_ratio + 0.1``, i.e. ``S + 0.1``).
ECOFLAP_MAX_OFFSET: float = 0.1
#: ECoFLaP's calibration samples for the importance scores (its ``--num_data_first_stage``, default 32).
ECOFLAP_SAMPLES: int = 32


def block_of(unit: str) -> str:
    """The decoder (or vision) block a unit belongs to: ``lm.3.attn`` -> ``lm.3`` (a name without a dot is its
    own block)."""
    return unit.rsplit(".", 1)[0]


def _by_block(values: Mapping[str, float], sizes: Mapping[str, int]) -> tuple[dict[str, float], dict[str, int]]:
    """Per block: the size-weighted mean of ``values`` over its units, and its size."""
    tot: dict[str, float] = {}
    n: dict[str, int] = {}
    for u, size in sizes.items():
        b = block_of(u)
        tot[b] = tot.get(b, 0.0) + float(values[u]) * size
        n[b] = n.get(b, 0) + size
    return {b: tot[b] / n[b] for b in n}, n


def outlier_ratios(model: nn.Module, calib_batch: dict[str, torch.Tensor], M: float = 5.0,
                   include_vision: bool = False, progress: bool = False) -> dict[str, float]:
    """OWL's outlier ratio per decoder layer, given to each of the layer's units: ``D_l = #{S_ij > M * mean_l(S)}
    / #S_l`` over the Wanda scores ``S_ij = |W_ij| * ||X_j||_2`` of *all* the layer's linears pooled, ``mean_l``
    their mean, dense-model inputs (luuyin/OWL ``lib/prune_all.py``: ``check_outlier_mean(torch.cat(
    layer_wmetric), Hyper_m)``, ``Hyper_m = 5``; OWL reports it in percent, which the min-max scaling of
    :func:`owl_allocation` cancels)."""
    units = list(list_units(model, include_vision))
    ratios: dict[str, float] = {}

    def visit(block: str, block_units: dict[str, dict[str, nn.Linear]], stats: dict) -> bool:
        layers: dict[str, list[str]] = {}
        for unit in block_units:
            layers.setdefault(block_of(unit), []).append(unit)
        for members in layers.values():
            scores = torch.cat([wanda_scores(lin.weight, stats[n].norms()).flatten()
                                for u in members for n, lin in block_units[u].items()])
            r = float((scores > M * scores.mean()).double().mean())
            ratios.update({u: r for u in members})
        return False

    walk_blocks(model, calib_batch, units, InputNorms, visit, sequential=False, progress=progress, desc="owl")
    return {u: ratios[u] for u in units}


def owl_allocation(ratios: Mapping[str, float], sizes: Mapping[str, int], sparsity: float, lam: float,
                   grid: tuple[float, ...] = DEFAULT_GRID) -> dict[str, float]:
    """Continuous OWL sparsities (Yin et al. 2024; luuyin/OWL ``lib/prune_all.py``), one per decoder layer::

        D_l  = size-weighted mean of the ratios of layer l's units   (= the pooled ratio of its linears)
        a_l  = (D_l - min D) / (max D - min D) * 2 lam              (0 for every layer when all D_l are equal)
        1 - s_l = a_l - mean(a) + (1 - S)        i.e.   s_l = c - a_l,   c = S + mean(a)

    and every unit of layer ``l`` gets ``s_l`` (more outliers -> lower sparsity). OWL takes the plain mean over
    layers (all its layers have one size); here ``c`` makes the *parameter-weighted* mean exactly ``S`` (the
    same when the layers have one size), found by bisection with ``s_l`` clipped to the grid's range (OWL has
    no clip; it only binds when ``S +- 2 lam`` leaves the grid).
    """
    gmin, gmax = _grid_range(grid, sparsity)
    layer_ratio, _ = _by_block(ratios, sizes)
    dmin, dmax = min(layer_ratio.values()), max(layer_ratio.values())
    a = {b: (d - dmin) / (dmax - dmin) * 2 * lam if dmax > dmin else 0.0 for b, d in layer_ratio.items()}

    def alloc(c: float) -> dict[str, float]:
        return {u: min(max(c - a[block_of(u)], gmin), gmax) for u in sizes}

    c = _bisect(lambda c: weighted_mean(alloc(c), sizes), sparsity, gmin - 1.0, gmax + 2 * lam + 1.0)
    return alloc(c)


def owl_policy(model: nn.Module, calib_batch: dict[str, torch.Tensor], sparsity: float, M: float = 5.0,
               lam: float = OWL_LAMBDA, grid: tuple[float, ...] = DEFAULT_GRID, include_vision: bool = False,
               progress: bool = False, on_grid: bool = True) -> Policy:
    """OWL policy at mean sparsity ``sparsity``: :func:`outlier_ratios` -> :func:`owl_allocation`, then
    :func:`round_to_grid` when ``on_grid`` (a policy the level database can assemble), else the continuous
    allocation itself, as OWL prunes (its levels are added to the policy's grid). OWL's layer sparsities span
    ``2 lam``, so on a grid coarser than that the rounded policy can be nearly uniform.
    ``meta`` keeps the ratios and the continuous allocation."""
    sizes = list_units(model, include_vision)
    ratios = outlier_ratios(model, calib_batch, M, include_vision, progress)
    raw = owl_allocation(ratios, sizes, sparsity, lam, grid)
    meta = {"method": "owl", "target": sparsity, "M": M, "lam": lam, "outlier_ratio": ratios, "continuous": raw}
    if not on_grid:
        return Policy(dict(raw), tuple(sorted(set(grid) | set(raw.values()))), meta)
    return Policy(round_to_grid(raw, sizes, sparsity, grid), tuple(grid), meta)


# --------------------------------------------------------------------------------------------- ECoFLaP


def _rows(batch: Mapping[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    n = batch["input_ids"].shape[0]
    return {k: (v[lo:hi] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v) for k, v in batch.items()}


@torch.no_grad()
def _suffix_loss(model: nn.Module, inputs: list[BlockInputs], start: int, labels: torch.Tensor) -> float:
    """:func:`losses.calibration_loss` of the batch whose dense-forward block inputs are ``inputs``
    (:func:`walk.capture_all_layer_inputs`), for a model that differs from the dense one only in decoder blocks
    ``start`` and later: blocks ``start..L-1`` run from block ``start``'s captured input, then the final norm,
    the LM head and the model's own loss (``model.loss_function``, as ``LlavaForConditionalGeneration`` calls it
    with ``labels=``: shifted labels, fp32 logits, mean over the positions whose label is not ``-100``)."""
    layers = lm_layers(model)
    hidden = inputs[start].hidden
    for i in range(start, len(inputs)):
        hidden = inputs[i].with_hidden(hidden).run(layers[i])
    logits = model.lm_head(model.model.language_model.norm(hidden))
    return float(model.loss_function(logits=logits, labels=labels, vocab_size=model.config.text_config.vocab_size))


@torch.no_grad()
def zeroth_order_importance(model: nn.Module, calib_batch: dict[str, torch.Tensor], eps: float = 1e-3,
                            draws: int = 1, seed: int = 0, include_vision: bool = False,
                            progress: bool = False, samples: int = ECOFLAP_SAMPLES,
                            loader_batch: int = 1) -> dict[str, float]:
    """ECoFLaP's zeroth-order importance of each unit (ylsung/ECoFLaP ``layer_single_base_pruner.py``,
    ``compute_importance_scores_mezo_layer_one``, score method ``olmezo-gradient_sum``)::

        g_{l,b,d} = (L_b(W_l + eps z) - L_b(W_l - eps z)) / (2 eps),   z ~ N(0, I)   (one weight matrix l)
        I_l = sum_b | sum_d |g_{l,b,d}| |,     I_u = sum_{l in u} I_l

    per weight matrix ``l`` (only it perturbed), per calibration batch ``b`` of ``loader_batch`` rows (the first
    ``samples`` rows in order, the last batch possibly shorter; ECoFLaP iterates its calibration data loader the
    same way, one noise draw per loader batch, until ``num_samples`` samples are seen), ``draws`` noise draws
    (ECoFLaP's ``num_noise``, default 1); ``L_b`` = the token-mean answer cross-entropy of batch ``b``
    (:func:`losses.calibration_loss`; ECoFLaP's ``loss_language`` is the LM loss of the batch on the target
    text). ``loader_batch = 1`` (one sample per forward) is the loader of ECoFLaP's LLaMA scripts; a larger one makes
    ``2 draws ceil(samples / B)`` forwards per matrix instead of ``2 draws samples``, each over ``B`` rows,
    which a CPU runs far more efficiently, at a coarser estimate (one ``z`` per batch). The unit score is the *sum*
    over its matrices (``_sum`` aggregation). ``z`` comes from ``torch.Generator().manual_seed(seed * 100003 +
    1009 * k)`` for unit ``k``, drawn in order (matrix by matrix, batch by batch within a matrix, draw by draw);
    the dense weights are restored exactly after each matrix.

    Cost: a perturbed language-model matrix of decoder block ``b`` changes nothing before block ``b``: the vision
    tower, the projector, the embeddings and blocks ``0..b-1`` compute what they compute for the dense model. So
    each loader batch first runs the dense model once, capturing every decoder block's inputs (hidden states,
    causal mask, position ids and embeddings; :func:`walk.capture_all_layer_inputs`), and ``L_b`` of a matrix in
    block ``b`` runs only blocks ``b..L-1`` from block ``b``'s captured input, then the final norm, the LM head and
    the model's loss (:func:`_suffix_loss`). These are the operations the full forward runs from block ``b`` on,
    on the same inputs, so the losses are the same (bitwise on the CPU in fp32: tests/test_baselines.py compares
    them with full forwards); a matrix costs on average half the decoder blocks plus the head instead of the
    whole model (the tiny model: 2.5x faster; SmolLM2's shape, whose 49k-word head weighs a quarter of a
    forward: about 1.5x). The loops run batch by batch, holding one batch's captures (``L`` hidden states of
    ``B x T x d``) at a time, each matrix's noise generator positioned where the matrix-by-matrix order draws its
    ``z``, and the scores are summed in that order, so the result is the estimator's above. Vision-tower
    matrices (``include_vision``) keep the full forward."""
    from tqdm.auto import tqdm

    if int(loader_batch) < 1:
        raise ValueError(f"ECoFLaP's loader batch must be >= 1 row, got {loader_batch}")
    n, step = min(int(samples), calib_batch["input_ids"].shape[0]), int(loader_batch)
    rows = [_rows(calib_batch, b, min(b + step, n)) for b in range(0, n, step)]
    # (unit, layer, linear, first decoder block it changes or None for the vision tower, generator at its z's)
    mats: list[tuple[str, str, nn.Linear, int | None, torch.Generator]] = []
    for k, (unit, lins) in enumerate(unit_linears(model, include_vision).items()):
        gen = torch.Generator().manual_seed(seed * 100003 + 1009 * k)
        for j, (name, lin) in enumerate(lins.items()):
            own = torch.Generator()
            own.set_state(gen.get_state())
            mats.append((unit, name, lin, None if is_vision_unit(unit) else int(unit.split(".")[1]), own))
            if j + 1 < len(lins):  # the unit's next matrix draws after this one's z's
                for _ in range(len(rows) * draws):
                    torch.randn(lin.weight.shape, generator=gen)
    score: dict[tuple[str, str], list[float]] = {(u, name): [] for u, name, *_ in mats}
    bar = tqdm(total=len(rows) * len(mats), desc="ecoflap", disable=not progress, mininterval=1.0)
    for row in rows:
        inputs = capture_all_layer_inputs(model, row) if any(m[3] is not None for m in mats) else None
        for unit, name, lin, block, gen in mats:
            dense = lin.weight.detach().clone()
            acc = 0.0
            for _ in range(draws):
                z = torch.randn(dense.shape, generator=gen).to(dense)
                losses = []
                for sign in (1, -1):
                    lin.weight.copy_(dense + eps * z if sign > 0 else dense - eps * z)
                    losses.append(calibration_loss(model, row) if block is None
                                  else _suffix_loss(model, inputs, block, row["labels"]))
                acc += abs(losses[0] - losses[1]) / (2 * eps)
            lin.weight.copy_(dense)
            score[unit, name].append(abs(acc))
            bar.update(1)
        del inputs
    bar.close()
    out: dict[str, float] = {}
    for (unit, _), per_batch in score.items():  # summed in the matrix-by-matrix, batch-by-batch order
        total = out.get(unit, 0.0)
        for v in per_batch:
            total += v
        out[unit] = total
    return out


def ecoflap_cap(grid: tuple[float, ...] = DEFAULT_GRID) -> float:
    """The highest mean sparsity ECoFLaP can allocate on ``grid``: its largest level (the per-layer cap
    ``min(S + 0.1, max(grid))`` must be at least ``S``)."""
    return max(grid)


def ecoflap_allocation(importance: Mapping[str, float], sizes: Mapping[str, int], sparsity: float,
                       max_offset: float = ECOFLAP_MAX_OFFSET,
                       grid: tuple[float, ...] = DEFAULT_GRID) -> dict[str, float]:
    """Continuous ECoFLaP sparsities, one per decoder block (ylsung/ECoFLaP ``LayerSparsity.return_sparsity``,
    ``compute_the_sparsity_per_group`` with ``sparsity_ratio_granularity = block``)::

        I_B = sum_{u in B} I_u,   n_B = sum_{u in B} n_u,   s_max = min(S + max_offset, g_max)
        k_B = clip(n_B (1 - s_max) + t I_B,  n_B (1 - s_max),  n_B (1 - g_min))
        t solved (bisection) so that sum_B k_B = (1 - S) N;   every unit of B gets s_B = 1 - k_B / n_B

    (ECoFLaP's water-filling: every block first keeps ``ceil(n_B (1 - s_max))``, the rest of the keep budget
    is shared in proportion to the block scores -- not per parameter --, full blocks drop out; here continuous,
    without its ``ceil`` counts, then rounded to the grid by the caller).
    """
    gmin, gmax = _grid_range(grid, sparsity)
    smax = min(sparsity + max_offset, gmax)
    if sparsity > smax + GRID_TOL:
        raise ValueError(f"sparsity {sparsity} is above the ECoFLaP cap {smax:.3g}")
    f = 1 - smax
    score: dict[str, float] = {}
    n: dict[str, int] = {}
    for u, size in sizes.items():
        score[block_of(u)] = score.get(block_of(u), 0.0) + float(importance[u])
        n[block_of(u)] = n.get(block_of(u), 0) + size
    top = max(score.values())
    imp = {b: max(v, 1e-6 * top) if top > 0 else 1.0 for b, v in score.items()}

    def alloc(t: float) -> dict[str, float]:
        kept = {b: min(max(f + t * imp[b] / n[b], f), 1 - gmin) for b in n}
        return {u: 1 - kept[block_of(u)] for u in sizes}

    t_hi = max((1 - gmin - f) * n[b] / imp[b] for b in n) + 1.0
    # mean sparsity decreases in t: bisect on its negative
    t = _bisect(lambda t: -weighted_mean(alloc(t), sizes), -sparsity, 0.0, t_hi)
    return alloc(t)


def ecoflap_policy(model: nn.Module, calib_batch: dict[str, torch.Tensor], sparsity: float,
                   max_offset: float = ECOFLAP_MAX_OFFSET, eps: float = 1e-3, seed: int = 0, draws: int = 1,
                   grid: tuple[float, ...] = DEFAULT_GRID, include_vision: bool = False, progress: bool = False,
                   importance: Mapping[str, float] | None = None, samples: int = ECOFLAP_SAMPLES) -> Policy:
    """ECoFLaP policy: :func:`zeroth_order_importance` -> :func:`ecoflap_allocation` -> :func:`round_to_grid`.
    ``meta`` keeps the importances and the continuous allocation.

    ``importance``: scores already computed for this model and calibration batch (they do not depend on the
    sparsity, so one computation serves every sparsity); must name every unit."""
    sizes = list_units(model, include_vision)
    if importance is None:
        importance = zeroth_order_importance(model, calib_batch, eps, draws, seed, include_vision, progress, samples)
    missing = sorted(set(sizes) - set(importance))
    if missing:
        raise ValueError(f"importance misses units {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    importance = {u: float(importance[u]) for u in sizes}
    raw = ecoflap_allocation(importance, sizes, sparsity, max_offset, grid)
    meta = {"method": "ecoflap", "target": sparsity, "max_offset": max_offset, "eps": eps, "draws": draws,
            "samples": samples, "seed": seed, "importance": importance, "continuous": raw}
    return Policy(round_to_grid(raw, sizes, sparsity, grid), tuple(grid), meta)
