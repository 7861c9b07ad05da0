"""One label map on the scan's own grid from model-space probabilities, at a cost that hardly grows with the
number of structures.

Resampling each structure's probabilities onto a full-size scan (``Invertd``, 105 M voxels for 512x512x400) and
thresholding it costs seconds per structure. The label map needs far less: a native voxel's label is decided by
trilinear interpolation between the 8 model voxels around it (the corners of its *cell*), and when all 8 corners
have the same winner (the most probable structure above the threshold, or none) the interpolated values have it
too, since a convex combination keeps every strict order and every side of the threshold. So the winners are
found once on the model grid, each native voxel looks up its cell, and only voxels in cells whose corners
disagree (the structures' borders) are interpolated: for the one structure that can pass there (an organ against
background), or, where several pass at the corners, for each of them.

Geometry follows the inverse of the preprocessing: outside the foreground crop the probabilities are 0, and
beyond the resampled grid's own edge the edge value holds (MONAI's ``border`` padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor

LARGEST_ID = 254  # the label map is uint8
# A cell's code: its corners' shared winner (>= 0); -k when structure k alone passes at some of its corners (it
# alone can pass inside); MIXED when several structures pass at its corners.
MIXED = -(LARGEST_ID + 1)
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
    native_shape: tuple[int, ...]
    lo: np.ndarray
    size: np.ndarray
    border_low: np.ndarray
    border_high: np.ndarray


def model_box(image: MetaTensor) -> ModelBox:
    """The box of a preprocessed image (``fsseg.data.transforms.inference_transforms``), from its affines and the
    crop and pad it went through."""
    to_model = np.linalg.inv(np.asarray(image.affine, np.float64)) @ np.asarray(
        image.meta["original_affine"], np.float64
    )
    shape = np.asarray(image.shape[1:])
    padded, cropped = np.zeros((3, 2), int), np.zeros(6, int)
    for op in image.applied_operations:
        info = op.get("extra_info", {})
        if op["class"] == "SpatialPad":
            padded = np.asarray(info["padded"][1:], int)
        elif op["class"] == "CropForeground":
            cropped = np.asarray(info["cropped"], int)
    return ModelBox(
        to_model=to_model,
        native_shape=tuple(int(s) for s in image.meta["spatial_shape"]),
        lo=padded[:, 0],
        size=shape - padded.sum(1),
        border_low=cropped[0::2] == 0,
        border_high=cropped[1::2] == 0,
    )


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


def _winners(probabilities: torch.Tensor, box: ModelBox, threshold: float) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The winner id of each model voxel of the box (0: none passes), how many structures pass there, and, per
    structure, the box-coordinate bounds of the voxels where it passes (None: nowhere). Ties go to the earlier
    structure, as argmax does."""
    region = tuple(slice(int(lo), int(lo + n)) for lo, n in zip(box.lo, box.size))
    label = torch.zeros(tuple(int(n) for n in box.size), dtype=torch.uint8)
    count = torch.zeros(label.shape, dtype=torch.uint8)
    best = torch.zeros(label.shape, dtype=probabilities.dtype)
    bounds: list = []
    for k in range(probabilities.shape[0]):
        bound = _passing_bounds(probabilities[k][region], threshold)
        bounds.append(bound)
        if bound is None:
            continue
        inside = tuple(slice(a, b + 1) for a, b in bound)
        p = probabilities[k][region][inside]
        passes = p > threshold
        count[inside] += passes
        wins = passes & (p > best[inside])
        label[inside][wins] = k + 1
        best[inside][wins] = p[wins]
    return label, count, bounds


def _passing_bounds(probability: torch.Tensor, threshold: float) -> list[tuple[int, int]] | None:
    """Per axis, the first and last index where ``probability`` passes ``threshold`` (None: nowhere); one pass
    over the whole volume, the rest within the columns that pass."""
    column = probability.amax(dim=2) > threshold
    xs, ys = torch.nonzero(column.any(1))[:, 0], torch.nonzero(column.any(0))[:, 0]
    if len(xs) == 0:
        return None
    block = probability[int(xs[0]) : int(xs[-1]) + 1, int(ys[0]) : int(ys[-1]) + 1]
    zs = torch.nonzero(block.amax(dim=(0, 1)) > threshold)[:, 0]
    return [(int(xs[0]), int(xs[-1])), (int(ys[0]), int(ys[-1])), (int(zs[0]), int(zs[-1]))]


def _cell_codes(label: torch.Tensor, count: torch.Tensor, box: ModelBox) -> torch.Tensor:
    """Per cell of the padded box (its corners q..q+1), its code (see MIXED) from its corners' winners ``label``
    and numbers of passing structures ``count``."""
    labels, counts = _pad_one(label, box).short(), _pad_one(count, box)
    nx, ny, nz = (n - 1 for n in labels.shape)
    corners = [
        (slice(dx, dx + nx), slice(dy, dy + ny), slice(dz, dz + nz)) for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)
    ]
    first = labels[corners[0]]
    same, most = torch.ones(first.shape, dtype=torch.bool), counts[corners[0]].clone()
    high, low = first.clone(), torch.where(first > 0, first, LARGEST_ID + 1)
    for corner in corners[1:]:
        same &= labels[corner] == first
        torch.maximum(most, counts[corner], out=most)
        torch.maximum(high, labels[corner], out=high)
        torch.minimum(low, torch.where(labels[corner] > 0, labels[corner], LARGEST_ID + 1), out=low)
    alone = (most <= 1) & (high == low)  # at most one passes at each corner, and always the same one
    return torch.where(same, first, torch.where(alone, -high, torch.tensor(MIXED, dtype=torch.int16)))


