"""A CT series read from a folder of DICOM files: its geometry checked, its voxels in HU.

SimpleITK (GDCM) reads the headers and the pixels and applies each slice's rescale slope and intercept. What GDCM
leaves to its caller is checked here, each in one line naming the folder: one series per folder, modality CT, one
orientation, and slices evenly spaced along their normal with none missing. Slices are ordered along the normal
(row direction x column direction), as GDCM and dcm2niix order them, and the affine (voxel -> RAS, mm) comes
from the headers, so the grid of a series is known without reading its pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fsseg.errors import DataError

CT_MODALITY = "CT"
PREAMBLE = 128  # a DICOM Part 10 file holds "DICM" after a 128-byte preamble
# Slice steps may differ by rounding in the headers; a step 1.5x the usual one means a slice is missing.
STEP_TOLERANCE = 0.01
MISSING_STEP = 1.5
ORIENTATION_TOLERANCE = 1e-4
TAGS = {
    "series": "0020|000e",
    "modality": "0008|0060",
    "position": "0020|0032",
    "orientation": "0020|0037",
    "pixel_spacing": "0028|0030",
    "rows": "0028|0010",
    "columns": "0028|0011",
    "description": "0008|103e",
    "instance": "0020|0013",
}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Series:
    """One CT series: its files in slice order, the array shape (columns, rows, slices) and the affine
    (voxel -> RAS, mm) of the array the pixels are read into."""

    folder: Path
    files: tuple[Path, ...]
    shape: tuple[int, int, int]
    affine: np.ndarray
    uid: str


def is_dicom_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder holding DICOM files itself (not only in subfolders)."""
    path = Path(path)
    return path.is_dir() and any(_is_dicom_file(p) for p in _candidate_files(path))


def dicom_files(folder: str | Path) -> list[Path]:
    """The DICOM files of ``folder`` (not of its subfolders), sorted by name."""
    return [p for p in _candidate_files(Path(folder)) if _is_dicom_file(p)]


def read_series_header(folder: str | Path) -> Series:
    """The series of ``folder`` from its headers alone.

    Raises:
        DataError: no DICOM files, several series, not CT, slices of different orientations or sizes, gantry
            tilt, duplicate or missing slices, or uneven slice spacing.
    """
    folder = Path(folder)
    files = dicom_files(folder)
    kinds = {p.suffix.lower() for p in files}
    # a damaged slice named like the others (not a stray README.txt): reading on would drop it silently
    damaged = next((p for p in _candidate_files(folder) if p.suffix.lower() in kinds and p not in files), None)
    if damaged is not None:
        raise DataError(
            f"{damaged}: not a readable DICOM file, among the series' slices (truncated or damaged?); "
            "replace or remove it"
        )
    headers = [_header(p) for p in files]
    if not headers:
        raise DataError(f"{folder}: no readable DICOM files in this folder")
    series = sorted({h["series"] for h in headers})
    if len(series) > 1:
        counts = ", ".join(f"{uid} ({sum(h['series'] == uid for h in headers)} files)" for uid in series)
        raise DataError(f"{folder}: holds {len(series)} series ({counts}); give one series per folder")
    modalities = sorted({h["modality"] for h in headers})
    if modalities != [CT_MODALITY]:
        raise DataError(f"{folder}: modality {'/'.join(modalities) or 'missing'}, expected CT")
    if len(headers) < 2:
        raise DataError(f"{folder}: a single slice ({headers[0]['path'].name}); expected a 3D CT series")
    numbers = [h["instance"] for h in headers if h["instance"]]
    repeated = sorted({n for n in numbers if numbers.count(n) > 1}, key=lambda n: (len(n), n))
    if repeated:  # two acquisitions under one SeriesInstanceUID would interleave into one volume
        twice = [h["path"].name for h in headers if h["instance"] == repeated[0]][:2]
        raise DataError(
            f"{folder}: instance number {repeated[0]} is given to {twice[0]} and {twice[1]} (two scans "
            "under one series UID?); give one acquisition per folder"
        )
    first = headers[0]
    for key in ("orientation", "pixel_spacing", "rows", "columns"):
        differing = next((h for h in headers if not _same(h[key], first[key])), None)
        if differing is not None:
            raise DataError(
                f"{folder}: slices differ in {key.replace('_', ' ')} ({first['path'].name}: "
                f"{_shown(first[key])}, {differing['path'].name}: {_shown(differing[key])})"
            )
    row, column = np.array(first["orientation"][:3]), np.array(first["orientation"][3:])
    normal = np.cross(row, column)
    headers.sort(key=lambda h: float(np.dot(h["position"], normal)))
    positions = np.array([h["position"] for h in headers])
    step = _uniform_step(folder, headers, positions, normal)
    row_spacing, column_spacing = first["pixel_spacing"]
    affine = np.eye(4)
    affine[:3, 0] = row * column_spacing  # array axis 0 runs along a row (DICOM's column index)
    affine[:3, 1] = column * row_spacing
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    shape = (int(first["columns"]), int(first["rows"]), len(headers))
    return Series(folder, tuple(h["path"] for h in headers), shape, LPS_TO_RAS @ affine, series[0])


