"""What the ``ellava`` commands share: the one-line error type, the parser whose usage errors are one line
(exit status 2), argument types, and the tier / data options of eval, prune and search."""

from __future__ import annotations

import argparse
from pathlib import Path

from ellava_lib.core.schema import SUITES


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``ellava: error: ...``) with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"ellava: error: {message}\n")


def suites_arg(value: str) -> tuple[str, ...]:
    if value == "all":
        return SUITES
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if n not in SUITES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown suite {','.join(bad) or value!r}; choose from all, {', '.join(SUITES)}")
    return names


def _int_at_least(value: str, low: int, kind: str) -> int:
    """``int(value)`` if it is ``>= low``, else an ``ArgumentTypeError`` naming ``kind`` (one line, exit 2)."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value!r}") from None
    if n < low:
        raise argparse.ArgumentTypeError(f"must be a {kind} integer, got {n}")
    return n


def positive_int(value: str) -> int:
    return _int_at_least(value, 1, "positive")


def non_negative_int(value: str) -> int:
    return _int_at_least(value, 0, "non-negative")


def tier_of(args: argparse.Namespace):
    """The :class:`tier.Tier` the data options describe (a ValueError for a bad combination: exit 2)."""
    from ellava_lib.run.tier import Tier, check_device

    tier = Tier(model=str(args.model), data=args.data, data_dir=args.data_dir, judge=getattr(args, "judge", "local"),
                device=getattr(args, "device", None) or "cpu", dtype=args.dtype)
    check_device(tier)
    return tier


def model_dir_of(spec: str, quiet: bool) -> str | Path:
    """A hub name as is (loaded in ``--dtype``), else the built-in or folder model it names."""
    from ellava_lib.model.specs import HUB_MODELS, resolve_model_dir

    return spec if spec in HUB_MODELS else resolve_model_dir(spec, progress=not quiet)


def add_data_args(parser: argparse.ArgumentParser, judge: bool = False) -> None:
    """The tier options shared by eval / prune / search (see :class:`tier.Tier`)."""
    parser.add_argument("--data", choices=("synthetic", "real"), default="synthetic",
                        help="synthetic suite, or the real benchmarks of ellava_lib/data/manifests/ (calibration from "
                             "their training split)")
    parser.add_argument("--data-dir", default=None,
                        help="with --data real: local parquet copies in the upstream schema under "
                             "DIR/<benchmark>/ instead of the Hugging Face hub")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float16",
                        help="weights dtype of a hub model (llava-1.5-7b); built-in and folder models keep theirs")
    if judge:
        parser.add_argument("--judge", choices=("local", "gpt"), default="local",
                            help="mmvet / llavabench judge: local deterministic, or GPT (OPENAI_BASE_URL, "
                                 "OPENAI_API_KEY, ELLAVA_JUDGE_MODEL from the environment)")
