"""The transductive organ-size constraint.

S is the organ's size expected from the support labels, Ŝ the soft (sigmoid-sum) size predicted on the
query scan, both as proportions of the query's foreground-cropped volume. Outside the band
[(1 - γ) S, (1 + γ) S] a hinge pulls Ŝ back:

* ``absolute`` (the design's Eq. 2): max(0, |Ŝ - S| - γ S)
* ``relative`` (FSEFT v1): max(0, |S - Ŝ| / max(S, Ŝ) - γ)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

FORMS = ("absolute", "relative")
# With this many supports or more, sizes further than one std from the median are dropped before averaging.
TRIM_FROM = 5


def largest_component_size(mask: np.ndarray) -> int:
    """Voxels of the largest 26-connected component of a binary mask."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    return int(np.bincount(labels.ravel())[1:].max()) if count else 0


def organ_size_prior(support_masks: Sequence[np.ndarray]) -> float:
    """Expected organ size in voxels (model spacing) from the support masks.

    Each mask counts by its largest connected component; with 5 or more supports, sizes outside
    median ± std are trimmed before the mean.
    """
    sizes = np.array([largest_component_size(m) for m in support_masks], dtype=float)
    if len(sizes) >= TRIM_FROM:
        median, std = np.median(sizes), sizes.std()
        kept = sizes[np.abs(sizes - median) <= std]
        sizes = kept if len(kept) else sizes
    return float(sizes.mean())


def size_constraint_loss(predicted: torch.Tensor, target: float, gamma: float, form: str = "relative") -> torch.Tensor:
    """Hinge penalty on the predicted proportion ``predicted`` (a differentiable scalar) outside the band around
    ``target``."""
    if form not in FORMS:
        raise ValueError(f"unknown size-constraint form '{form}'; expected one of {', '.join(FORMS)}")
    target_t = torch.as_tensor(target, dtype=predicted.dtype, device=predicted.device)
    if form == "absolute":
        return torch.relu((predicted - target_t).abs() - gamma * target_t)
    return torch.relu((predicted - target_t).abs() / torch.maximum(predicted, target_t).clamp(min=1e-12) - gamma)
