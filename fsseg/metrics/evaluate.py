"""``fsseg-evaluate``: score predicted label maps against ground truth, per case and structure, in native space."""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fsseg.data.annotations import load_case_masks
from fsseg.data.datalist import Case, load_datalist
from fsseg.data.io import same_geometry
from fsseg.data.labels import LabelMap
from fsseg.data.scans import load_volume
from fsseg.errors import DataError, FssegError
from fsseg.files import atomic_path, nifti_stem
from fsseg.inference.record import LABELS  # what fsseg-predict names its ids in
from fsseg.metrics.segmentation import StructureScore, score_structure, summarise
from fsseg.outputs import check_outputs, check_run_file, prepare_output_dir
from fsseg.templates import canonical_name
from fsseg.viz import dice_boxplot_png
from fsseg.vocabulary import EMPTY_POLICY

log = logging.getLogger("fsseg.evaluate")
REPORT_FILES = ("per_case.csv", "summary.json", "dice_boxplot.png")
MISSING = StructureScore(0.0, 0.0, math.nan, "missing", 0, 0)
CSV_FIELDS = ["case", "structure", "dice", "nsd", "hd95", "kind", "gt_voxels", "pred_voxels", "status"]


def read_label_names(path: Path, what: str = "label map") -> dict[int, str]:
    """A JSON label map (id -> structure name) whose ids and names are unique, background left out.

    Raises:
        DataError: missing or malformed file, an id given twice ("1" and "01") or a structure named twice.
    """
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: {what} is not valid JSON ({error})") from None
    label_map = LabelMap.parse(raw, str(path))
    names: dict[int, str] = {}
    for file_id, pair in label_map.entries:
        if len(pair) != 1:
            raise DataError(f"{path}: id {file_id} names a left/right pair; a prediction has one structure per id")
        if pair[0] in names.values():
            raise DataError(f"{path}: structure '{pair[0]}' is given two ids; scores would count it twice")
        names[file_id] = pair[0]
    return names


def prediction_names(pred_dir: Path, pred_label_map: str | None, gt_label_map: LabelMap | None) -> dict[int, str]:
    """What the ids of the predictions mean: ``--pred-label-map``, else the folder's ``labels.json`` (written by
    fsseg-predict), else the ground truth's own ids (masks of nnU-Net, TotalSegmentator and other tools).

    Raises:
        DataError: none of them is available, or the one used is malformed.
    """
    if pred_label_map:
        return read_label_names(Path(pred_label_map), "--pred-label-map")
    if (pred_dir / LABELS).is_file():
        return read_label_names(pred_dir / LABELS, LABELS)
    if gt_label_map is None:
        raise DataError(
            f"{pred_dir}: no {LABELS}; give --pred-label-map (or --gt-label-map when the predictions "
            "use the ground truth's ids)"
        )
    return _gt_ids_as_names(gt_label_map, str(pred_dir))


def _gt_ids_as_names(label_map: LabelMap, source: str) -> dict[int, str]:
    """The ground truth's ids read as prediction ids (a left/right pair under one id cannot be matched)."""
    names = {file_id: pair[0] for file_id, pair in label_map.entries if len(pair) == 1}
    if not names:
        raise DataError(f"{source}: the ground truth's label map names no structure by a single id")
    return names


