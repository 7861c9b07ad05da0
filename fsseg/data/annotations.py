"""Read a case's annotation as one binary mask per structure, on the case's native grid."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fsseg.data.datalist import Case
from fsseg.data.io import Volume, load_nifti_image, same_geometry
from fsseg.data.labels import LabelMap, structure_masks
from fsseg.data.scans import load_scan_image, load_volume
from fsseg.errors import DataError
from fsseg.templates import canonical_name


def check_case_grid(case: Case) -> None:
    """Check from the headers alone that every annotation file of ``case`` lies on its image's grid.

    Raises:
        DataError: a file is unreadable, or its shape or affine differs from the image's.
    """
    image = load_scan_image(case.image)
    for path in case.annotation_files:
        label = load_nifti_image(path)
        mismatch = same_geometry(label.shape, label.affine, image.shape, image.affine)
        if mismatch:
            raise DataError(f"{path}: does not match its image {case.image.name}: {mismatch}")


def load_case_masks(
    case: Case, label_map: LabelMap, structures: Sequence[str] | None = None
) -> tuple[dict[str, np.ndarray], Volume]:
    """Masks of ``structures`` (default: all the case annotates) and the volume whose grid they lie on.

    Raises:
        DataError: the case has no annotation, does not annotate a requested structure, its files are bad, or
            they do not lie on the image's grid.
    """
    annotated = case.annotated_structures(label_map)
    wanted = [canonical_name(s) for s in structures] if structures else annotated
    missing = [s for s in wanted if s not in annotated]
    if missing:
        raise DataError(
            f"case '{case.id}' does not annotate {', '.join(missing)} (it annotates: "
            f"{', '.join(annotated) or 'nothing'})"
        )
    check_case_grid(case)
    if case.labels:
        masks: dict[str, np.ndarray] = {}
        for name in wanted:
            reference = load_volume(case.labels[name])
            masks[name] = reference.array > 0
        return masks, reference  # wanted is never empty: a case with labels annotates something
    assert case.label is not None  # an annotated case without per-structure masks has a label map
    label = load_volume(case.label)
    label_map.check_ids(label.array, str(case.label))
    split_ids = any(len(pair) == 2 and set(pair) & set(wanted) for _, pair in label_map.entries)
    image = None
    if split_ids:  # the midline of a joint left/right label follows the body, which needs the image
        image = load_volume(case.image).array
    masks = structure_masks(label.array, label_map, label.affine, image)
    return {name: masks[name] for name in wanted}, label
