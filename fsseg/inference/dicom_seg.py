"""Label maps written as DICOM-SEG that reference the series they were predicted from (with highdicom).

One segment per structure, named after it and coded in SNOMED CT where ``dicom_codes.json`` (beside this module)
has a code (laterality as the type's modifier); frames lie on the source slices, in the series' slice order, so
PACS, OHIF and 3D Slicer overlay them on the series. A NIfTI scan has no slices to reference: DICOM-SEG needs
DICOM input.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from fsseg import __version__
from fsseg.data.dicom import Series
from fsseg.errors import DataError
from fsseg.files import atomic_path

CODES_FILE = Path(__file__).resolve().parent / "dicom_codes.json"
LOCAL_SCHEME = "99FSSEG"  # DICOM's prefix for a private coding scheme


def require_highdicom():
    """The highdicom module, or a one-line error saying how to install it."""
    try:
        import highdicom
    except ImportError:
        raise DataError("DICOM-SEG output needs highdicom: pip install 'fsseg[dicom]'") from None
    return highdicom


@lru_cache(maxsize=1)
def _code_table() -> dict:
    return json.loads(CODES_FILE.read_text())


def _code(entry: str | list):
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    if isinstance(entry, list):
        return Code(entry[0], "SCT", entry[1])
    return getattr(codes.SCT, entry)


def segment_description(number: int, structure: str):
    """The highdicom description of segment ``number`` (1-based) for ``structure``."""
    hd = require_highdicom()
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    table = _code_table()
    category, kind, *laterality = table["structures"].get(structure, ["structure", None])
    property_type = _code(kind) if kind else Code(structure[:64], LOCAL_SCHEME, structure)
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=structure,
        segmented_property_category=_code(table["categories"][category]),
        segmented_property_type=property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="fsseg", version=__version__, family=codes.DCM.ArtificialIntelligence
        ),
    )
    if laterality:
        modifier = hd.sr.CodedConcept.from_code(_code(laterality[0]))
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
    return description


def write_dicom_seg(label: np.ndarray, structures: Sequence[str], series: Series, path: str | Path) -> Path:
    """Write ``label`` (on ``series``' grid; id k + 1 is ``structures[k]``) as a binary DICOM-SEG, atomically.

    Raises:
        DataError: highdicom is missing, or ``label`` does not lie on the series' grid.
    """
    hd = require_highdicom()
    import pydicom

    if label.shape != series.shape:
        raise DataError(f"{series.folder}: mask of shape {label.shape} does not lie on the series' grid {series.shape}")
    spacing = float(np.linalg.norm(series.affine[:3, 2]))
    sources = [complete_source(pydicom.dcmread(str(p), stop_before_pixels=True), spacing) for p in series.files]
    frames = np.ascontiguousarray(label.transpose(2, 1, 0))  # (slice, row, column), slices in series order
    segmentation = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(i + 1, s) for i, s in enumerate(structures)],
        series_instance_uid=hd.UID(),
        series_number=_series_number(sources[0]),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="fsseg",
        manufacturer_model_name="fsseg-predict",
        software_versions=__version__,
        device_serial_number="none",
        series_description="fsseg segmentation",
        content_label="FSSEG",
        content_description="fsseg-predict",
        omit_empty_frames=True,
    )
    with atomic_path(path) as tmp:
        segmentation.save_as(str(tmp))
    return Path(path)


# Patient and study attributes a SEG repeats from its source (type 2: present, possibly empty). Series may omit
# them; the SEG then carries them empty.
TYPE2_FROM_SOURCE = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def complete_source(source, slice_spacing: float):
    """``source`` with what the SEG takes from it: every attribute of :data:`TYPE2_FROM_SOURCE` (empty when the
    series has none) and a SliceThickness (the slice spacing when it has none, as SimpleITK's example series)."""
    for keyword in TYPE2_FROM_SOURCE:
        if keyword not in source:
            setattr(source, keyword, "")
    if "SliceThickness" not in source or source.SliceThickness in (None, ""):
        source.SliceThickness = f"{slice_spacing:.6g}"
    return source


def _series_number(source) -> int:
    """A series number beside the source's (DICOM-SEG viewers list the SEG next to its series)."""
    number = getattr(source, "SeriesNumber", None)
    return int(number) + 1000 if number not in (None, "") else 1000
