"""``fsseg-evaluate``: the command line over :mod:`fsseg.metrics.evaluate`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fsseg.cli import add_common_arguments, add_output_argument, add_structures_argument, number_in, run_cli
from fsseg.vocabulary import EMPTY_POLICY


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsseg-evaluate",
        description="Score predicted label maps against ground truth: Dice, normalised surface Dice (NSD) and HD95 "
        "per case and structure, in the ground truth's native grid with its voxel spacing. Writes per_case.csv and "
        "summary.json and prints a table. A missing prediction counts as a failure. " + EMPTY_POLICY,
    )
    parser.add_argument(
        "--pred",
        required=True,
        help="folder of predicted label maps named by case id (or like the case's image): "
        "fsseg-predict's, or another tool's (nnU-Net, TotalSegmentator)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gt", help="folder of ground-truth label maps named like the predictions")
    source.add_argument("--data-list", help="data list whose cases give the ground truth")
    parser.add_argument("--gt-label-map", help="with --gt: JSON id -> structure name (default: the predictions' ids)")
    parser.add_argument(
        "--pred-label-map",
        help="JSON id -> structure name of the predictions (default: the folder's labels.json, "
        "else the ground truth's ids); e.g. for nnU-Net output, its dataset.json labels inverted",
    )
    parser.add_argument("--split", default="test", help="with --data-list: which split to score (default test)")
    parser.add_argument("--data-root", help="base folder for relative paths of lists without a 'root'")
    add_structures_argument(parser, "structures", "structures to score (default: all in both)")
    parser.add_argument(
        "--nsd-tolerance", type=number_in("(0, inf)"), default=2.0, help="NSD tolerance in mm (default 2)"
    )
    add_output_argument(parser, "output", "report folder (per_case.csv, summary.json)", required=True)
    parser.add_argument(
        "--no-plot",
        action="store_true",
        help="do not draw dice_boxplot.png (drawing needs matplotlib: pip install -e .[viz])",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common_arguments(parser)
    return parser


def _command(args: argparse.Namespace) -> int:
    from fsseg.metrics.evaluate import evaluate_folder, format_summary

    summary = evaluate_folder(
        args.pred,
        args.output,
        gt=args.gt,
        data_list=args.data_list,
        structures=args.structures,
        nsd_tolerance=args.nsd_tolerance,
        gt_label_map=args.gt_label_map,
        pred_label_map=args.pred_label_map,
        split=args.split,
        data_root=args.data_root,
        plot=not args.no_plot,
        progress=not args.no_progress,
    )
    print(format_summary(summary))
    if summary["failed_cases"]:
        print(f"failed cases (scored 0): {', '.join(summary['failed_cases'])}", file=sys.stderr)
    print(f"report: {Path(args.output) / 'per_case.csv'}, {Path(args.output) / 'summary.json'}")
    return 1 if summary["failed_cases"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fsseg-evaluate``."""
    return run_cli("fsseg-evaluate", build_parser(), _command, argv)


if __name__ == "__main__":
    sys.exit(main())
