"""``fsseg-check-data``: validate every case of one or more data lists before training on them."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

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


@dataclass
class ListReport:
    """The checks of one data list: the list as read and a report for each of its cases."""

    datalist: DataList
    cases: list[CaseReport]

    @property
    def failed(self) -> int:
        return sum(r.status == "FAIL" for r in self.cases)


def check_data(
    lists: Sequence[str | Path], data_root: str | None = None, allow_empty: bool = False, progress: bool = True
) -> list[ListReport]:
    """Check every case of each data list in ``lists`` (files, grids, label ids, masks, HU range).

    Raises:
        DataError: a list itself cannot be read; a case's problems are in its report instead.
    """
    reports = []
    for path in lists:
        datalist = load_datalist(path, data_root)
        cases = tqdm(datalist.cases, desc=datalist.name, unit="case", disable=not progress, file=sys.stderr)
        reports.append(ListReport(datalist, [check_case(case, datalist, allow_empty) for case in cases]))
    return reports