def find_prediction(folder: Path, case: Case, unique_stem: bool) -> Path | None:
    """The prediction of ``case``: named by its id (as fsseg-predict names data-list cases), else like its image
    when no other case's image has that name (TotalSegmentator's ``ct.nii.gz`` never matches)."""
    stems = (case.id, nifti_stem(case.image)) if unique_stem else (case.id,)
    for stem in dict.fromkeys(stems):
        for suffix in (".nii.gz", ".nii"):
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def score_case(
    prediction: Path | None,
    case: Case,
    label_map: LabelMap,
    pred_names: dict[int, str],
    structures: Sequence[str],
    tolerance_mm: float,
    named: bool = True,
) -> tuple[dict[str, StructureScore], str]:
    """Scores of each structure of one case and a status (``ok`` or why it failed). ``named``: the predictions
    come with a label map of their own, which must then name every id they hold."""
    gt_masks, reference = load_case_masks(case, label_map, structures)
    if prediction is None:
        return {s: MISSING for s in structures}, "missing prediction"
    try:
        predicted = load_volume(prediction)
    except DataError as error:
        return {s: MISSING for s in structures}, f"unreadable prediction: {error}"
    if predicted.array.dtype.kind == "f" and not np.array_equal(predicted.array, np.round(predicted.array)):
        return {s: MISSING for s in structures}, f"prediction {prediction.name} holds non-integer values, not label ids"
    mismatch = same_geometry(predicted.array.shape, predicted.affine, reference.array.shape, reference.affine)
    if mismatch:
        return {s: MISSING for s in structures}, f"prediction not on the ground truth's grid: {mismatch}"
    unnamed = sorted(set(np.unique(predicted.array).astype(int).tolist()) - {0} - set(pred_names)) if named else []
    if unnamed:  # another label map than the one given: its structures would be scored as empty
        return {s: MISSING for s in structures}, (
            f"prediction {prediction.name} holds ids {unnamed} that its label map does not name"
        )
    ids = {name: i for i, name in pred_names.items()}
    return {
        s: score_structure(predicted.array == ids[s], gt_masks[s], reference.spacing, tolerance_mm) for s in structures
    }, "ok"


def evaluate(
    pred_dir: Path,
    cases: Sequence[Case],
    label_map: LabelMap,
    structures: Sequence[str] | None,
    tolerance_mm: float,
    progress: bool = False,
    pred_names: dict[int, str] | None = None,
    named: bool | None = None,
) -> tuple[list[dict], dict]:
    """Rows of per-case scores and the summary (per structure and overall).

    ``pred_names``: what the prediction ids mean (default: :func:`prediction_names` without a label map option);
    ``named``: whether that is the predictions' own label map (default: when the folder has a labels.json), which
    must then name every id a prediction holds (other tools' masks may hold structures the ground truth lacks).
    """
    if pred_names is None:
        pred_names = prediction_names(pred_dir, None, label_map)
    if named is None:
        named = (pred_dir / LABELS).is_file()
    if structures:
        chosen = [canonical_name(s) for s in structures]
        absent = [s for s in chosen if s not in pred_names.values()]
        if absent:
            raise DataError(
                f"{pred_dir}: predictions do not contain {', '.join(absent)} "
                f"(labels.json has: {', '.join(pred_names.values())})"
            )
    else:
        annotated = {s for case in cases for s in case.annotated_structures(label_map)}
        chosen = [s for s in pred_names.values() if s in annotated]
        if not chosen:
            raise DataError(
                f"{pred_dir}: no predicted structure ({', '.join(pred_names.values())}) is annotated "
                "in the ground truth"
            )
    rows: list[dict] = []
    per_structure: dict[str, list] = {s: [] for s in chosen}
    stem_counts = Counter(nifti_stem(case.image) for case in cases)
    for case in tqdm(cases, desc="evaluate", unit="case", disable=not progress, file=sys.stderr):
        needed = [s for s in chosen if s in case.annotated_structures(label_map)]
        if not needed:
            continue
        prediction = find_prediction(pred_dir, case, unique_stem=stem_counts[nifti_stem(case.image)] == 1)
        scores, status = score_case(prediction, case, label_map, pred_names, needed, tolerance_mm, named)
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
    lines = [
        f"{'structure':<28} {'n':>3} {'Dice':>14} {'NSD':>14} {'HD95 mm':>16} {'empty gt/pred':>13} {'missing':>7}"
    ]
    items = list(summary["structures"].items()) + [("all", summary["overall"])]

    def cell(s: dict, metric: str) -> str:
        return f"{s[metric]['mean']:.3f} ± {s[metric]['std']:.3f}" if s[metric]["n"] else "-"

    for name, s in items:
        lines.append(
            f"{name:<28} {s['n']:>3} {cell(s, 'dice'):>14} {cell(s, 'nsd'):>14} {cell(s, 'hd95'):>16} "
            f"{str(s['count_empty_gt']) + '/' + str(s['count_empty_pred']):>13} {s['count_missing']:>7}"
        )
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict], summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "per_case.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=lambda v: None) + "\n")


