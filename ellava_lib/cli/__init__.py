"""The ``ellava`` command line: thin wrappers that build the same config objects the notebooks use.

    ellava build [--preset tiny|smol] [--seed N] [--force]   train (or find cached) a built-in model, print its folder
    ellava eval --model tiny --suite all --split test --out DIR [--limit N] [--vizwiz-testdev-out FILE]
    ellava inspect --model tiny|smol|FOLDER|llava-1.5-7b [--meta] [--vision] [--json]   units and sizes, never trains
    ellava prune --model tiny --method sparsegpt --sparsity 0.6 [--nm 2:4] --calib 64 --seed 0 --out DIR
    ellava prune --model FOLDER --policy SEARCH_DIR --out DIR      SparseGPT under a searched policy (+ its projector)
    ellava search --model tiny --sparsity 0.6 --calib 64 [--preset ci|default|smol|paper] [--no-projector] --out DIR
    ellava sweep --profile default --out runs/default [--what main|ablations|all] [--backend local|ray] [--retries N]
    ellava plan --profile paper [--gpu-mem GB] [--json] [--readme README.md]   predicted memory / disk / time
    ellava dryrun --profile paper --random-weights --out DIR [--shrink]        every stage on random weights
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ellava_lib.cli.common import CLIError, Parser

__all__ = ["CLIError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``ellava`` parser: each command's options are registered by its module (``add_parsers``)."""
    from ellava_lib.cli import model, plan, prune, sweep

    p = Parser(prog="ellava", description="EfficientLLaVA reproducibility kit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in (model, prune, sweep, plan):
        module.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ellava_lib.data.real import DataLoadError
    from ellava_lib.eval.gpt_judge import JudgeError
    from ellava_lib.model.loading import ModelLoadError

    out = Path(args.out) if getattr(args, "out", None) else None
    created = out is not None and not out.exists()  # a failed command removes only a folder it made
    try:
        return args.func(args)
    except (CLIError, ModelLoadError, DataLoadError, JudgeError, ValueError, OSError) as e:
        _remove_if_created(out, created)
        print(f"ellava: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # kept: an interrupted search resumes from its folder
        print("ellava: interrupted", file=sys.stderr)
        return 130
    except BaseException:
        _remove_if_created(out, created)
        raise


def _remove_if_created(out: Path | None, created: bool) -> None:
    """No half-written output: remove ``--out`` when this command created it and then failed."""
    import shutil

    if created and out is not None and out.exists():
        if out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        else:
            out.unlink(missing_ok=True)
