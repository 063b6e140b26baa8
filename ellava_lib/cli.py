"""The ``ellava`` command line: thin wrappers that build the same config objects the notebooks use.

    ellava build [--force]                    train (or find cached) the tiny model, print its folder
    ellava eval --model tiny --suite all --split test --out DIR [--limit N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .schema import SUITES
from .synth import SPLITS


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``ellava: error: ...``) with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"ellava: error: {message}\n")


def _suites(value: str) -> tuple[str, ...]:
    if value == "all":
        return SUITES
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if n not in SUITES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown suite {','.join(bad) or value!r}; choose from all, {', '.join(SUITES)}")
    return names


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


def cmd_build(args: argparse.Namespace) -> int:
    from .train import TrainConfig, build_or_load

    t0 = time.time()
    path = build_or_load(TrainConfig(), force=args.force)
    print(f"tiny model: {path} ({time.time() - t0:.0f} s)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from . import io
    from .evaluate import EvalConfig, evaluate, headline
    from .loading import load_model

    cfg = EvalConfig(suites=args.suite, split=args.split, limit=args.limit, batch_size=args.batch_size,
                     data_seed=args.data_seed)
    out = io.ensure_dir(Path(args.out))  # fail before any work if the folder is unusable
    model, processor = load_model(args.model)
    frame = evaluate(model, processor, cfg, out, progress=not args.quiet)
    print(headline(frame).round(2).to_string())
    print(f"wrote {out / 'metrics.csv'} and {out / 'predictions.jsonl'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ellava", description="EfficientLLaVA reproducibility kit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("build", help="train the tiny model (cached) and print its folder")
    b.add_argument("--force", action="store_true", help="retrain even if cached")
    b.set_defaults(func=cmd_build)

    e = sub.add_parser("eval", help="evaluate a model on the synthetic suites")
    e.add_argument("--model", default="tiny", help="'tiny' or a model folder")
    e.add_argument("--suite", type=_suites, default=SUITES, help="all, or a comma-separated list")
    e.add_argument("--split", choices=SPLITS, default="test")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--limit", type=_positive_int, default=None, help="first N items per suite")
    e.add_argument("--batch-size", type=_positive_int, default=32)
    e.add_argument("--data-seed", type=int, default=0)
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .loading import ModelLoadError

    try:
        return args.func(args)
    except (CLIError, ModelLoadError, ValueError, OSError) as e:
        print(f"ellava: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ellava: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
