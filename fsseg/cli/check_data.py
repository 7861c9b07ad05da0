"""``fsseg-check-data``: the command line over :mod:`fsseg.data.check`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tqdm import tqdm

from fsseg.cli import add_common_arguments, run_cli
from fsseg.data.check import check_case, format_table
from fsseg.data.datalist import load_datalist


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
    failed = total = 0
    for list_path in args.lists:
        datalist = load_datalist(list_path, args.data_root)
        cases = tqdm(datalist.cases, desc=datalist.name, unit="case", disable=args.no_progress, file=sys.stderr)
        reports = [check_case(case, datalist, args.allow_empty) for case in cases]
        bad = sum(r.status == "FAIL" for r in reports)
        print(f"{datalist.path} ({datalist.name}, {len(reports)} cases, root {datalist.root})")
        print(format_table(reports))
        print(f"{len(reports) - bad} passed, {bad} failed\n")
        failed, total = failed + bad, total + len(reports)
    if len(args.lists) > 1:
        print(f"all lists: {total - failed} passed, {failed} failed")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fsseg-check-data``."""
    return run_cli("fsseg-check-data", build_parser(), _command, argv)


if __name__ == "__main__":
    sys.exit(main())
