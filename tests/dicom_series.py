"""Writing a DICOM CT series from a NIfTI scan, as a scanner would store it, for the DICOM tests."""

from __future__ import annotations

import locale
import uuid
from pathlib import Path

import SimpleITK as sitk

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def new_uid() -> str:
    """A DICOM UID (2.25 + a random UUID as an integer)."""
    return f"2.25.{uuid.uuid4().int}"


def write_dicom_series(
    nifti: Path,
    folder: Path,
    *,
    intercept: float = -1024.0,
    modality: str = "CT",
    series_uid: str | None = None,
    study_uid: str | None = None,
    drop: tuple[int, ...] = (),
    shift_mm: dict[int, float] | None = None,
) -> str:
    """Write every slice of ``nifti`` as one DICOM file in ``folder``; return the series UID.

    The voxels are stored shifted by the rescale ``intercept`` (GDCM encodes the HU values given), and files are
    named by their SOP instance UID, so neither the stored values nor the file order say what the HU or slice
    order are: only the headers do. ``drop`` leaves slices out, ``shift_mm`` moves slices along z.
    """
    image = sitk.Cast(sitk.ReadImage(str(nifti)), sitk.sitkInt16)
    series_uid, study_uid = series_uid or new_uid(), study_uid or new_uid()
    folder.mkdir(parents=True, exist_ok=True)
    # GDCM's writer sets the process locale to "C", after which Python decodes subprocess output as ASCII.
    saved = locale.setlocale(locale.LC_ALL, None)
    try:
        _write_slices(image, folder, series_uid, study_uid, drop, shift_mm or {}, intercept, modality)
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    return series_uid


def _write_slices(
    image,
    folder: Path,
    series_uid: str,
    study_uid: str,
    drop: tuple[int, ...],
    shift_mm: dict[int, float],
    intercept: float,
    modality: str,
) -> None:
    direction = image.GetDirection()
    frame_uid = new_uid()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for index in range(image.GetDepth()):
        if index in drop:
            continue
        position = list(image.TransformIndexToPhysicalPoint((0, 0, index)))
        position[2] += shift_mm.get(index, 0.0)
        sop_uid = new_uid()
        tags = {
            "0008|0016": CT_IMAGE_STORAGE,
            "0008|0018": sop_uid,
            "0008|0060": modality,
            "0008|0020": "20260101",
            "0008|0030": "120000",
            "0008|0050": "1",
            "0010|0010": "Test^Patient",
            "0010|0020": "FSSEG-TEST",
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0010": "1",
            "0020|0011": "1",
            "0020|0013": str(index + 1),
            "0020|0052": frame_uid,
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[0::3], *direction[1::3])),
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
            "0028|1052": f"{intercept:g}",
            "0028|1053": "1",
        }
        plane = image[:, :, index]
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{sop_uid}.dcm"))
        writer.Execute(plane)
