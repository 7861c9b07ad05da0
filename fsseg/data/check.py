"""``fsseg-check-data``: validate every case of one or more data lists before training on them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from fsseg.cli import add_common_arguments, run_cli
from fsseg.data.datalist import Case, DataList, load_datalist
from fsseg.data.io import Volume, hu_problem, same_geometry
from fsseg.data.scans import load_volume
from fsseg.errors import DataError


@dataclass
class CaseReport:
    """What was found for one case: problems fail it, warnings do not."""

    case: Case
    shape: tuple[int, ...] = ()
    spacing: tuple[float, ...] = ()
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "FAIL" if self.problems else ("WARN" if self.warnings else "ok")


def check_case(case: Case, datalist: DataList, allow_empty: bool = False) -> CaseReport:
    """Load a case's image and annotation and record every problem found."""
    report = CaseReport(case)
    try:
        image = load_volume(case.image)
    except DataError as error:
        report.problems.append(str(error))
        return report
    report.shape, report.spacing = image.array.shape, image.spacing
    problem = hu_problem(image.array, image.path)
    if problem:
        report.problems.append(problem)
    if case.label is not None:
        label = _load_on_grid(case.label, image, report)
        if label is not None:
            _check_label_values(label, datalist, report)
    for structure, path in case.labels.items():
        mask = _load_on_grid(path, image, report)
        if mask is None:
            continue
        values = np.unique(mask.array)
        if not set(values.tolist()) <= {0, 1}:
            report.problems.append(f"{path}: mask of '{structure}' is not binary (values {_short(values)})")
        elif values.max(initial=0) == 0:
            message = f"{path}: mask of '{structure}' is empty"
            (report.warnings if allow_empty else report.problems).append(message)
    if not case.has_annotation and case.split != "test":
        report.warnings.append(f"no annotation for a '{case.split}' case")
    return report


def _load_on_grid(path, image: Volume, report: CaseReport) -> Volume | None:
    try:
        volume = load_volume(path)
    except DataError as error:
        report.problems.append(str(error))
        return None
    mismatch = same_geometry(volume.array.shape, volume.affine, image.array.shape, image.affine)
    if mismatch:
        report.problems.append(f"{path}: does not match its image {image.path.name}: {mismatch}")
        return None
    return volume


def _check_label_values(label: Volume, datalist: DataList, report: CaseReport) -> None:
    values = np.unique(label.array)
    if not np.all(np.equal(np.mod(values, 1), 0)):
        report.problems.append(f"{label.path}: label values are not integers ({_short(values)})")
        return
    try:
        datalist.label_map.check_ids(values, str(label.path))
    except DataError as error:
        report.problems.append(str(error))
    if values.max(initial=0) == 0:
        report.warnings.append(f"{label.path}: label map is empty")


def _short(values: np.ndarray, limit: int = 6) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


def format_table(reports: list[CaseReport]) -> str:
    """A fixed-width per-case table with one line per problem or warning."""
    header = ("case", "split", "shape", "spacing (mm)", "status")
    rows = [
        (
            r.case.id,
            r.case.split,
            "x".join(map(str, r.shape)) or "-",
            "x".join(f"{s:.3g}" for s in r.spacing) or "-",
            r.status,
        )
        for r in reports
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths))]
    for report, row in zip(reports, rows):
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
        lines += [f"    error: {p}" for p in report.problems] + [f"    warning: {w}" for w in report.warnings]
    return "\n".join(lines)


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
