"""Reading and checking NIfTI volumes (their grid, size, values) and writing NIfTI volumes atomically, with clear
errors. File plumbing (atomic writes, scan file names) is in :mod:`fsseg.files`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from fsseg.errors import DataError
from fsseg.files import atomic_path, error_reason, require_file

# CT voxels lie between a few hundredths of a mm (micro-CT) and 10-15 mm (thick slices); a body is at most
# about 2 m long. Outside these, the header is wrong, and resampling would need minutes and tens of GB.
VOXEL_MM_RANGE = (0.01, 20.0)
MAX_EXTENT_MM = 2500.0
# CT in HU holds air (about -1000) and soft tissue (tens of HU); a [0, 1] or [0, 255] volume lacks the air.
HU_AIR_MAX = -400.0
HU_TISSUE_MIN = 0.0


@dataclass(frozen=True)
class Volume:
    """A 3D array with the affine (voxel -> RAS world, mm) and the header it was read with."""

    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes."""
        x, y, z = (float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))
        return x, y, z


def grid_image(shape: tuple[int, ...], affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI image of ``shape`` on ``affine`` whose voxels are never read (all zero, taking no memory): the
    reference that masks predicted for a scan of another format are written on."""
    image = nib.Nifti1Image(np.broadcast_to(np.int16(0), shape), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return image


def load_nifti_image(path: str | Path) -> nib.Nifti1Image:
    """Open a NIfTI file and check that it is 3D, without reading the voxels.

    A trailing singleton 4th dimension (x, y, z, 1) counts as 3D.

    Raises:
        DataError: the file is missing, unreadable, not NIfTI, not a 3D volume or on an implausible grid.
    """
    path = require_file(path)
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises several unrelated types for unreadable files
        raise DataError(f"{path}: cannot be read as NIfTI ({error_reason(error)})") from None
    if not isinstance(image, nib.Nifti1Image):  # NIfTI-2 images are Nifti1Images too; this is another format
        raise DataError(f"{path}: not a NIfTI-1 image (read as {type(image).__name__})")
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        kind = f"{len(shape)}D" if len(shape) != 4 else f"4D ({shape[3]} volumes)"
        raise DataError(f"{path}: expected a 3D volume, got a {kind} image of shape {tuple(image.shape)}")
    if min(shape) < 2:
        raise DataError(f"{path}: expected a 3D volume, got shape {tuple(image.shape)} (a single slice?)")
    check_grid(image.affine, shape, path)
    return image


def check_grid(affine: np.ndarray, shape: tuple[int, ...], path: str | Path) -> None:
    """Refuse a voxel size or field of view no CT has (zero, NaN or 40 mm voxels, a 10 m scan), and axes that span
    no 3D grid (a rank-deficient affine).

    Raises:
        DataError: naming the file and the voxel size or extent found.
    """
    axes = np.asarray(affine, dtype=float)[:3, :3]
    spacing = np.sqrt((axes**2).sum(axis=0))
    low, high = VOXEL_MM_RANGE
    if not np.all(np.isfinite(spacing)) or spacing.min() < low or spacing.max() > high:
        shown = "x".join(f"{s:.4g}" for s in spacing)
        raise DataError(
            f"{path}: voxel size {shown} mm is implausible for CT (expected {low:g} to {high:g} mm per "
            "axis); fix the header's pixdim/affine"
        )
    # unit axis directions: a determinant near 0 means two axes (nearly) coincide, and no 3D grid exists
    if abs(np.linalg.det(axes / spacing)) < 1e-3:
        raise DataError(
            f"{path}: the header's voxel axes are not independent (the affine's axes "
            f"{np.round(axes.T, 3).tolist()} span no 3D grid); fix the header's qform/sform"
        )
    extent = spacing * np.asarray(shape[:3], dtype=float)
    if extent.max() > MAX_EXTENT_MM:
        shown = "x".join(f"{e:.0f}" for e in extent)
        raise DataError(
            f"{path}: field of view {shown} mm exceeds {MAX_EXTENT_MM:.0f} mm; the voxel size in the "
            "header is likely wrong"
        )
    check_fits_in_memory(shape, path)


def check_fits_in_memory(shape: tuple[int, ...], path: str | Path) -> None:
    """Refuse a grid whose float32 copy alone would exceed this machine's memory, before any voxel is read (a
    header that claims a huge grid would otherwise end in a MemoryError far from the file that caused it)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX: no check
        return
    needed = float(np.prod(np.asarray(shape[:3], dtype=float))) * 4
    if needed > memory:
        raise DataError(
            f"{path}: the header claims a {'x'.join(map(str, shape[:3]))} grid, {needed / 2**30:.0f} GB "
            f"as float32, more than this machine's {memory / 2**30:.0f} GB; check the header's dims"
        )


def check_finite(array: np.ndarray | torch.Tensor, path: str | Path) -> None:
    """Refuse NaN or infinite voxels, which turn training losses into NaN and silently empty predictions."""
    if isinstance(array, torch.Tensor):
        finite = bool(torch.isfinite(array).all()) if array.is_floating_point() else True
    else:
        finite = array.dtype.kind not in "fc" or bool(np.isfinite(array).all())
    if not finite:
        count = int((~np.isfinite(np.asarray(array))).sum())
        raise DataError(f"{path}: {count} voxel(s) are NaN or infinite; fix or remove this scan")


def hu_problem(array: np.ndarray | torch.Tensor, path: str | Path) -> str | None:
    """Why a scan does not look like CT in Hounsfield units, or None when it does."""
    sample = np.asarray(array)[..., ::2, ::2, ::2]
    low, high = float(sample.min()), float(sample.max())
    if low > HU_AIR_MAX or high < HU_TISSUE_MIN:
        return (
            f"{path}: intensities span [{low:.4g}, {high:.4g}], which does not look like CT in HU "
            f"(expected air below {HU_AIR_MAX:.0f} and tissue above {HU_TISSUE_MIN:.0f}); give the original "
            "HU values"
        )
    return None


def same_geometry(a_shape, a_affine, b_shape, b_affine, atol: float = 1e-3) -> str | None:
    """Compare two grids; return None when they match, else a short description of the difference."""
    if tuple(a_shape)[:3] != tuple(b_shape)[:3]:
        return f"shape {tuple(a_shape)[:3]} != {tuple(b_shape)[:3]}"
    if not np.allclose(a_affine, b_affine, atol=atol):
        worst = float(np.abs(np.asarray(a_affine) - np.asarray(b_affine)).max())
        return f"affines differ by up to {worst:.4g} (tolerance {atol})"
    return None


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write ``array`` with ``affine`` (qform and sform, code 1) atomically."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return Path(path)


def save_like(array: np.ndarray, reference: nib.Nifti1Image, path: str | Path) -> Path:
    """Write ``array`` on the grid of ``reference``, atomically, keeping its header.

    The output has the reference's shape, qform and sform (with their codes), voxel size and units, so it
    overlays the input exactly in 3D Slicer or ITK-SNAP. Intensity scaling is cleared: labels are stored as is.
    """
    if array.shape[:3] != reference.shape[:3]:
        raise ValueError(f"array shape {array.shape} does not match the reference grid {reference.shape}")
    header = reference.header.copy()
    header.set_data_dtype(array.dtype)
    header.set_slope_inter(None, None)
    image = nib.Nifti1Image(array, None, header=header)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return Path(path)
