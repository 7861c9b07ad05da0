"""One label map on the scan's own grid from model-space probabilities, at a cost that hardly grows with the
number of structures.

Resampling each structure's probabilities onto a full-size scan (``Invertd``, 105 M voxels for 512x512x400) and
thresholding it costs seconds per structure. The label map needs far less: a native voxel's label is decided by
trilinear interpolation between the 8 model voxels around it (the corners of its *cell*), and when all 8 corners
have the same winner (the most probable structure above the threshold, or none) the interpolated values have it
too, since a convex combination keeps every strict order and every side of the threshold. So the winners are
found once on the model grid, each native voxel looks up its cell, and only voxels in cells whose corners
disagree (the structures' borders) are interpolated, for the structures that pass at one of their corners.

Geometry follows the inverse of the preprocessing: outside the foreground crop the probabilities are 0, and
beyond the resampled grid's own edge the edge value holds (MONAI's ``border`` padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor

MIXED = 255  # a cell whose corners disagree; labels are ids 0..254
SLAB_VOXELS = 2**22  # native voxels mapped at a time: bounds the coordinates' memory


@dataclass(frozen=True)
class ModelBox:
    """Where the model grid holds predictions and how native voxel indices map into it.

    Attributes:
        to_model: (4, 4) native voxel index -> model voxel index.
        native_shape: the scan's grid.
        lo: first model voxel of the box (the padding to the window size excluded).
        size: the box's size in voxels.
        border_low, border_high: per axis, whether beyond that side of the box the edge value holds (the box
            reaches the resampled grid's edge there) rather than 0 (the foreground crop cut there).
    """

    to_model: np.ndarray
    native_shape: tuple[int, int, int]
    lo: np.ndarray
    size: np.ndarray
    border_low: np.ndarray
    border_high: np.ndarray


def model_box(image: MetaTensor) -> ModelBox:
    """The box of a preprocessed image (``fsseg.data.transforms.inference_transforms``), from its affines and the
    crop and pad it went through."""
    to_model = np.linalg.inv(np.asarray(image.affine, np.float64)) @ np.asarray(image.meta["original_affine"],
                                                                                np.float64)
    shape = np.asarray(image.shape[1:])
    padded, cropped = np.zeros((3, 2), int), np.zeros(6, int)
    for op in image.applied_operations:
        info = op.get("extra_info", {})
        if op["class"] == "SpatialPad":
            padded = np.asarray(info["padded"][1:], int)
        elif op["class"] == "CropForeground":
            cropped = np.asarray(info["cropped"], int)
    return ModelBox(to_model=to_model, native_shape=tuple(int(s) for s in image.meta["spatial_shape"]),
                    lo=padded[:, 0], size=shape - padded.sum(1), border_low=cropped[0::2] == 0,
                    border_high=cropped[1::2] == 0)


def _pad_one(volume: torch.Tensor, box: ModelBox) -> torch.Tensor:
    """``volume`` (the box) with one voxel more on each side: 0 where the crop cut, the edge value elsewhere."""
    padded = torch.zeros(tuple(int(s) + 2 for s in volume.shape), dtype=volume.dtype)
    padded[1:-1, 1:-1, 1:-1] = volume
    for axis in range(3):
        edge = padded.narrow(axis, 1, 1), padded.narrow(axis, int(box.size[axis]), 1)
        if box.border_low[axis]:
            padded.narrow(axis, 0, 1).copy_(edge[0])
        if box.border_high[axis]:
            padded.narrow(axis, int(box.size[axis]) + 1, 1).copy_(edge[1])
    return padded


def _winners(probabilities: torch.Tensor, box: ModelBox, threshold: float) -> tuple[torch.Tensor, list]:
    """The winner id of each model voxel of the box (0: none passes) and, per structure, the box-coordinate
    bounds of the voxels where it passes (None: nowhere). Ties go to the earlier structure, as argmax does."""
    region = tuple(slice(int(lo), int(lo + n)) for lo, n in zip(box.lo, box.size))
    label = torch.zeros(tuple(int(n) for n in box.size), dtype=torch.uint8)
    best = torch.zeros(label.shape, dtype=probabilities.dtype)
    bounds: list = []
    for k in range(probabilities.shape[0]):
        passes = probabilities[k][region] > threshold
        where = [torch.nonzero(passes.any(dim=tuple(d for d in range(3) if d != axis))) for axis in range(3)]
        if any(len(w) == 0 for w in where):
            bounds.append(None)
            continue
        bounds.append([(int(w[0]), int(w[-1])) for w in where])
        inside = tuple(slice(a, b + 1) for a, b in bounds[-1])
        p = probabilities[k][region][inside]
        wins = passes[inside] & (p > best[inside])
        label[inside][wins] = k + 1
        best[inside][wins] = p[wins]
    return label, bounds


def _cell_labels(label: torch.Tensor, box: ModelBox) -> torch.Tensor:
    """Per cell of the padded box (its corners q..q+1), the winner its 8 corners share, or MIXED."""
    padded = _pad_one(label, box)
    first = padded[:-1, :-1, :-1]
    nx, ny, nz = first.shape
    same = torch.ones(first.shape, dtype=torch.bool)
    for dx, dy, dz in ((dx, dy, dz) for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)):
        same &= padded[dx : dx + nx, dy : dy + ny, dz : dz + nz] == first
    return torch.where(same, first, torch.tensor(MIXED, dtype=torch.uint8))


def _padded_coordinates(box: ModelBox, z0: int, z1: int) -> torch.Tensor:
    """(3, N) float32 coordinates in the padded box of the native voxels with last index in [z0, z1), held within
    it (float32 is exact to 1e-4 voxel on grids of up to 1000 voxels)."""
    nx, ny, _ = box.native_shape
    axes = [torch.arange(nx, dtype=torch.float32)[:, None, None], torch.arange(ny, dtype=torch.float32)[None, :, None],
            torch.arange(z0, z1, dtype=torch.float32)[None, None, :]]
    coords = torch.empty((3, nx, ny, z1 - z0))
    for d in range(3):  # an affine map is a sum of one term per native axis
        row = box.to_model[d]
        torch.add(axes[0] * float(row[0]) + axes[1] * float(row[1]), axes[2] * float(row[2]), out=coords[d])
        coords[d] += float(row[3] - box.lo[d] + 1)
        coords[d].clamp_(0, float(box.size[d] + 1))
    return coords.reshape(3, -1)


def _cells(coords: torch.Tensor, box: ModelBox) -> torch.Tensor:
    """(3, N) int32 cell of each padded-box coordinate: its corners are the cell and the cell + 1."""
    cell = coords.to(torch.int32)  # truncation is floor: coordinates are held at >= 0
    for d in range(3):
        cell[d].clamp_(max=int(box.size[d]))
    return cell


def _corners(coords: torch.Tensor, box: ModelBox, grid: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 model voxels around each padded-box coordinate of ``coords`` (3, N), as flat indices into the model
    ``grid``, and their trilinear weights (0 for a corner beyond a side the crop cut): two (8, N) tensors."""
    cell = _cells(coords, box)
    fraction = coords - cell
    index, weight = [], []
    for d in range(3):
        n, q = int(box.size[d]), cell[d].long()
        # corner q (padded) is box voxel q - 1, corner q + 1 is box voxel q; a pad voxel copies the edge or is 0
        index.append([(q - 1).clamp(0, n - 1) + int(box.lo[d]), q.clamp(max=n - 1) + int(box.lo[d])])
        weight.append([(1 - fraction[d]) * ((q >= 1) | bool(box.border_low[d])),
                       fraction[d] * ((q <= n - 1) | bool(box.border_high[d]))])
    flat = torch.stack([(index[0][a] * grid[1] + index[1][b]) * grid[2] + index[2][c]
                        for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    weights = torch.stack([weight[0][a] * weight[1][b] * weight[2][c] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    return flat, weights


def _resolve_mixed(probabilities: torch.Tensor, box: ModelBox, coords: torch.Tensor, bounds: list,
                   threshold: float) -> torch.Tensor:
    """Labels of native voxels in mixed cells (padded-box ``coords`` (3, N)): each structure that passes at a
    corner of their cell interpolated and compared, the earlier structure winning ties."""
    label = torch.zeros(coords.shape[1], dtype=torch.uint8)
    best = torch.zeros(coords.shape[1])
    cell = _cells(coords, box)
    flat, weights = _corners(coords, box, tuple(probabilities.shape[1:]))
    for k, bound in enumerate(bounds):
        if bound is None:
            continue
        near = torch.ones(coords.shape[1], dtype=torch.bool)
        for axis, (first, last) in enumerate(bound):
            # cell q's corners are box voxels q - 1 and q (or a pad voxel, 0 or a copy of the edge voxel)
            near &= (cell[axis] >= first) & (cell[axis] <= last + 1)
        chosen = torch.nonzero(near)[:, 0]
        if len(chosen) == 0:
            continue
        value = (probabilities[k].reshape(-1)[flat[:, chosen]].float() * weights[:, chosen]).sum(0)
        wins = (value > threshold) & (value > best[chosen])
        label[chosen[wins]], best[chosen[wins]] = k + 1, value[wins]
    return label


def native_label(probabilities: torch.Tensor, image: MetaTensor, threshold: float = 0.5) -> np.ndarray:
    """The label map (uint8, the scan's grid) of model-space ``probabilities`` (K, *model grid) of the preprocessed
    ``image``: structure k (id k + 1) where its probability, interpolated trilinearly onto the native voxel,
    passes ``threshold`` and no earlier structure's is as high.

    Raises:
        ValueError: more than 254 structures (the label map is uint8).
    """
    if probabilities.shape[0] >= MIXED:
        raise ValueError(f"{probabilities.shape[0]} structures: a uint8 label map holds at most {MIXED - 1}")
    box = model_box(image)
    winners, bounds = _winners(probabilities, box, threshold)
    cells = _cell_labels(winners, box).reshape(-1)
    strides = (int((box.size[1] + 1) * (box.size[2] + 1)), int(box.size[2] + 1))
    nx, ny, nz = box.native_shape
    out = torch.empty(box.native_shape, dtype=torch.uint8)
    step = max(1, SLAB_VOXELS // (nx * ny))
    for z0 in range(0, nz, step):
        z1 = min(z0 + step, nz)
        coords = _padded_coordinates(box, z0, z1)
        cell = _cells(coords, box)
        labels = cells[cell[0] * strides[0] + cell[1] * strides[1] + cell[2]]
        mixed = torch.nonzero(labels == MIXED)[:, 0]
        labels[mixed] = _resolve_mixed(probabilities, box, coords[:, mixed], bounds, threshold)
        out[:, :, z0:z1] = labels.reshape(nx, ny, z1 - z0)
    return out.numpy()
