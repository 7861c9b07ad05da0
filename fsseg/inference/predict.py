"""``fsseg-predict``: label maps for a folder of CT scans, each on its input's exact grid."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fsseg.adapters.artifact import load_adapted_model
from fsseg.checkpoint import load_model
from fsseg.data.datalist import load_datalist
from fsseg.data.dicom import dicom_files, is_dicom_folder, read_series_header
from fsseg.data.io import save_like
from fsseg.data.scans import (
    DicomSeries,
    Scan,
    ScanFormat,
    find_format,
    known_formats,
    load_scan_image,
    load_volume,
    resolve_scan,
)
from fsseg.errors import DataError, DiskFull, user_error
from fsseg.files import atomic_path, remove_leftovers
from fsseg.inference.confidence import PRIORS, structure_confidences
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
from fsseg.inference.record import LABELS, REPORT, check_owned, update_record
from fsseg.outputs import check_outputs, check_unique_outputs, prepare_output_dir
from fsseg.preprocessing import Preprocessing
from fsseg.templates import expand_structures, suggest_name
from fsseg.training.runtime import resolve_device
from fsseg.viz import overlay_png, pyplot
from fsseg.vocabulary import OUTPUT_TYPES

log = logging.getLogger("fsseg.predict")
RECORD_EVERY_S = 30.0  # how often a long batch brings predictions.json up to date (and at its end)


@dataclass(frozen=True)
class Inputs:
    """The scans to predict, each under the name of its outputs, and every file the command reads."""

    scans: dict[str, Path]  # output name (case id for data lists, file stem for folders) -> scan
    files: list[Path]  # images and labels a data list names, or the scans: never to be written over
    formats: dict[str, ScanFormat | None]  # output name -> the scan's format, found once (None: none claims it)


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
        return Inputs({c.id: c.image for c in cases}, every, {c.id: find_format(c.image) for c in cases})
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    scan_format = find_format(source)
    if source.is_file() or scan_format is not None:
        if scan_format is None:
            raise DataError(f"{source}: not a scan fsseg reads ({known_formats()})")
        if source.is_dir():
            _check_no_series_below(source)
        scan = Scan(source, scan_format)
        return Inputs({scan.name: source}, scan.files(), {scan.name: scan_format})
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
    formats: dict[str, ScanFormat | None] = {scan.name: scan.format for scan in found}
    return Inputs(scans, [file for scan in found for file in scan.files()], formats)


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
    for canonical in expand_structures(list(requested)):
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

    models: Sequence[torch.nn.Module]
    channels: list[int]
    structures: list[str]
    preprocessing: Preprocessing
    adapters: list[dict]
    recorded: dict

    @property
    def network(self) -> Network | FrozenBackbone:
        return prediction_network(self.models, self.channels, adapted=bool(self.adapters))

    @property
    def size_priors(self) -> dict[str, float]:
        """The organ-size prior (ml) of each kept structure whose adapter recorded its supports' sizes."""
        recorded = {name: ml for adapter in self.adapters for name, ml in adapter.get(PRIORS, {}).items()}
        return {name: recorded[name] for name in self.structures if name in recorded}


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


def inference_settings(given: Mapping[str, Any], recorded: dict) -> InferenceSettings:
    """The settings ``given`` (overlap, amp, cpu_bf16, sw_batch_size, largest_component; None: unset); those left
    unset come from the adapters' record, then the defaults."""
    chosen = {name: given.get(name) if given.get(name) is not None else recorded.get(name) for name in RECORDED}
    return InferenceSettings(
        sw_batch_size=given.get("sw_batch_size"),
        largest_component=bool(given.get("largest_component")),
        **{name: value for name, value in chosen.items() if value is not None},
    )


def case_outputs(
    out: Path,
    case: str,
    output_types: Sequence[str],
    probabilities: bool,
    preview: bool,
    scan_format: ScanFormat | None = None,
) -> dict[str, Path]:
    """Every file written for one case, by kind ("nifti", "dicom-seg", "probabilities", "preview"), the masks
    first. The label map ("nifti") is NIfTI, or the format of the case's scan where it writes one (NRRD,
    MetaImage)."""
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


def check_dicom_seg_inputs(inputs: Inputs) -> None:
    """DICOM-SEG references the slices it segments: refuse it, before any prediction, for a scan that is not a
    DICOM series, or without highdicom.

    Raises:
        DataError: naming the first scan that is not a DICOM series, or how to install highdicom.
    """
    other = next((inputs.scans[n] for n, f in inputs.formats.items() if not isinstance(f, DicomSeries)), None)
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
            predicted = output_format.read(output)  # every voxel: a truncated output is redone
            if predicted.array.shape[:3] != scan.shape[:3] or not np.allclose(predicted.affine, scan.affine, atol=1e-4):
                return False
    except Exception:  # any unreadable output is redone
        return False
    return True


