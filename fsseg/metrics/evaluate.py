"""``fsseg-evaluate``: score predicted label maps against ground truth, per case and structure, in native space."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from fsseg.cli import add_common_arguments, run_cli
from fsseg.data.annotations import load_case_masks
from fsseg.data.datalist import Case, load_datalist
from fsseg.data.io import atomic_path, load_volume, nifti_stem, same_geometry
from fsseg.data.labels import LabelMap
from fsseg.errors import DataError, FssegError
from fsseg.metrics.segmentation import EMPTY_POLICY, StructureScore, score_structure, summarise
from fsseg.templates import canonical_name
from fsseg.viz import dice_boxplot_png

MISSING = StructureScore(0.0, 0.0, math.nan, "missing", 0, 0)
CSV_FIELDS = ["case", "structure", "dice", "nsd", "hd95", "kind", "gt_voxels", "pred_voxels", "status"]


def read_label_names(path: Path) -> dict[int, str]:
    """``labels.json`` (id -> structure name) of a prediction folder, background left out."""
    if not path.is_file():
        raise DataError(f"{path}: not found (fsseg-predict writes it next to the masks)")
    try:
        raw = json.loads(path.read_text())
        return {int(k): canonical_name(v) for k, v in raw.items() if int(k) != 0}
    except (ValueError, AttributeError) as error:
        raise DataError(f"{path}: not a JSON object of id -> structure name ({error})") from None


def find_prediction(folder: Path, case: Case) -> Path | None:
    """The prediction of ``case``: named like its image (as fsseg-predict writes), else like its id."""
    for stem in dict.fromkeys((nifti_stem(case.image), case.id)):
        for suffix in (".nii.gz", ".nii"):
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def score_case(prediction: Path | None, case: Case, label_map: LabelMap, pred_names: dict[int, str],
               structures: Sequence[str], tolerance_mm: float) -> tuple[dict[str, StructureScore], str]:
    """Scores of each structure of one case and a status (``ok`` or why it failed)."""
    gt_masks, reference = load_case_masks(case, label_map, structures)
    if prediction is None:
        return {s: MISSING for s in structures}, "missing prediction"
    try:
        predicted = load_volume(prediction)
    except DataError as error:
        return {s: MISSING for s in structures}, f"unreadable prediction: {error}"
    mismatch = same_geometry(predicted.array.shape, predicted.affine, reference.array.shape, reference.affine)
    if mismatch:
        return {s: MISSING for s in structures}, f"prediction not on the ground truth's grid: {mismatch}"
    ids = {name: i for i, name in pred_names.items()}
    return {s: score_structure(predicted.array == ids[s], gt_masks[s], reference.spacing, tolerance_mm)
            for s in structures}, "ok"


def evaluate(pred_dir: Path, cases: Sequence[Case], label_map: LabelMap, structures: Sequence[str] | None,
             tolerance_mm: float, progress: bool = False) -> tuple[list[dict], dict]:
    """Rows of per-case scores and the summary (per structure and overall)."""
    pred_names = read_label_names(pred_dir / "labels.json")
    if structures:
        chosen = [canonical_name(s) for s in structures]
        absent = [s for s in chosen if s not in pred_names.values()]
        if absent:
            raise DataError(f"{pred_dir}: predictions do not contain {', '.join(absent)} "
                            f"(labels.json has: {', '.join(pred_names.values())})")
    else:
        annotated = {s for case in cases for s in case.annotated_structures(label_map)}
        chosen = [s for s in pred_names.values() if s in annotated]
        if not chosen:
            raise DataError(f"{pred_dir}: no predicted structure ({', '.join(pred_names.values())}) is annotated "
                            "in the ground truth")
    rows, per_structure = [], {s: [] for s in chosen}
    for case in tqdm(cases, desc="evaluate", unit="case", disable=not progress, file=sys.stderr):
        needed = [s for s in chosen if s in case.annotated_structures(label_map)]
        if not needed:
            continue
        scores, status = score_case(find_prediction(pred_dir, case), case, label_map, pred_names, needed, tolerance_mm)
        for structure, score in scores.items():
            per_structure[structure].append(score)
            rows.append({"case": case.id, "structure": structure, **score.to_dict(), "status": status})
    summary = {
        "evaluation_space": "native: the ground truth's grid, distances in mm from its header",
        "nsd_tolerance_mm": tolerance_mm,
        "empty_policy": EMPTY_POLICY,
        "cases": len({r["case"] for r in rows}),
        "failed_cases": sorted({r["case"] for r in rows if r["status"] != "ok"}),
        "structures": {s: summarise(scores) for s, scores in per_structure.items()},
        "overall": summarise([score for scores in per_structure.values() for score in scores]),
    }
    return rows, summary


def format_summary(summary: dict) -> str:
    """A table: one row per structure, then all."""
    lines = [f"{'structure':<28} {'n':>3} {'Dice':>14} {'NSD':>14} {'HD95 mm':>16} {'empty gt/pred':>13} {'missing':>7}"]
    items = list(summary["structures"].items()) + [("all", summary["overall"])]
    for name, s in items:
        def cell(metric: str) -> str:
            return f"{s[metric]['mean']:.3f} ± {s[metric]['std']:.3f}" if s[metric]["n"] else "-"
        lines.append(f"{name:<28} {s['n']:>3} {cell('dice'):>14} {cell('nsd'):>14} {cell('hd95'):>16} "
                     f"{str(s['count_empty_gt']) + '/' + str(s['count_empty_pred']):>13} {s['count_missing']:>7}")
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict], summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "per_case.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=lambda v: None) + "\n")


def _gt_folder_cases(gt_dir: Path, label_map_path: str | None, pred_dir: Path) -> tuple[list[Case], LabelMap]:
    if not gt_dir.is_dir():
        raise DataError(f"{gt_dir}: ground-truth folder not found")
    raw = json.loads(Path(label_map_path).read_text()) if label_map_path else \
        {str(i): n for i, n in read_label_names(pred_dir / "labels.json").items()}
    files = sorted(p for p in gt_dir.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise DataError(f"{gt_dir}: no .nii/.nii.gz ground-truth files")
    return [Case(id=nifti_stem(p), image=p, label=p, split="test") for p in files], LabelMap.parse(raw, str(gt_dir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsseg-evaluate",
        description="Score predicted label maps against ground truth: Dice, normalised surface Dice (NSD) and HD95 "
        "per case and structure, in the ground truth's native grid with its voxel spacing. Writes per_case.csv and "
        "summary.json and prints a table. A missing prediction counts as a failure. " + EMPTY_POLICY,
    )
    parser.add_argument("--pred", required=True, help="folder written by fsseg-predict (masks + labels.json)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gt", help="folder of ground-truth label maps named like the predictions")
    source.add_argument("--data-list", help="data list whose cases give the ground truth")
    parser.add_argument("--gt-label-map", help="with --gt: JSON id -> structure name (default: the predictions' ids)")
    parser.add_argument("--split", default="test", help="with --data-list: which split to score (default test)")
    parser.add_argument("--data-root", help="base folder for relative paths of lists without a 'root'")
    parser.add_argument("--structures", nargs="+", metavar="NAME", help="structures to score (default: all in both)")
    parser.add_argument("--nsd-tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    parser.add_argument("-o", "--output", required=True, help="report folder (per_case.csv, summary.json)")
    parser.add_argument("--no-plot", action="store_true",
                        help="do not draw dice_boxplot.png (drawing needs matplotlib: pip install -e .[viz])")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common_arguments(parser)
    return parser


def _command(args: argparse.Namespace) -> int:
    pred_dir = Path(args.pred)
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: prediction folder not found")
    if args.data_list:
        datalist = load_datalist(args.data_list, args.data_root)
        cases, label_map = datalist.split(args.split), datalist.label_map
        if not cases:
            raise DataError(f"{args.data_list}: no '{args.split}' cases")
    else:
        cases, label_map = _gt_folder_cases(Path(args.gt), args.gt_label_map, pred_dir)
    rows, summary = evaluate(pred_dir, cases, label_map, args.structures, args.nsd_tolerance, not args.no_progress)
    write_report(Path(args.output), rows, summary)
    if not args.no_plot:
        dice = {s: [r["dice"] for r in rows if r["structure"] == s] for s in summary["structures"]}
        try:
            dice_boxplot_png(Path(args.output) / "dice_boxplot.png", dice, f"Dice per structure ({summary['cases']} cases)")
        except FssegError as error:  # the scores are written; only the picture is missing
            print(f"fsseg-evaluate: warning: no box plot: {error}", file=sys.stderr)
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
