"""``fsseg-phantom``: the command line over :mod:`fsseg.data.phantom`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fsseg.cli import add_common_arguments, add_output_argument, number_in, run_cli
from fsseg.data.io import staged_writes
from fsseg.data.phantom import (
    DESCRIPTION,
    default_datasets,
    write_dataset,
)
from fsseg.errors import DataError
from fsseg.outputs import prepare_output_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsseg-phantom",
        description="Write synthetic abdominal CT data sets (NIfTI + data lists): three partially labelled source "
        "data sets for pretraining and a fully labelled target data set with train/test splits.",
    )
    add_output_argument(parser, "out", "output folder (data sets and <name>.json lists)", required=True)
    parser.add_argument(
        "--seed",
        type=number_in("[0, 4294967295]", int),
        default=0,
        help="random seed; the same seed gives the same volumes",
    )
    parser.add_argument(
        "--source-cases", type=number_in("[1, inf)", int), default=4, help="volumes per source data set (default 4)"
    )
    parser.add_argument(
        "--target-train", type=number_in("[1, inf)", int), default=8, help="target train volumes (default 8)"
    )
    parser.add_argument(
        "--target-test", type=number_in("[1, inf)", int), default=4, help="target test volumes (default 4)"
    )
    parser.add_argument(
        "--spacing",
        type=number_in("[0.5, 8]"),
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="voxel size in mm for every volume, 0.5 to 8 (default: a mix of 1.5-3 mm, anisotropic)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common_arguments(parser)
    return parser


def _check_replaceable(path: Path) -> None:
    """Refuse a data list at ``path`` that is not a phantom list: the user's own would be replaced."""
    try:
        ours = json.loads(path.read_text())["description"].startswith(DESCRIPTION)
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        ours = False
    if not ours:
        raise DataError(f"{path}: exists and is not a list of fsseg-phantom; choose another --out")


def _command(args: argparse.Namespace) -> int:
    out = prepare_output_dir(args.out, "--out")
    datasets = default_datasets(args.source_cases, args.target_train, args.target_test)
    for dataset in datasets:
        _check_replaceable(out / f"{dataset.name}.json")
    with staged_writes(out) as staging:  # all data sets or none: no half-written one after an error
        names = [write_dataset(staging, d, args.seed, args.spacing, not args.no_progress).name for d in datasets]
    for name in names:
        print(f"wrote {out / name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fsseg-phantom``."""
    return run_cli("fsseg-phantom", build_parser(), _command, argv)


if __name__ == "__main__":
    sys.exit(main())
