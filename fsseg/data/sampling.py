"""Few-shot support sets and random training crops."""

from __future__ import annotations

import random
from typing import Sequence

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

    Uses MONAI's positive/negative centre sampling, with the foreground indices computed once.
    """

    def __init__(self, label: np.ndarray, crop: Sequence[int], pos: float = 1.0, neg: float = 1.0) -> None:
        self.shape = tuple(label.shape[1:])
        self.crop = tuple(min(c, s) for c, s in zip(crop, self.shape))
        self.pos_ratio = pos / (pos + neg)
        self.fg, self.bg = map_binary_to_indices(label.any(0)[None])

    def slices(self, count: int, rng: np.random.RandomState) -> list[tuple[slice, ...]]:
        centres = generate_pos_neg_label_crop_centers(
            self.crop, count, self.pos_ratio, self.shape, self.fg, self.bg, rng
        )
        out = []
        for centre in centres:
            starts = [int(c) - s // 2 for c, s in zip(centre, self.crop)]
            out.append((slice(None),) + tuple(slice(a, a + s) for a, s in zip(starts, self.crop)))
        return out