def predict_cases(
    predictor: Predictor,
    scans: list[tuple[str, Path]],
    formats: Mapping[str, ScanFormat | None],
    planned: dict[str, dict[str, Path]],
    out: Path,
    header: dict,
    options: FolderOptions,
) -> dict[str, dict]:
    """Predict this part's cases into ``out``, merging their entries into the folder's record as it goes; the
    entries by case."""
    cases: dict[str, dict] = {}
    flushed = time.monotonic()
    try:
        for case, scan in tqdm(scans, desc="predict", unit="scan", disable=not options.progress, file=sys.stderr):
            if time.monotonic() - flushed > RECORD_EVERY_S:
                update_record(out, header, cases)
                flushed = time.monotonic()
            paths = planned[case]
            if options.resume and outputs_are_valid(list(paths.values()), scan):
                cases[case] = {"status": "skipped", "image": str(scan), "output": str(next(iter(paths.values())))}
                continue
            for path in paths.values():
                remove_leftovers(path)  # a killed run's half-written file of this case (a case is one part's)
            source = (scan, formats.get(case))
            cases[case] = predict_case(predictor, case, source, paths, options, header.get(PRIORS, {}))
    except DiskFull:
        with contextlib.suppress(DataError):  # record the cases done, where the disk still has room for it
            update_record(out, header, cases)
        raise
    update_record(out, header, cases)
    return cases


def predict_case(
    predictor: Predictor,
    case: str,
    source: tuple[Path, ScanFormat | None],
    paths: dict[str, Path],
    options: FolderOptions,
    priors_ml: Mapping[str, float],
) -> dict:
    """Predict one scan and write its outputs; its entry of predictions.json. A failure is the entry's status: one
    bad scan must not stop the batch, and leaves none of its files. A full disk stops the batch: every later case
    would fail the same way. ``source``: the scan and its format, found once for the folder (None: none claimed
    it; looked up again for this case, which then fails).

    Raises:
        DiskFull: an output could not be written for want of space.
    """
    started = time.perf_counter()
    written: list[Path] = []
    scan = source[0]
    try:
        prediction = predictor(scan, keep_probabilities=options.save_probabilities)
        found = findings(prediction, priors_ml, options.flag_below)
        write_case_outputs(prediction, source, paths, written, preview_title(case, found["confidence"]))
    except Exception as error:  # MONAI wraps the cause in RuntimeError
        for path in written:  # no case is left half-written: a mask without its probabilities
            path.unlink(missing_ok=True)
        if isinstance(error, DiskFull):
            raise
        reason = user_error(error)
        message = str(reason) if reason else f"{type(error).__name__}: {error}"
        log.error(f"{scan}: failed: {message}")
        return {"status": "failed", "image": str(scan), "error": message}
    seconds = round(time.perf_counter() - started, 2)
    log.info(f"{case}: {seconds} s, found {', '.join(found['structures_found']) or 'nothing'}")
    return {
        "status": "ok",
        "image": str(scan),
        "output": str(next(iter(paths.values()))),
        "seconds": seconds,
        "device": str(predictor.device),
        **found,
    }


def findings(prediction: Prediction, priors_ml: Mapping[str, float], flag_below: float | None) -> dict:
    """What a case's entry reports of its prediction: the structures found, each one's volume (ml) and confidence
    (:mod:`fsseg.inference.confidence`, with the organ-size priors ``priors_ml`` of the adapters' supports) and,
    with ``flag_below``, ``review``: the structures of lower confidence."""
    structures = prediction.structures
    voxel_ml = float(np.prod(prediction.reference.header.get_zooms()[:3])) / 1000.0
    counts = np.bincount(prediction.label.ravel(), minlength=len(structures) + 1)
    volumes = {s: round(float(counts[i + 1]) * voxel_ml, 2) for i, s in enumerate(structures)}
    confidences = structure_confidences(structures, prediction.uncertainty, volumes, priors_ml)
    found = {
        "structures_found": [s for i, s in enumerate(structures) if counts[i + 1]],
        "volume_ml": volumes,
        "confidence": {name: c.to_dict() for name, c in confidences.items()},
    }
    if flag_below is not None:
        found["review"] = [name for name, c in confidences.items() if c.confidence < flag_below]
    return found


def preview_title(case: str, confidence: Mapping[str, dict], shown: int = 4) -> str:
    """The preview's title: the case and the confidence of its first ``shown`` structures."""
    scores = ", ".join(f"{name} {c['confidence']:.2f}" for name, c in list(confidence.items())[:shown])
    more = f", +{len(confidence) - shown} more" if len(confidence) > shown else ""
    return f"{case}: fsseg-predict (confidence {scores}{more})"


