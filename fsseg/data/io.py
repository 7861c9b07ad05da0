"""Reading and writing NIfTI volumes with clear errors and without half-written files."""

from __future__ import annotations

import contextlib
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

from fsseg.errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | Path) -> bool:
    """True when the file name ends in .nii or .nii.gz."""
    return str(path).endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | Path) -> str:
    """File name without .nii/.nii.gz (``case_01.nii.gz`` -> ``case_01``)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


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
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


def load_nifti_image(path: str | Path) -> nib.Nifti1Image:
    """Open a NIfTI file and check that it is 3D, without reading the voxels.

    A trailing singleton 4th dimension (x, y, z, 1) counts as 3D.

    Raises:
        DataError: the file is missing, not NIfTI, or not a 3D volume.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises several unrelated types for unreadable files
        raise DataError(f"{path}: cannot be read as NIfTI ({_reason(error)})") from None
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        kind = f"{len(shape)}D" if len(shape) != 4 else f"4D ({shape[3]} volumes)"
        raise DataError(f"{path}: expected a 3D volume, got a {kind} image of shape {tuple(image.shape)}")
    if min(shape) < 2:
        raise DataError(f"{path}: expected a 3D volume, got shape {tuple(image.shape)} (a single slice?)")
    return image


def load_volume(path: str | Path, dtype: np.dtype | type | None = None) -> Volume:
    """Read a 3D NIfTI volume, checking that the file is complete.

    Args:
        path: a .nii or .nii.gz file.
        dtype: cast the voxels to this type (default: the scaled on-disk values as float32 when the
            header scales them, else the stored type).

    Raises:
        DataError: missing, corrupt or truncated file, or not a 3D volume.
    """
    image = load_nifti_image(path)
    try:
        array = np.asanyarray(image.dataobj)
    except (EOFError, zlib.error, OSError, ValueError) as error:
        raise DataError(f"{path}: file is truncated or corrupt ({_reason(error)})") from None
    array = array.reshape(array.shape[:3])
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return Volume(array=array, affine=image.affine.copy(), header=image.header, path=Path(path))


def same_geometry(a_shape, a_affine, b_shape, b_affine, atol: float = 1e-3) -> str | None:
    """Compare two grids; return None when they match, else a short description of the difference."""
    if tuple(a_shape)[:3] != tuple(b_shape)[:3]:
        return f"shape {tuple(a_shape)[:3]} != {tuple(b_shape)[:3]}"
    if not np.allclose(a_affine, b_affine, atol=atol):
        worst = float(np.abs(np.asarray(a_affine) - np.asarray(b_affine)).max())
        return f"affines differ by up to {worst:.4g} (tolerance {atol})"
    return None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    A crash or Ctrl-C leaves no half-written file at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates the file private (0600); the output gets the permissions of any new file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
