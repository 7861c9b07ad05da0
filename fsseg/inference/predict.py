"""``fsseg-predict``: label maps for a folder of CT scans, each on its input's exact grid."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fsseg.adapters.artifact import load_adapted_model
from fsseg.checkpoint import load_model
from fsseg.cli import (
    number_in,
    user_error,
)
from fsseg.data.datalist import load_datalist
from fsseg.data.dicom import dicom_files, is_dicom_folder, read_series_header
from fsseg.data.io import remove_leftovers, save_like
from fsseg.data.scans import DicomSeries, Scan, find_format, known_formats, load_scan_image, load_volume, resolve_scan
from fsseg.data.transforms import Preprocessing
from fsseg.errors import DataError, DiskFull
from fsseg.inference.dicom_seg import require_highdicom, write_dicom_seg
from fsseg.inference.predictor import (
    RECORDED,
    FrozenBackbone,
    InferenceSettings,
    Network,
    Prediction,
    Predictor,
    prediction_network,
)
from fsseg.inference.record import update_record
from fsseg.templates import expand_structures, suggest_name
from fsseg.viz import overlay_png

log = logging.getLogger("fsseg.predict")
RECORD_EVERY_S = 30.0  # how often a long batch brings predictions.json up to date (and at its end)


@dataclass(frozen=True)
class Inputs:
    """The scans to predict, each under the name of its outputs, and every file the command reads."""

    scans: dict[str, Path]  # output name (case id for data lists, file stem for folders) -> scan
    files: list[Path]  # images and labels a data list names, or the scans: never to be written over


def find_inputs(source: Path, split: str = "test", data_root: str | None = None) -> Inputs:
    """The ``split`` cases of a data list (.json, named by case id); the one scan given (a NIfTI file, or a folder
    holding a DICOM series); or the scans of a folder (its NIfTI files and its DICOM series subfolders), named
    by file stem or folder name.

    Raises:
        DataError: nothing to predict, or two scans of a folder with one name (``a.nii`` and ``a.nii.gz``).
    """
    if source.suffix == ".json":
        datalist = load_datalist(source, data_root)
        cases = datalist.split(split)
        if not cases:
            raise DataError(f"{source}: no '{split}' cases")
        every = [source, *(path for case in datalist.cases for path in case.files)]
        return Inputs({case.id: case.image for case in cases}, every)
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    scan_format = find_format(source)
    if source.is_file() or scan_format is not None:
        if scan_format is None:
            raise DataError(f"{source}: not a scan fsseg reads ({known_formats()})")
        if source.is_dir():
            _check_no_series_below(source)
        scan = Scan(source, scan_format)
        return Inputs({scan.name: source}, scan.files())
    entries = sorted(p for p in source.iterdir() if not p.name.startswith("."))
    found = [Scan(p, f) for p in entries if (f := find_format(p)) is not None]
    if not found:
        raise DataError(f"{source}: no scans in this folder (it reads {known_formats()})")
    scans: dict[str, Path] = {}
    for scan in found:
        if scan.name in scans:
            raise DataError(
                f"{scans[scan.name]} and {scan.path} would both be predicted to "
                f"{scan.mask_path(Path(), scan.name)}; rename or move one of them"
            )
        scans[scan.name] = scan.path
    return Inputs(scans, [file for scan in found for file in scan.files()])


def _check_no_series_below(folder: Path) -> None:
    """A study folder with a stray DICOM file at its root: the series in its subfolders would be hidden."""
    series_below = [p for p in sorted(folder.iterdir()) if p.is_dir() and is_dicom_folder(p)]
    if series_below:
        raise DataError(
            f"{folder}: holds DICOM files ({dicom_files(folder)[0].name}, ...) beside series folders "
            f"({series_below[0].name}, ...); move the loose files into a series folder of their own"
        )


def select_structures(template_structures: Sequence[str], requested: Sequence[str] | None) -> list[int]:
    """Channel indices of the requested structures (aliases accepted); all channels when none are requested."""
    if not requested:
        return list(range(len(template_structures)))
    channels = []
    for canonical in expand_structures(requested):
        if canonical not in template_structures:
            raise DataError(
                f"structure '{canonical}' is not predicted by this model{suggest_name(canonical, template_structures)};"
                f" it predicts: {', '.join(template_structures)}"
            )
        channels.append(list(template_structures).index(canonical))
    return channels


@dataclass(frozen=True)
class Model:
    """What predicts: the loaded models (the checkpoint's, or one per adapter), which of their concatenated output
    channels are kept and their names, the preprocessing and, for adapters, each adapter file's metadata and the
    sliding-window settings they were scored with in fsseg-adapt (empty when they do not agree)."""

    models: list[torch.nn.Module]
    channels: list[int]
    structures: list[str]
    preprocessing: Preprocessing
    adapters: list[dict]
    recorded: dict

    @property
    def network(self) -> Network | FrozenBackbone:
        return prediction_network(self.models, self.channels, adapted=bool(self.adapters))


def build_model(
    checkpoint: str, adapters: Sequence[str] | None, organs: Sequence[str] | None, device: torch.device
) -> Model:
    """The models from image windows to the logits of the requested structures.

    Without adapters: the checkpoint's own head. With adapters: each adapter's structures; when every adapter
    keeps the backbone frozen, its features are stitched over the scan once and every adapter's head slides
    over them (the features these adapters were trained and scored on).
    """
    if not adapters:
        model, template, preprocessing, _ = load_model(checkpoint)
        if not model.head_trained:
            raise DataError(
                f"{checkpoint}: its head was not trained (the weights were imported without one), so its "
                "masks would be noise; adapt it first with fsseg-adapt and predict with --adapter"
            )
        channels = select_structures(template.structures, organs)
        return Model(
            [model.to(device).eval()], channels, [template.structures[c] for c in channels], preprocessing, [], {}
        )
    loaded = [load_adapted_model(path, checkpoint) for path in adapters]
    models = [adapted.to(device).eval() for adapted, _, _ in loaded]
    preprocessing = loaded[0][1]
    if any(pre != preprocessing for _, pre, _ in loaded):
        raise DataError("the adapters were trained with different preprocessing; predict them separately")
    structures = [s for m in models for s in m.structures]
    repeated = sorted({s for s in structures if structures.count(s) > 1})
    if repeated:
        raise DataError(f"more than one adapter predicts {', '.join(repeated)}; give one adapter per structure")
    channels = select_structures(structures, organs)
    records = [info.get("inference") for _, _, info in loaded]
    recorded = records[0] if isinstance(records[0], dict) and all(r == records[0] for r in records) else {}
    if not recorded and any(records):
        log.warning("the adapters were scored with different sliding-window settings; using the command's")
    return Model(
        models, channels, [structures[c] for c in channels], preprocessing, [info for _, _, info in loaded], recorded
    )


def inference_settings(args: argparse.Namespace, recorded: dict) -> InferenceSettings:
    """The command's settings; those it leaves unset come from the adapters' record, then the defaults."""
    given = {name: getattr(args, name) for name in RECORDED}
    chosen = {name: value if value is not None else recorded.get(name) for name, value in given.items()}
    return InferenceSettings(
        sw_batch_size=args.sw_batch_size,
        largest_component=args.largest_component,
        **{name: value for name, value in chosen.items() if value is not None},
    )


OUTPUT_TYPES = ("nifti", "dicom-seg")


def case_outputs(
    out: Path, case: str, output_types: Sequence[str], probabilities: bool, preview: bool, scan: Path | None = None
) -> dict[str, Path]:
    """Every file written for one case, by kind ("nifti", "dicom-seg", "probabilities", "preview"), the masks
    first. The label map ("nifti") is NIfTI, or the format of ``scan`` where it writes one (NRRD, MetaImage)."""
    scan_format = find_format(scan) if scan is not None else None
    kinds = {
        "nifti": f"{case}{scan_format.mask_suffix if scan_format else '.nii.gz'}",
        "dicom-seg": f"{case}.seg.dcm",
        "probabilities": f"{case}_probabilities.nii.gz",
        "preview": f"{case}_preview.png",
    }
    wanted = [
        *(t for t in OUTPUT_TYPES if t in output_types),
        *(["probabilities"] if probabilities else []),
        *(["preview"] if preview else []),
    ]
    return {kind: out / kinds[kind] for kind in wanted}


def check_dicom_seg_inputs(scans: dict[str, Path]) -> None:
    """DICOM-SEG references the slices it segments: refuse it, before any prediction, for a scan that is not a
    DICOM series, or without highdicom.

    Raises:
        DataError: naming the first NIfTI scan, or how to install highdicom.
    """
    other = next((path for path in scans.values() if not isinstance(find_format(path), DicomSeries)), None)
    if other is not None:
        raise DataError(
            f"--output-type dicom-seg needs DICOM series as input (a DICOM-SEG references the slices of its "
            f"source series); {other} is not a DICOM series"
        )
    require_highdicom()


def outputs_are_valid(outputs: Sequence[Path], source: Path) -> bool:
    """True when every output of a case exists and its volumes load on ``source``'s grid (for ``--continue``)."""
    try:
        scan = load_scan_image(source)
        for output in outputs:
            output_format = find_format(output)
            if output_format is None:
                if not output.is_file():
                    return False
                continue
            predicted = output_format.grid(output)
            output_format.read(output)  # every voxel: a truncated output is redone
            if predicted.shape[:3] != scan.shape[:3] or not np.allclose(predicted.affine, scan.affine, atol=1e-4):
                return False
    except Exception:  # any unreadable output is redone
        return False
    return True


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The sliding-window and label-map options (fsseg-predict's, and fsseg-export-bundle's for its bundle)."""
    parser.add_argument(
        "--overlap",
        type=number_in("[0, 1)"),
        help="sliding-window overlap in [0, 1) (default: what the adapters were scored with in fsseg-adapt, else 0.5)",
    )
    parser.add_argument(
        "--sw-batch-size",
        type=number_in("[1, inf)", int),
        help="windows per forward pass (default 4 on CUDA; on the CPU 2 for a roi of at most 64^3 voxels, else 1)",
    )
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        help="float16 autocast on CUDA (default: the adapters' setting, else on; no effect on the CPU)",
    )
    parser.add_argument(
        "--cpu-bf16",
        action=argparse.BooleanOptionalAction,
        help="bfloat16 autocast on the CPU: faster where the CPU has bfloat16 instructions, with "
        "slightly different probabilities (default: the adapters' setting, else off; "
        "predictions.json records the precision used)",
    )
    parser.add_argument(
        "--largest-component", action="store_true", help="keep the largest connected component of each structure"
    )


def predict_cases(
    predictor: Predictor,
    scans: list[tuple[str, Path]],
    planned: dict[str, dict[str, Path]],
    out: Path,
    header: dict,
    args: argparse.Namespace,
) -> dict[str, dict]:
    """Predict this part's cases into ``out``, merging their entries into the folder's record as it goes; the
    entries by case."""
    cases: dict[str, dict] = {}
    flushed = time.monotonic()
    try:
        for case, scan in tqdm(scans, desc="predict", unit="scan", disable=args.no_progress, file=sys.stderr):
            if time.monotonic() - flushed > RECORD_EVERY_S:
                update_record(out, header, cases)
                flushed = time.monotonic()
            paths = planned[case]
            if args.resume and outputs_are_valid(list(paths.values()), scan):
                cases[case] = {"status": "skipped", "image": str(scan), "output": str(next(iter(paths.values())))}
                continue
            for path in paths.values():
                remove_leftovers(path)  # a killed run's half-written file of this case (a case is one part's)
            cases[case] = predict_case(predictor, case, scan, paths, args)
    except DiskFull:
        with contextlib.suppress(DataError):  # record the cases done, where the disk still has room for it
            update_record(out, header, cases)
        raise
    update_record(out, header, cases)
    return cases


def predict_case(predictor: Predictor, case: str, scan: Path, paths: dict[str, Path], args: argparse.Namespace) -> dict:
    """Predict one scan and write its outputs; its entry of predictions.json. A failure is the entry's status: one
    bad scan must not stop the batch, and leaves none of its files. A full disk stops the batch: every later case
    would fail the same way.

    Raises:
        DiskFull: an output could not be written for want of space.
    """
    started = time.perf_counter()
    written: list[Path] = []
    try:
        prediction = predictor(scan, keep_probabilities=args.save_probabilities)
        write_case_outputs(prediction, case, scan, paths, predictor.structures, written)
    except Exception as error:  # MONAI wraps the cause in RuntimeError
        for path in written:  # no case is left half-written: a mask without its probabilities
            path.unlink(missing_ok=True)
        if isinstance(error, DiskFull):
            raise
        found = user_error(error)
        message = str(found) if found else f"{type(error).__name__}: {error}"
        log.error(f"{scan}: failed: {message}")
        return {"status": "failed", "image": str(scan), "error": message}
    structures = predictor.structures
    voxel_ml = float(np.prod(prediction.reference.header.get_zooms()[:3])) / 1000.0
    counts = np.bincount(prediction.label.ravel(), minlength=len(structures) + 1)
    found = [s for i, s in enumerate(structures) if counts[i + 1]]
    entry = {
        "status": "ok",
        "image": str(scan),
        "output": str(next(iter(paths.values()))),
        "seconds": round(time.perf_counter() - started, 2),
        "device": str(predictor.device),
        "structures_found": found,
        "volume_ml": {s: round(float(counts[i + 1]) * voxel_ml, 2) for i, s in enumerate(structures)},
    }
    log.info(f"{case}: {entry['seconds']} s, found {', '.join(found) or 'nothing'}")
    return entry


def write_case_outputs(
    prediction: Prediction,
    case: str,
    scan: Path,
    paths: dict[str, Path],
    structures: Sequence[str],
    written: list[Path],
) -> None:
    """Write one case's outputs (``paths`` by kind), adding each to ``written`` once it is in place."""
    for kind, path in paths.items():
        if kind == "nifti":
            resolve_scan(scan).format.write_mask(prediction.label, scan, prediction.reference, path)
        elif kind == "dicom-seg":
            write_dicom_seg(prediction.label, structures, read_series_header(scan), path)
        elif kind == "probabilities":
            save_like(np.moveaxis(prediction.probabilities, 0, -1), prediction.reference, path)
        else:
            overlay_png(
                path, load_volume(scan).array, prediction.reference.affine, prediction.masks(), f"{case}: fsseg-predict"
            )
        written.append(path)
