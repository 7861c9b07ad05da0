"""Scan formats: a scan reference (a file, or a folder holding a DICOM series) resolved once into a :class:`Scan`
whose format reads its grid and voxels and writes label maps on it.

Formats: NIfTI (``.nii``, ``.nii.gz``), DICOM CT series folders, and through SimpleITK NRRD (``.nrrd``, 3D
Slicer's format) and MetaImage (``.mha``, ``.mhd``). A label map predicted for a scan is written in the scan's
format where it has one (NIfTI, NRRD, MetaImage: it opens on its scan in 3D Slicer and ITK-SNAP), as NIfTI for a
DICOM series. A new format is one :class:`ScanFormat` subclass passed to :func:`register_format`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from fsseg.data.dicom import dicom_files, is_dicom_folder, itk_reason, read_series, read_series_header
from fsseg.data.io import Volume, check_finite, check_grid, grid_image, load_nifti_image, save_like
from fsseg.errors import DataError
from fsseg.files import atomic_path, error_reason, is_nifti, nifti_stem, require_file

# SimpleITK's physical space is LPS, NIfTI's and fsseg's RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class ScanFormat:
    """How one kind of scan reference is recognised, read, and written beside."""

    name = ""
    mask_suffix = ".nii.gz"  # what a label map predicted for such a scan is written as

    def claims(self, path: Path) -> bool:
        """Whether ``path`` is a scan of this format (by its name, or a folder's content)."""
        raise NotImplementedError

    def stem(self, path: Path) -> str:
        """The scan's name without the format's suffix."""
        return path.name

    def grid(self, path: Path) -> nib.Nifti1Image:
        """The scan's grid (shape, affine, header) as a NIfTI image whose voxels are never read."""
        raise NotImplementedError

    def read(self, path: Path) -> Volume:
        """The scan's voxels (3D) and affine, checked complete and finite."""
        raise NotImplementedError

    def files(self, path: Path) -> list[Path]:
        """Every file the scan consists of (never to be written over)."""
        return [path]

    def write_mask(self, array: np.ndarray, scan: Path, reference: nib.Nifti1Image, out: Path) -> Path:
        """Write ``array`` (on ``reference``, the scan's grid) at ``out``, atomically."""
        return save_like(array, reference, out)


class Nifti(ScanFormat):
    name = "NIfTI (.nii, .nii.gz)"

    def claims(self, path: Path) -> bool:
        return is_nifti(path)

    def stem(self, path: Path) -> str:
        return nifti_stem(path)

    def grid(self, path: Path) -> nib.Nifti1Image:
        return load_nifti_image(path)

    def read(self, path: Path) -> Volume:
        image = load_nifti_image(path)
        try:
            array = np.asanyarray(image.dataobj)
        except (EOFError, zlib.error, OSError, ValueError) as error:
            raise DataError(f"{path}: file is truncated or corrupt ({error_reason(error)})") from None
        array = array.reshape(array.shape[:3])
        check_finite(array, path)
        return Volume(array=array, affine=image.affine.copy(), header=image.header, path=path)


class DicomSeries(ScanFormat):
    name = "a folder holding one DICOM CT series"

    def claims(self, path: Path) -> bool:
        return path.is_dir() and is_dicom_folder(path)

    def grid(self, path: Path) -> nib.Nifti1Image:
        series = read_series_header(path)
        check_grid(series.affine, series.shape, path)
        return grid_image(series.shape, series.affine)

    def read(self, path: Path) -> Volume:
        series, array = read_series(path)
        check_grid(series.affine, series.shape, path)
        check_finite(array, path)
        return Volume(
            array=array, affine=series.affine, header=grid_image(series.shape, series.affine).header, path=path
        )

    def files(self, path: Path) -> list[Path]:
        return [path, *dicom_files(path)]


class SimpleITKFile(ScanFormat):
    """A single-file 3D format SimpleITK reads and writes; its label maps are written in the same format."""

    def __init__(self, name: str, suffixes: tuple[str, ...], mask_suffix: str) -> None:
        self.name, self.suffixes, self.mask_suffix = name, suffixes, mask_suffix

    def claims(self, path: Path) -> bool:
        return path.name.lower().endswith(self.suffixes)

    def stem(self, path: Path) -> str:
        suffix = next(s for s in self.suffixes if path.name.lower().endswith(s))
        return path.name[: -len(suffix)]

    def _information(self, path: Path) -> sitk.ImageFileReader:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(require_file(path)))
        try:
            reader.ReadImageInformation()
        except RuntimeError as error:
            raise DataError(f"{path}: cannot be read as {self.name} ({itk_reason(error)})") from None
        if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
            raise DataError(f"{path}: expected a 3D single-channel volume, got size {reader.GetSize()}")
        return reader

    def grid(self, path: Path) -> nib.Nifti1Image:
        reader = self._information(path)
        affine = ras_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin())
        shape = tuple(int(s) for s in reader.GetSize())
        check_grid(affine, shape, path)
        return grid_image(shape, affine)

    def read(self, path: Path) -> Volume:
        reference = self.grid(path)
        try:
            array = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
        except RuntimeError as error:
            raise DataError(f"{path}: file is truncated or corrupt ({itk_reason(error)})") from None
        check_finite(array, path)
        return Volume(array=np.ascontiguousarray(array), affine=reference.affine, header=reference.header, path=path)

    def write_mask(self, array: np.ndarray, scan: Path, reference: nib.Nifti1Image, out: Path) -> Path:
        source = self._information(scan)
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
        image.SetOrigin(source.GetOrigin())
        image.SetSpacing(source.GetSpacing())
        image.SetDirection(source.GetDirection())
        with atomic_path(out) as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=True)
        return out