def gt_folder_cases(
    gt_dir: Path, label_map_path: str | None, pred_label_map: str | None, pred_dir: Path
) -> tuple[list[Case], LabelMap]:
    """The cases of a folder of ground-truth label maps, and the label map that names their ids (the given one,
    else the predictions')."""
    if not gt_dir.is_dir():
        raise DataError(f"{gt_dir}: ground-truth folder not found")
    files = sorted(p for p in gt_dir.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise DataError(f"{gt_dir}: no .nii/.nii.gz ground-truth files")
    if label_map_path:
        names = read_label_names(Path(label_map_path), "--gt-label-map")
    elif pred_label_map or (pred_dir / LABELS).is_file():  # the ground truth uses the predictions' ids
        names = prediction_names(pred_dir, pred_label_map, None)
    else:  # two plain id-mask folders (another tool's output and its ground truth): each id is a structure
        names = {i: f"label_{i}" for i in _label_ids(files)}
        log.info(f"neither {gt_dir} nor {pred_dir} names its ids: scoring each id as a structure (label_<id>)")
    label_map = LabelMap.parse({str(i): n for i, n in names.items()}, str(label_map_path or gt_dir))
    return [Case(id=nifti_stem(p), image=p, label=p, split="test") for p in files], label_map


def _label_ids(files: Sequence[Path]) -> list[int]:
    """The non-zero ids found in label files."""
    ids: set[int] = set()
    for path in files:
        ids |= set(np.unique(load_volume(path).array).astype(int).tolist())
    return sorted(ids - {0})


def check_own_report(out: Path) -> None:
    """Refuse an output folder whose report files fsseg-evaluate did not write (a summary.json or per_case.csv of
    the user's would be replaced; the box plot counts as its own beside its own summary)."""
    check_run_file(out / "summary.json", ("evaluation_space", "overall"), "fsseg-evaluate")
    table = out / "per_case.csv"
    if table.exists() and table.read_text(errors="replace").partition("\n")[0].strip() != ",".join(CSV_FIELDS):
        raise DataError(f"{table}: exists and is not a file of fsseg-evaluate; choose another output folder")
    if (out / "dice_boxplot.png").exists() and not (out / "summary.json").exists():
        raise DataError(
            f"{out / 'dice_boxplot.png'}: exists without fsseg-evaluate's summary.json; choose another output folder"
        )


def evaluate_folder(
    pred: str | Path,
    out: str | Path,
    gt: str | Path | None = None,
    data_list: str | Path | None = None,
    structures: Sequence[str] | None = None,
    nsd_tolerance: float = 2.0,
    gt_label_map: str | None = None,
    pred_label_map: str | None = None,
    split: str = "test",
    data_root: str | None = None,
    plot: bool = True,
    progress: bool = True,
) -> dict:
    """Score the label maps of ``pred`` against a folder of ground truth (``gt``) or a data list's ``split``
    cases; write ``per_case.csv``, ``summary.json`` and (``plot``) ``dice_boxplot.png`` into ``out``; return the
    summary (per structure and overall, with the failed cases).

    Raises:
        DataError: a folder or list is missing or empty, or a report would replace an input.
    """
    pred_dir, out = Path(pred), Path(out)
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: prediction folder not found")
    if (gt is None) == (data_list is None):
        raise DataError("give the ground truth as a folder (gt) or a data list (data_list), one of them")
    if data_list is not None:
        datalist = load_datalist(data_list, data_root)
        cases, label_map = datalist.split(split), datalist.label_map
        if not cases:
            raise DataError(f"{data_list}: no '{split}' cases")
    else:
        cases, label_map = gt_folder_cases(Path(str(gt)), gt_label_map, pred_label_map, pred_dir)
    pred_names = prediction_names(pred_dir, pred_label_map, label_map)
    check_outputs(
        [out / name for name in REPORT_FILES], [*(p for c in cases for p in c.files), *pred_dir.glob("*.nii*")]
    )
    check_own_report(out)
    prepare_output_dir(out)
    named = bool(pred_label_map) or (pred_dir / LABELS).is_file()
    rows, summary = evaluate(pred_dir, cases, label_map, structures, nsd_tolerance, progress, pred_names, named)
    write_report(out, rows, summary)
    if plot:
        dice = {s: [r["dice"] for r in rows if r["structure"] == s] for s in summary["structures"]}
        try:
            dice_boxplot_png(out / "dice_boxplot.png", dice, f"Dice per structure ({summary['cases']} cases)")
        except FssegError as error:  # the scores are written; only the picture is missing
            log.warning(f"fsseg-evaluate: warning: no box plot: {error}")
    return summary