def write_case_outputs(
    prediction: Prediction,
    source: tuple[Path, ScanFormat | None],
    paths: dict[str, Path],
    written: list[Path],
    title: str,
) -> None:
    """Write one case's outputs (``paths`` by kind) for ``source`` (a scan and its format), adding each to
    ``written`` once it is in place."""
    scan, scan_format = source
    for kind, path in paths.items():
        if kind == "nifti":
            (scan_format or resolve_scan(scan).format).write_mask(prediction.label, scan, prediction.reference, path)
        elif kind == "dicom-seg":
            write_dicom_seg(prediction.label, prediction.structures, read_series_header(scan), path)
        elif kind == "probabilities":
            assert prediction.probabilities is not None  # asked for with this output
            save_like(np.moveaxis(prediction.probabilities, 0, -1), prediction.reference, path)
        else:
            overlay_png(path, load_volume(scan).array, prediction.reference.affine, prediction.masks(), title)
        written.append(path)


@dataclass(frozen=True)
class FolderOptions:
    """What :func:`predict_folder` writes and how; the sliding-window settings left None come from the adapters'
    record (what fsseg-adapt scored them with), then the defaults."""

    output_types: Sequence[str] = ("nifti",)
    save_probabilities: bool = False
    preview: bool = False
    resume: bool = False  # skip the cases whose outputs exist and are valid
    part: tuple[int, int] = (0, 1)  # this process predicts part I of P
    progress: bool = True
    inference: Mapping[str, Any] = field(default_factory=dict)  # overlap, amp, cpu_bf16, sw_batch_size, ...
    flag_below: float | None = None  # a case with a structure of lower confidence is marked for review


def plan_outputs(inputs: Inputs, out: Path, options: FolderOptions) -> dict[str, dict[str, Path]]:
    """Every case's output files, refused before the first write when two collide, one would replace an input or a
    file fsseg-predict did not write."""
    if "dicom-seg" in options.output_types:
        check_dicom_seg_inputs(inputs)
    planned = {
        case: case_outputs(out, case, options.output_types, options.save_probabilities, options.preview, scan_format)
        for case, scan_format in inputs.formats.items()
    }
    # every file of every case, before the first write: case x's probabilities are case x_probabilities's mask
    check_unique_outputs(
        {
            f"{inputs.scans[case]} ({kind} of {case})": path
            for case, paths in planned.items()
            for kind, path in paths.items()
        }
    )
    every = [out / LABELS, out / REPORT, *(p for paths in planned.values() for p in paths.values())]
    check_outputs(every, inputs.files, folder=out)
    check_owned(
        out, every, lambda case: case_outputs(out, case, OUTPUT_TYPES, True, True, inputs.formats.get(case)).values()
    )
    return planned


def predict_folder(
    source: str | Path,
    out: str | Path,
    checkpoint: str | Path,
    adapters: Sequence[str] = (),
    organs: Sequence[str] | None = None,
    options: FolderOptions = FolderOptions(),
    device: str = "auto",
    split: str = "test",
    data_root: str | None = None,
) -> dict[str, dict]:
    """Segment the scans of ``source`` (a folder of scans, one scan, or a data list's ``split`` cases) into ``out``
    with ``checkpoint`` (or its ``adapters``); returns each case's entry of ``predictions.json`` (status, seconds,
    structures found, volumes).

    Raises:
        DataError, ConfigError: bad input or outputs in the way, before anything is written.
    """
    index, parts = options.part
    if not 0 <= index < parts:
        raise DataError(f"--part-id {index} must lie in [0, --num-parts {parts})")
    inputs, out = find_inputs(Path(source), split, data_root), Path(out)
    planned = plan_outputs(inputs, out, options)
    prepare_output_dir(out)
    scans = list(inputs.scans.items())[index::parts]
    chosen = resolve_device(device)
    model = build_model(str(checkpoint), list(adapters) or None, organs, chosen)
    settings = inference_settings(options.inference, model.recorded)
    predictor = Predictor(model.network, model.structures, model.preprocessing, chosen, settings)
    if options.preview:
        pyplot()  # fail now, not after the first case, when matplotlib is missing
    labels = {"0": "background", **{str(i + 1): name for i, name in enumerate(model.structures)}}
    with atomic_path(out / LABELS) as tmp:
        tmp.write_text(json.dumps(labels, indent=1) + "\n")
    header = {
        "model": str(checkpoint),
        "device": str(predictor.device),
        "structures": model.structures,
        "inference": {**asdict(settings), "sw_batch_size": predictor.sw_batch_size},
        "precision": predictor.precision,
        PRIORS: model.size_priors,
    }
    # this part's cases are recorded before their files are written: a later run then knows the files as its own
    update_record(out, header, {case: {"status": "pending", "image": str(scan)} for case, scan in scans})
    return predict_cases(predictor, scans, inputs.formats, planned, out, header, options)
