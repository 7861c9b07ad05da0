"""``fsseg-phantom``: the command line over :func:`fsseg.data.phantom.write_phantoms`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fsseg.cli import add_common_arguments, add_output_argument, number_in, run_cli


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


def _command(args: argparse.Namespace) -> int:
    from fsseg.data.phantom import write_phantoms

    sizes = (args.source_cases, args.target_train, args.target_test)
    for path in write_phantoms(args.out, args.seed, sizes, args.spacing, not args.no_progress):
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fsseg-phantom``."""
    return run_cli("fsseg-phantom", build_parser(), _command, argv)


if __name__ == "__main__":
    sys.exit(main())