def _resolve_alone(
    probabilities: torch.Tensor,
    box: ModelBox,
    coords: torch.Tensor,
    cell: torch.Tensor,
    structure: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """Labels of native voxels (padded-box ``coords`` (3, N) in ``cell``) in cells where structure ``structure``
    (ids, (N,)) alone can pass: that structure's interpolated probability against the threshold, all at once."""
    flat, weights = _corners(coords, cell, box, tuple(probabilities.shape[1:]))
    channel = (structure.long() - 1)[None].expand_as(flat)
    value = (probabilities.reshape(probabilities.shape[0], -1)[channel, flat].float() * weights).sum(0)
    return torch.where(value > threshold, structure, 0).to(torch.uint8)


def _padded_coordinates(box: ModelBox, z0: int, z1: int) -> torch.Tensor:
    """(3, N) float32 coordinates in the padded box of the native voxels with last index in [z0, z1), held within
    it (float32 is exact to 1e-4 voxel on grids of up to 1000 voxels)."""
    nx, ny, _ = box.native_shape
    axes = [
        torch.arange(nx, dtype=torch.float32)[:, None, None],
        torch.arange(ny, dtype=torch.float32)[None, :, None],
        torch.arange(z0, z1, dtype=torch.float32)[None, None, :],
    ]
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


def _corners(
    coords: torch.Tensor, cell: torch.Tensor, box: ModelBox, grid: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 model voxels around each padded-box coordinate of ``coords`` (3, N) (in ``cell``, :func:`_cells`), as
    flat indices into the model ``grid``, and their trilinear weights (0 for a corner beyond a side the crop cut):
    two (8, N) tensors."""
    fraction = coords - cell
    index, weight = [], []
    for d in range(3):
        n, q = int(box.size[d]), cell[d].long()
        # corner q (padded) is box voxel q - 1, corner q + 1 is box voxel q; a pad voxel copies the edge or is 0
        index.append([(q - 1).clamp(0, n - 1) + int(box.lo[d]), q.clamp(max=n - 1) + int(box.lo[d])])
        weight.append(
            [
                (1 - fraction[d]) * ((q >= 1) | bool(box.border_low[d])),
                fraction[d] * ((q <= n - 1) | bool(box.border_high[d])),
            ]
        )
    flat = torch.stack(
        [(index[0][a] * grid[1] + index[1][b]) * grid[2] + index[2][c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    )
    weights = torch.stack([weight[0][a] * weight[1][b] * weight[2][c] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    return flat, weights


def _resolve_mixed(
    probabilities: torch.Tensor, box: ModelBox, coords: torch.Tensor, cell: torch.Tensor, bounds: list, threshold: float
) -> torch.Tensor:
    """Labels of native voxels in mixed cells (padded-box ``coords`` (3, N) in ``cell``): each structure that
    passes at a corner of their cell interpolated and compared, the earlier structure winning ties."""
    label = torch.zeros(coords.shape[1], dtype=torch.uint8)
    best = torch.zeros(coords.shape[1])
    if coords.shape[1] == 0:
        return label
    flat, weights = _corners(coords, cell, box, tuple(probabilities.shape[1:]))
    reach = list(zip(cell.amin(1).tolist(), cell.amax(1).tolist()))  # the cells these voxels lie in
    for k, bound in enumerate(bounds):
        if bound is None or any(first > high or last + 1 < low for (first, last), (low, high) in zip(bound, reach)):
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
    if probabilities.shape[0] > LARGEST_ID:
        raise ValueError(f"{probabilities.shape[0]} structures: a uint8 label map holds at most {LARGEST_ID}")
    box = model_box(image)
    winners, count, bounds = _winners(probabilities, box, threshold)
    cells = _cell_codes(winners, count, box).reshape(-1)
    strides = (int((box.size[1] + 1) * (box.size[2] + 1)), int(box.size[2] + 1))
    nx, ny, nz = box.native_shape
    out = torch.empty(box.native_shape, dtype=torch.uint8)
    step = max(1, SLAB_VOXELS // (nx * ny))
    for z0 in range(0, nz, step):
        z1 = min(z0 + step, nz)
        coords = _padded_coordinates(box, z0, z1)
        cell = _cells(coords, box)
        codes = cells[cell[0] * strides[0] + cell[1] * strides[1] + cell[2]]
        labels = codes.clamp(min=0).to(torch.uint8)
        alone = torch.nonzero((codes < 0) & (codes > MIXED))[:, 0]
        labels[alone] = _resolve_alone(probabilities, box, coords[:, alone], cell[:, alone], -codes[alone], threshold)
        mixed = torch.nonzero(codes == MIXED)[:, 0]
        labels[mixed] = _resolve_mixed(probabilities, box, coords[:, mixed], cell[:, mixed], bounds, threshold)
        out[:, :, z0:z1] = labels.reshape(nx, ny, z1 - z0)
    return out.numpy()
