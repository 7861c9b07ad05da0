"""Per-structure scores of a binary prediction against its ground truth, and their summary.

Distances use the voxel spacing of the ground truth's header (mm), in the scan's native grid. MONAI computes
the metrics; the cases where a mask is empty follow one explicit policy (:data:`fsseg.vocabulary.EMPTY_POLICY`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice


@dataclass(frozen=True)
class StructureScore:
    """Scores of one structure in one case; ``kind`` is ``both``, ``empty_gt``, ``empty_pred``, ``both_empty`` or
    ``missing``."""

    dice: float
    nsd: float
    hd95: float
    kind: str
    gt_voxels: int
    pred_voxels: int

    def to_dict(self) -> dict:
        return asdict(self)


def score_structure(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 2.0
) -> StructureScore:
    """Dice, NSD at ``tolerance_mm`` and HD95 (mm) of two binary masks on the same grid.

    Args:
        pred: predicted mask (X, Y, Z), any dtype; non-zero is foreground.
        gt: ground-truth mask on the same grid.
        spacing: voxel size in mm along the three array axes (from the ground truth's header).
        tolerance_mm: the NSD tolerance.
    """
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    n_pred, n_gt = int(pred.sum()), int(gt.sum())
    if n_gt == 0 and n_pred == 0:
        return StructureScore(1.0, 1.0, 0.0, "both_empty", 0, 0)
    if n_gt == 0 or n_pred == 0:
        return StructureScore(0.0, 0.0, math.nan, "empty_gt" if n_gt == 0 else "empty_pred", n_gt, n_pred)
    y_pred = torch.from_numpy(pred)[None, None].float()
    y = torch.from_numpy(gt)[None, None].float()
    spacing = [float(s) for s in spacing]
    dice = float(compute_dice(y_pred, y, include_background=True)[0, 0])
    with warnings.catch_warnings():
        # MONAI's surface metrics pass an argument MONAI itself deprecated (get_mask_edges, MONAI 1.5+).
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        nsd = float(compute_surface_dice(y_pred, y, [tolerance_mm], include_background=True, spacing=spacing)[0, 0])
        hd95 = float(
            compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)[0, 0]
        )
    return StructureScore(dice, nsd, hd95, "both", n_gt, n_pred)


def summarise(scores: Iterable[StructureScore]) -> dict:
    """Mean, std and median of each metric (NaN skipped) and the count of each case kind."""
    scores = list(scores)
    out: dict = {"n": len(scores)}
    for metric in ("dice", "nsd", "hd95"):
        values = np.array([getattr(s, metric) for s in scores], dtype=float)
        finite = values[~np.isnan(values)]
        out[metric] = {
            "mean": float(finite.mean()) if len(finite) else math.nan,
            "std": float(finite.std()) if len(finite) else math.nan,
            "median": float(np.median(finite)) if len(finite) else math.nan,
            "n": int(len(finite)),
        }
    for kind in ("both", "both_empty", "empty_gt", "empty_pred", "missing"):
        out[f"count_{kind}"] = sum(s.kind == kind for s in scores)
    return out
