"""Label maps: from a dataset's own label ids to template channels and task masks.

A dataset's ``label_map`` maps the integer ids of its label files to structure names. A name may end in
``@split`` (``"kidney@split"``) when the dataset labels a left/right pair with one id: the voxels are then
divided at the patient's midline into ``kidney_right`` and ``kidney_left``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fsseg.errors import DataError
from fsseg.templates import Template, canonical_name

SPLIT_SUFFIX = "@split"
BACKGROUND_NAMES = {"background", "bg"}
# Tissue denser than fat and air; its centroid marks the body's midline.
BODY_HU_THRESHOLD = -500.0


@dataclass(frozen=True)
class LabelMap:
    """File label id -> structure name(s); a split id carries two names, right first.

    Ids mapped to ``"background"`` are known but unannotated: their voxels count as background.
    """

    entries: tuple[tuple[int, tuple[str, ...]], ...]
    background_ids: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, raw: Mapping[str, str], source: str = "label_map") -> LabelMap:
        """Validate a JSON ``label_map`` (``{"1": "spleen", "2": "kidney@split"}``).

        Id 0 and names "background" are dropped. Raises DataError naming ``source`` on bad entries.
        """
        if not isinstance(raw, Mapping):
            raise DataError(f"{source}: 'label_map' must be an object of id -> structure name")
        entries, background, seen = [], set(), {}  # type: ignore[var-annotated]
        for key, value in raw.items():
            try:
                file_id = int(key)
            except (TypeError, ValueError):
                raise DataError(f"{source}: label_map key '{key}' is not an integer label id") from None
            if file_id < 0:
                raise DataError(f"{source}: label_map id {file_id} is negative")
            if file_id in seen:
                raise DataError(f"{source}: label_map gives id {file_id} twice ('{seen[file_id]}' and '{key}')")
            seen[file_id] = key
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{source}: label_map id {file_id} must name a structure, got {value!r}")
            if file_id == 0 or value.strip().lower() in BACKGROUND_NAMES:
                background.add(file_id)
                continue
            entries.append((file_id, _expand(value)))
        return cls(tuple(sorted(entries)), frozenset(background - {0}))

    @property
    def ids(self) -> set[int]:
        return {file_id for file_id, _ in self.entries}

    @property
    def structures(self) -> list[str]:
        """Canonical names of every structure this map annotates, in id order, without repeats."""
        names: list[str] = []
        for _, pair in self.entries:
            names.extend(n for n in pair if n not in names)
        return names

    def ids_of(self, structure: str) -> list[int]:
        """File ids whose voxels (or one side of them, for split ids) belong to ``structure``."""
        name = canonical_name(structure)
        return [file_id for file_id, pair in self.entries if name in pair]

    def to_dict(self) -> dict[str, str]:
        """The JSON form (split entries written back as ``base@split``)."""
        out = {str(file_id): "background" for file_id in sorted(self.background_ids)}
        for file_id, pair in self.entries:
            out[str(file_id)] = pair[0] if len(pair) == 1 else _split_base(pair[0]) + SPLIT_SUFFIX
        return out

    def check_ids(self, label: np.ndarray, source: str) -> None:
        """Raise DataError when ``label`` holds ids the map does not know (0 is background)."""
        present = set(np.unique(label).tolist()) - {0}
        unknown = sorted(present - self.ids - self.background_ids)
        if unknown:
            shown = ", ".join(str(int(v)) if float(v).is_integer() else str(v) for v in unknown[:10])
            raise DataError(f"{source}: label id(s) {shown} not in the dataset's label_map")


def _expand(name: str) -> tuple[str, ...]:
    name = name.strip()
    if not name.endswith(SPLIT_SUFFIX):
        return (canonical_name(name),)
    base = name[: -len(SPLIT_SUFFIX)].strip("_ ")
    return (canonical_name(f"{base}_right"), canonical_name(f"{base}_left"))


def _split_base(right_name: str) -> str:
    return right_name[: -len("_right")] if right_name.endswith("_right") else right_name


def task_mask(structures: list[str], template: Template) -> np.ndarray:
    """Float vector over the template's channels: 1 where the structure is annotated, else 0."""
    mask = np.zeros(len(template), dtype=np.float32)
    for name in structures:
        channel = template.channel(name)
        if channel is not None:
            mask[channel] = 1.0
    return mask


def midline_x(affine: np.ndarray, shape: tuple[int, ...], image: np.ndarray | None = None) -> float:
    """World x (RAS, mm) of the patient's sagittal midline.

    With the CT ``image`` (HU) this is the centroid of the body (voxels above -500 HU), which follows an
    off-centre patient; without it, the centre of the field of view.
    """
    if image is not None:
        body = np.asarray(image) > BODY_HU_THRESHOLD
        total = body.sum()
        if total:
            # The centroid's voxel coordinates from the marginal counts along each axis.
            mean_ijk = [
                (body.sum(axis=tuple(a for a in range(3) if a != axis)) * np.arange(body.shape[axis])).sum() / total
                for axis in range(3)
            ]
            return float(affine[0, :3] @ np.asarray(mean_ijk) + affine[0, 3])
    centre = (np.asarray(shape[:3], dtype=float) - 1) / 2
    return float(affine[0, :3] @ centre + affine[0, 3])


def right_side(voxels: np.ndarray, affine: np.ndarray, midline: float) -> np.ndarray:
    """For an (N, 3) array of voxel indices, True where the voxel lies on the patient's right (RAS +x)."""
    return voxels @ affine[0, :3] + affine[0, 3] > midline


def structure_masks(
    label: np.ndarray,
    label_map: LabelMap,
    affine: np.ndarray,
    image: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Binary mask of every structure of ``label_map`` in a multi-label ``label`` volume.

    Split ids are divided at :func:`midline_x`; ids absent from the volume give empty masks.
    """
    masks: dict[str, np.ndarray] = {name: np.zeros(label.shape, dtype=bool) for name in label_map.structures}
    midline = None
    for file_id, pair in label_map.entries:
        voxels = label == file_id
        if len(pair) == 1:
            masks[pair[0]] |= voxels
            continue
        if midline is None:
            midline = midline_x(affine, label.shape, image)
        ijk = np.argwhere(voxels)
        right = right_side(ijk, affine, midline)
        for side, name in ((right, pair[0]), (~right, pair[1])):
            picked = ijk[side]
            masks[name][picked[:, 0], picked[:, 1], picked[:, 2]] = True
    return masks


def to_template_index(masks: Mapping[str, np.ndarray], template: Template, shape: tuple[int, ...]) -> np.ndarray:
    """Combine structure masks into one uint8 map: 0 background, ``c + 1`` for template channel ``c``.

    Structures outside the template are left out (they are not trained against it).
    """
    index = np.zeros(shape, dtype=np.uint8 if len(template) < 255 else np.uint16)
    for name, mask in masks.items():
        channel = template.channel(name)
        if channel is not None:
            index[mask] = channel + 1
    return index
