"""Few-shot support sets and random training crops."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
from monai.transforms.utils import generate_pos_neg_label_crop_centers, map_binary_to_indices

from fsseg.data.datalist import Case
from fsseg.errors import DataError


def sample_support(pool: Sequence[Case], shots: int, seed: int, structure: str = "the structure") -> list[Case]:
    """Draw ``shots`` cases from ``pool`` with a seeded RNG; the same seed gives the same set for every method.

    Raises:
        DataError: ``shots`` exceeds the pool.
    """
    if shots < 1:
        raise DataError(f"--shots must be at least 1, got {shots}")
    if shots > len(pool):
        raise DataError(f"K={shots} shots asked for, but only {len(pool)} train case(s) annotate {structure}")
    ordered = sorted(pool, key=lambda case: case.id)
    return random.Random(seed).sample(ordered, shots)


class CropSampler:
    """Random crops of a (C, X, Y, Z) volume, centred on foreground with probability pos / (pos + neg).

    Uses MONAI's positive/negative centre sampling, with the foreground indices computed once. With
    ``stride`` > 1 each crop keeps every ``stride``-th voxel along each axis from a random offset: the same
    region and foreground/background balance as the full crop at a fraction of the voxels, for heads that
    classify each voxel on its own (a linear probe on cached features). With ``body`` (the preprocessed image,
    (1, X, Y, Z), scaled so that the HU window's floor is 0), negative centres lie where it is above 0, as
    MONAI's ``RandCropByPosNegLabeld(image_threshold=0)`` draws them: inside the body, not in air or padding.
    With ``align`` (voxels per axis), crops start at multiples of it: where features computed at a coarser
    stride line up with the crop.
    """

    def __init__(
        self,
        label: np.ndarray,
        crop: Sequence[int],
        pos: float = 1.0,
        neg: float = 1.0,
        stride: int = 1,
        body: np.ndarray | None = None,
        align: Sequence[int] | None = None,
    ) -> None:
        if stride < 1:
            raise ValueError(f"stride must be at least 1, got {stride}")
        self.align = tuple(align) if align is not None else (1,) * (label.ndim - 1)
        self.shape = tuple(label.shape[1:])
        self.crop = tuple(min(c, s) for c, s in zip(crop, self.shape))
        self.pos_ratio = pos / (pos + neg)
        self.stride = stride
        self.fg, self.bg = map_binary_to_indices(np.asarray(label.any(0))[None], body, image_threshold=0.0)

    def slices(self, count: int, rng: np.random.RandomState) -> list[tuple[slice, ...]]:
        centres = generate_pos_neg_label_crop_centers(
            self.crop, count, self.pos_ratio, self.shape, self.fg, self.bg, rng
        )
        out = []
        for centre in centres:
            starts = [(int(c) - s // 2) // a * a for c, s, a in zip(centre, self.crop, self.align)]
            offsets = rng.randint(self.stride, size=len(starts)) if self.stride > 1 else [0] * len(starts)
            out.append(
                (slice(None),) + tuple(slice(a + o, a + s, self.stride) for a, o, s in zip(starts, offsets, self.crop))
            )
        return out
