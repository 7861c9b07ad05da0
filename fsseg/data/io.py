"""Reading scans (NIfTI files or DICOM series folders) and writing NIfTI volumes, with clear errors and without
half-written files."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from fsseg.errors import DataError, DiskFull

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# CT voxels lie between a few hundredths of a mm (micro-CT) and 10-15 mm (thick slices); a body is at most
# about 2 m long. Outside these, the header is wrong, and resampling would need minutes and tens of GB.
VOXEL_MM_RANGE = (0.01, 20.0)
MAX_EXTENT_MM = 2500.0
# CT in HU holds air (about -1000) and soft tissue (tens of HU); a [0, 1] or [0, 255] volume lacks the air.
HU_AIR_MAX = -400.0
HU_TISSUE_MIN = 0.0


def is_nifti(path: str | Path) -> bool:
    """True when the file name ends in .nii or .nii.gz."""
    return str(path).endswith(NIFTI_SUFFIXES)


def scan_name(path: str | Path) -> str:
    """What a scan's outputs are named after: a NIfTI file's stem without nnU-Net's channel suffix ``_0000``
    (``case_0000.nii.gz`` -> ``case``, as nnU-Net names its predictions), a DICOM series folder's name."""
    return Path(path).name if Path(path).is_dir() else nifti_stem(path).removesuffix("_0000")


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


def grid_image(shape: tuple[int, ...], affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI image of ``shape`` on ``affine`` whose voxels are never read (all zero, taking no memory): the
    reference that masks predicted for a scan of another format are written on."""
    image = nib.Nifti1Image(np.broadcast_to(np.int16(0), shape), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return image


def require_file(path: str | Path, what: str = "file") -> Path:
    """``path`` when it is a file this process may read.

    Raises:
        DataError: it is missing, or not readable (a chmod 000 file is unreadable, not corrupt).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: {what} is not readable (permission denied)")
    return path


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


def cannot_write(path: str | Path, error: OSError) -> DataError:
    """The one-line error of a file or folder that cannot be created or put in place."""
    return DataError(f"{path}: cannot write ({error.strerror or error})")


def write_failed(path: str | Path, error: Exception) -> DataError:
    """The one-line error of a write that failed part-way (a full disk, a quota), with the space left."""
    free = shutil.disk_usage(Path(path).parent).free / 2**20
    kind = DiskFull if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) else DataError
    return kind(f"{path}: cannot write ({getattr(error, 'strerror', None) or error}; {free:.0f} MB free on its disk)")


def new_mode(base: int) -> int:
    """The permissions a new file (``0o666``) or folder (``0o777``) gets under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def remove_leftovers(path: Path) -> None:
    """Remove what a killed write of ``path`` left beside it (``.<name>.*.part*`` files or folders), so that a rerun
    cleans up after it. For commands that alone write ``path``."""
    for leftover in path.parent.glob(f".{path.name}.*.part*"):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()


@contextlib.contextmanager
def staged_writes(out: Path) -> Iterator[Path]:
    """Yield a staging folder inside ``out``; when the block succeeds, every file written there moves to the same
    place under ``out``, and when it fails none does. A command that writes many files (a data set) then leaves
    either all of them or none: no half-written data set after a full disk, an error or Ctrl-C. A killed run's
    staging folder is removed by the next one. For commands that alone write into ``out``."""
    marker = out / "fsseg-staging"
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_leftovers(marker)
        staging = Path(tempfile.mkdtemp(prefix=f".{marker.name}.", suffix=".part", dir=out))
    except OSError as error:
        raise cannot_write(out, error) from None
    try:
        try:
            yield staging
        except DataError as error:  # name the file the user asked for, not its hidden staging place
            raise type(error)(str(error).replace(str(staging), str(out))) from None
        for source in sorted(p for p in staging.rglob("*") if p.is_file()):
            target = out / source.relative_to(staging)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)  # a rename within one folder tree: needs no free space
            except OSError as error:
                raise cannot_write(target, error) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    A crash or Ctrl-C leaves no half-written file at ``path``.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, cannot write a file there")
    suffix = "".join(path.suffixes) or ".tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    except OSError as error:
        raise cannot_write(path, error) from None
    os.close(fd)
    try:
        try:
            yield Path(tmp)
        except OSError as error:  # a full disk or quota while writing: name the output, not the library's internals
            raise write_failed(path, error) from None
        # mkstemp creates the file private (0600); the output gets the permissions of any new file.
        os.chmod(tmp, new_mode(0o666))
        try:
            os.replace(tmp, path)
        except OSError as error:
            raise cannot_write(path, error) from None
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


def error_reason(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
