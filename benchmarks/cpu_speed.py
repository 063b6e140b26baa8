"""CPU throughput of the two speed levers the embedded default relies on, measured on this machine.

- ``linear``: one fp32 ``y = x W^T`` at the tiny decoder's shapes, through ``F.linear`` (MKL ``sgemm``) and
  through oneDNN (:func:`ellava_lib.model.kernels.linear`), for several row counts; GFLOP/s = ``2 M K N / t``.
- ``train``: steps per second of the build's text and joint stages for the training recipes ``bf16``
  (autocast, ungrouped batches, one process with two threads) and ``bf16+group`` (the default: autocast and
  length-grouped batches), each a short run of the default :class:`~ellava_lib.model.train_config.TrainConfig` on
  1000 train items per suite; ``train_speedup`` is each recipe's rate over ``bf16``'s. (The ``fp32`` row of
  earlier results, two data-parallel processes with one thread each, measured a training path since removed.)

Usage::

    python benchmarks/cpu_speed.py --out benchmarks/results/cpu_speed.json [--steps 60]

Run it on an otherwise idle machine: both parts use every core.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ellava_lib.model import kernels

RECIPES = {
    "bf16": {"precision": "bf16", "length_group": 1, "threads": 2},
    "bf16+group": {},
}


def _median_time(fn, repeats: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_linear(rows: list[int], shapes: list[tuple[int, int]]) -> list[dict]:
    """Median seconds of ``x W^T`` (x: rows x K, W: N x K) through sgemm and through oneDNN, one thread."""
    torch.set_num_threads(1)
    out = []
    with torch.no_grad():
        for k, n in shapes:
            w = torch.randn(n, k)
            for m in rows:
                x = torch.randn(m, k)
                t_mkl = _median_time(lambda: F.linear(x, w))
                t_dnn = _median_time(lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
                out.append({"rows": m, "in": k, "out": n, "sgemm_us": round(t_mkl * 1e6, 1),
                            "onednn_us": round(t_dnn * 1e6, 1), "sgemm_gflops": round(2 * m * k * n / t_mkl / 1e9, 1),
                            "onednn_gflops": round(2 * m * k * n / t_dnn / 1e9, 1)})
    return out


def _stage_rates(recipe: dict, steps: int) -> dict[str, float]:
    """Steps per second of the text and joint stages (tqdm's final rate, read from a child process, which
    trains with the recipe's thread count as a build does and leaves this process's settings alone)."""
    over = {"induction_steps": 0, "text_steps": steps, "vision_steps": 5, "align_steps": 5, "joint_steps": steps,
            "n_train": {s: 1000 for s in ("sqa", "vizwiz", "mmvet", "llavabench")}, **recipe}
    code = ("import json, sys\nfrom dataclasses import replace\nfrom ellava_lib.model import train\n"
            "if __name__ == '__main__':\n"
            f"    over = json.loads({json.dumps(json.dumps(over))})\n"
            "    train.train(replace(train.TrainConfig(), **over), progress=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rates = {}
    for stage in ("text", "joint"):
        found = re.findall(rf"{stage}: 100%.*?([\d.]+)it/s", proc.stderr.replace("\r", "\n"))
        rates[stage] = float(found[-1]) if found else float("nan")
    return rates


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=60, help="steps per timed training stage")
    args = ap.parse_args(argv)
    record = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "onednn": kernels.available(), "cores": torch.get_num_threads()}
    record["linear"] = bench_linear([32, 256, 1088, 4096], [(128, 352), (352, 128), (128, 128)])
    record["train"] = {name: _stage_rates(r, args.steps) for name, r in RECIPES.items()}
    base = record["train"]["bf16"]
    record["train_speedup"] = {name: {s: round(v[s] / base[s], 2) for s in v} for name, v in record["train"].items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["train_speedup"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