def read_series(folder: str | Path) -> tuple[Series, np.ndarray]:
    """The series of ``folder`` and its voxels in HU (float32, on :attr:`Series.shape`).

    Raises:
        DataError: as :func:`read_series_header`, or a slice whose pixels cannot be read.
    """
    series = read_series_header(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(p) for p in series.files])
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise DataError(f"{series.folder}: cannot read the pixels of a slice ({itk_reason(error)})") from None
    array = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0).astype(np.float32)
    if array.shape != series.shape:
        raise DataError(f"{series.folder}: the pixels read have shape {array.shape}, the headers say {series.shape}")
    return series, array


def _uniform_step(folder: Path, headers: list[dict], positions: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """The vector from one slice to the next, after checking the slices are evenly spaced along the normal."""
    gaps = np.diff(positions @ normal)
    names = [h["path"].name for h in headers]
    usual = float(np.median(gaps))
    repeated = np.flatnonzero(gaps < STEP_TOLERANCE * max(usual, 1e-6))
    if repeated.size:
        i = repeated[0]
        raise DataError(
            f"{folder}: {names[i]} and {names[i + 1]} lie at the same position; a series holds one slice per position"
        )
    for i, gap in enumerate(gaps):
        where = f"{names[i]} and {names[i + 1]}"
        if gap > MISSING_STEP * usual:
            raise DataError(
                f"{folder}: about {round(gap / usual) - 1} slice(s) missing between {where} (a gap of "
                f"{gap:.4g} mm where slices are {usual:.4g} mm apart)"
            )
        if abs(gap - usual) > STEP_TOLERANCE * usual:
            raise DataError(
                f"{folder}: non-uniform slice spacing ({gap:.4g} mm between {where}, {usual:.4g} mm "
                "elsewhere); resample the series to even slices first"
            )
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    tilt = np.degrees(np.arccos(np.clip(abs(np.dot(step, normal)) / np.linalg.norm(step), 0.0, 1.0)))
    if tilt > 0.1:
        raise DataError(
            f"{folder}: slices are stacked at {tilt:.2g} degrees to their normal (gantry tilt); "
            "resample the series onto an orthogonal grid first (e.g. with dcm2niix)"
        )
    return step


def _candidate_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR")


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(PREAMBLE)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _header(path: Path) -> dict:
    """The tags of one DICOM file that place it in a series."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise DataError(f"{path}: cannot be read as DICOM ({itk_reason(error)})") from None
    tag = {key: reader.GetMetaData(code).strip() if reader.HasMetaDataKey(code) else "" for key, code in TAGS.items()}
    for key in ("position", "orientation", "pixel_spacing"):
        if not tag[key]:
            raise DataError(
                f"{path}: has no {key.replace('_', ' ')} tag ({TAGS[key].replace('|', ',')}); "
                "it is not a slice of a CT volume"
            )
    try:
        header = {
            "path": path,
            "series": tag["series"],
            "modality": tag["modality"].upper(),
            "position": [float(v) for v in tag["position"].split("\\")],
            "orientation": [float(v) for v in tag["orientation"].split("\\")],
            "pixel_spacing": [float(v) for v in tag["pixel_spacing"].split("\\")],
            "rows": int(tag["rows"]),
            "columns": int(tag["columns"]),
            "instance": tag["instance"],
        }
    except ValueError:
        raise DataError(f"{path}: malformed position, orientation, spacing or size tags") from None
    geometry = [*header["position"], *header["orientation"], *header["pixel_spacing"]]  # type: ignore[misc]
    if not np.all(np.isfinite(geometry)):  # a NaN position would sort the slice anywhere
        raise DataError(f"{path}: its position, orientation or pixel spacing tags hold a non-finite number")
    return header


def _same(a, b) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and np.allclose(a, b, atol=ORIENTATION_TOLERANCE)
    return a == b


def _shown(value) -> str:
    return "\\".join(f"{v:.4g}" for v in value) if isinstance(value, list) else str(value)


def itk_reason(error: RuntimeError) -> str:
    """SimpleITK's error as one line: the last line of its message, which names the problem."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else "unreadable"
