"""The convergence measure of a search (search/convergence.py) and notebook 04's curve of it (run/viz.py)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from ellava_lib.run import viz  # noqa: E402
from ellava_lib.search import checkpoint  # noqa: E402
from ellava_lib.search.convergence import (  # noqa: E402
    best_per_generation,
    history_converged,
    late_improvement,
    late_window,
)


def test_late_improvement_by_hand():
    # G = 4, g0 = 4 - ceil(4 / 4) = 3: (0.84 - 0.838) / 0.84
    assert late_improvement([1.0, 0.9, 0.85, 0.84, 0.838]) == pytest.approx(0.002380952, abs=1e-6)
    # G = 5, g0 = 5 - ceil(5 / 4) = 3: (0.8 - 0.6) / 0.8
    assert late_improvement([2.0, 1.0, 0.9, 0.8, 0.7, 0.6]) == pytest.approx(0.25, abs=1e-12)
    assert [late_window(g) for g in (0, 1, 4, 5, 8, 32, 33)] == [0, 0, 3, 3, 6, 24, 24]
    assert late_improvement([0.7]) == 0.0 and late_improvement([0.5, 0.5, 0.5]) == 0.0
    assert late_improvement([-2.0, -2.5]) == pytest.approx(0.25)  # relative to |b[g0]|
    with pytest.raises(ValueError):
        late_improvement([])


def _row(g, phase, j):
    return {"generation": g, "policy_id": f"p{g}{phase}{j}", "r_hat": j, "g_hat": 0.0, "j": j, "budget": 0.6,
            "n_samples": 9, "phase": phase}


#: A hand-made history: generation 3's best child (0.86) is worse than generation 2's, screening rows (0.5) and the
#: final selection's rows (generation 6) do not count, generation 4 has no full row of its own.
HISTORY = [_row(0, "init", 1.2), _row(0, "init", 1.0),
           _row(1, "screen", 0.5), _row(1, "full", 0.95), _row(1, "full", 0.9),
           _row(2, "full", 0.87), _row(2, "full", 0.85),
           _row(3, "full", 0.86), _row(3, "screen", 0.1),
           _row(4, "screen", 0.2),
           _row(5, "full", 0.838), _row(5, "full", 0.9),
           _row(6, "select", 0.01), _row(6, "select-search", 0.02)]


def test_best_per_generation_is_the_running_best_on_all_rows():
    rows = HISTORY[:-2]  # without the selection rows of generation 6: the last generation is 5
    assert best_per_generation(rows) == [1.0, 0.9, 0.85, 0.85, 0.85, 0.838]
    assert best_per_generation(HISTORY) == [1.0, 0.9, 0.85, 0.85, 0.85, 0.838]  # select phases ignored
    with pytest.raises(ValueError, match="generation-0"):
        best_per_generation(HISTORY[2:])


def test_history_converged_reads_the_history_file(tmp_path):
    path = tmp_path / checkpoint.HISTORY
    checkpoint.start_history(path)
    checkpoint.append_history(path, HISTORY[:-2])
    # b = [1.0, 0.9, 0.85, 0.85, 0.85, 0.838], G = 5, g0 = 3: (0.85 - 0.838) / 0.85 = 1.41 % > 1 %
    assert not history_converged(path)
    checkpoint.append_history(path, [_row(6, "full", 0.84), _row(7, "screen", 0.3), _row(7, "full", 0.837)])
    # b = [.., 0.838, 0.838, 0.837], G = 7, g0 = 7 - 2 = 5: (0.838 - 0.837) / 0.838 = 0.12 % < 1 %
    assert history_converged(path)


def test_the_running_best_restarts_at_a_projector_round():
    # generation 2 forwards the elites a and c again (a new projector): the best is 0.95 there, not 0.9
    rows = [{"generation": g, "policy_id": pid, "phase": phase, "j": j} for g, pid, phase, j in (
        (0, "a", "init", 1.0), (0, "b", "init", 1.2), (1, "c", "full", 0.9), (1, "x", "screen", 0.3),
        (2, "a", "full", 1.1), (2, "c", "full", 0.95), (2, "d", "full", 1.05), (3, "e", "full", 0.93))]
    best = best_per_generation(rows)
    assert best == [1.0, 0.9, 0.95, 0.93]
    # G = 3, g0 = 3 - ceil(3 / 4) = 2: (0.95 - 0.93) / 0.95
    assert late_improvement(best) == pytest.approx(0.0210526316, abs=1e-9)


def test_convergence_curve_plots_the_running_best(tmp_path):
    path = tmp_path / checkpoint.HISTORY
    checkpoint.start_history(path)
    checkpoint.append_history(path, HISTORY)
    history = pd.read_csv(path)
    fig, late = viz.convergence_curve(history)
    # G = 5, g0 = 3: (0.85 - 0.838) / 0.85
    assert late == pytest.approx(0.0141176471, abs=1e-9)
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [0, 1, 2, 3, 4, 5]
    assert list(line.get_ydata()) == [1.0, 0.9, 0.85, 0.85, 0.85, 0.838]
    assert "1.41%" in fig.axes[0].get_title()
    plt.close(fig)


def test_convergence_table_counts_the_searches_that_converged():
    from ellava_lib.run import tables

    # two EfficientLLaVA searches at 60 %: HISTORY (G = 5, g0 = 3: (0.85 - 0.838) / 0.85 = 1.41 %, not converged,
    # 12 history rows) and a flat one (G = 4, g0 = 3: 0 %, converged, 5 rows); a dense row and a search without a
    # history here are left out
    flat = [_row(0, "init", 0.7), _row(1, "full", 0.6), _row(2, "full", 0.6), _row(3, "full", 0.6),
            _row(4, "full", 0.6)]
    results = pd.DataFrame([
        {"job": "ellava-0.60-s0", "method": "ellava", "sparsity": 0.6, "search_s": 40.0},
        {"job": "ellava-0.60-s1", "method": "ellava", "sparsity": 0.6, "search_s": 50.0},
        {"job": "search-0.60-s0", "method": "search", "sparsity": 0.6, "search_s": 30.0},
        {"job": "dense-0.00-s0", "method": "dense", "sparsity": 0.0, "search_s": float("nan")}])
    table = tables.convergence_table(results, {"ellava-0.60-s0": HISTORY[:-2], "ellava-0.60-s1": flat})
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["method"], row["sparsity"], row["searches"], row["converged"]) == ("EfficientLLaVA", "60%", 2, "1/2")
    assert row["late_max"] == pytest.approx(0.012 / 0.85) and (row["generations_min"], row["generations"]) == (4, 5)
    assert row["evaluations"] == pytest.approx(8.5) and row["search_s"] == pytest.approx(45.0)
    shown = tables.format_convergence(table).iloc[0]
    assert (shown["late_max"], shown["generations"], shown["evaluations"], shown["search_s"]) == ("1.4%", "4-5", "8",
                                                                                                   "45")
    assert "generations_min" not in tables.format_convergence(table).columns
    assert tables.convergence_table(results, {}).empty