def ras_affine(direction: tuple, spacing: tuple, origin: tuple) -> np.ndarray:
    """The voxel -> RAS matrix of an ITK image's direction, spacing and origin (LPS)."""
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ np.asarray(direction, dtype=float).reshape(3, 3) @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(origin, dtype=float)
    return affine


_FORMATS: list[ScanFormat] = []


def register_format(scan_format: ScanFormat) -> None:
    """Make ``scan_format`` known to every command (asked before the formats registered earlier)."""
    _FORMATS.insert(0, scan_format)


for _format in (
    DicomSeries(),
    SimpleITKFile("MetaImage (.mha, .mhd)", (".mha", ".mhd"), ".mha"),
    SimpleITKFile("NRRD (.nrrd)", (".nrrd",), ".nrrd"),
    Nifti(),
):
    register_format(_format)


@dataclass(frozen=True)
class Scan:
    """A scan reference resolved to its format."""

    path: Path
    format: ScanFormat

    @property
    def name(self) -> str:
        """What its outputs are named after: the file name without its suffix and without nnU-Net's channel
        suffix ``_0000`` (``case_0000.nii.gz`` -> ``case``, as nnU-Net names its predictions), or the folder's."""
        return self.format.stem(self.path).removesuffix("_0000")

    def grid(self) -> nib.Nifti1Image:
        return self.format.grid(self.path)

    def read(self, dtype: np.dtype | type | None = None) -> Volume:
        volume = self.format.read(self.path)
        if dtype is None:
            return volume
        return Volume(volume.array.astype(dtype, copy=False), volume.affine, volume.header, volume.path)

    def files(self) -> list[Path]:
        return self.format.files(self.path)

    def mask_path(self, folder: Path, case: str) -> Path:
        """Where the label map of ``case`` predicted for this scan goes in ``folder``."""
        return folder / f"{case}{self.format.mask_suffix}"


def known_formats() -> str:
    return ", ".join(f.name for f in _FORMATS)


def find_format(path: str | Path) -> ScanFormat | None:
    """The format that claims ``path``, or None."""
    return next((f for f in _FORMATS if f.claims(Path(path))), None)


def resolve_scan(path: str | Path) -> Scan:
    """``path`` as a :class:`Scan`.

    Raises:
        DataError: nothing there, or no format claims it.
    """
    path = Path(path)
    found = find_format(path)
    if found is None:
        if not path.exists():
            raise DataError(f"{path}: file not found")
        raise DataError(f"{path}: not a scan fsseg reads ({known_formats()})")
    return Scan(path, found)


def load_volume(path: str | Path, dtype: np.dtype | type | None = None) -> Volume:
    """Read a 3D scan of any registered format, checking that it is complete (voxels as stored, or ``dtype``).

    Raises:
        DataError: missing, unreadable, corrupt or truncated file, not a 3D volume, an implausible grid or
            non-finite voxels.
    """
    return resolve_scan(path).read(dtype)


def load_scan_image(path: str | Path) -> nib.Nifti1Image:
    """A scan's grid (shape, affine, header) without its voxels, for any registered format."""
    return resolve_scan(path).grid()
