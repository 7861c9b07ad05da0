"""``fsseg-check-data``: the command line over :func:`fsseg.data.check.check_data`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fsseg.cli import add_common_arguments, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsseg-check-data",
        description="Validate data lists: every file exists and loads as a 3D NIfTI volume (an image may be a "
        "folder holding one DICOM CT series), labels lie on their "
        "image's grid (shape and affine), label ids are all in the list's label_map, per-structure masks are "
        "binary and non-empty, and images look like CT in HU. Prints one row per case; exits 0 only when no "
        "case fails.",
    )
    parser.add_argument("lists", nargs="+", metavar="LIST.json", help="data list file(s)")
    parser.add_argument(
        "--data-root",
        help="base folder for relative paths of lists without a 'root' "
        "(default: $FSSEG_DATA_ROOT, else each list's folder)",
    )
    parser.add_argument(
        "--allow-empty",
        action="store_true",
        help="report empty per-structure masks as warnings, not failures (TotalSegmentator-style "
        "datasets ship empty masks for structures outside the field of view)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common_arguments(parser)
    return parser


def _command(args: argparse.Namespace) -> int:
    from fsseg.data.check import check_data, format_table

    reports = check_data(args.lists, args.data_root, args.allow_empty, progress=not args.no_progress)
    for report in reports:
        datalist = report.datalist
        print(f"{datalist.path} ({datalist.name}, {len(report.cases)} cases, root {datalist.root})")
        print(format_table(report.cases))
        print(f"{len(report.cases) - report.failed} passed, {report.failed} failed\n")
    failed, total = sum(r.failed for r in reports), sum(len(r.cases) for r in reports)
    if len(reports) > 1:
        print(f"all lists: {total - failed} passed, {failed} failed")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fsseg-check-data``."""
    return run_cli("fsseg-check-data", build_parser(), _command, argv)


if __name__ == "__main__":
    sys.exit(main())
