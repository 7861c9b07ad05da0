"""Scan formats beside NIfTI and DICOM: NRRD (3D Slicer's) and MetaImage, read and written through SimpleITK."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ct_like, write_nifti
from fsseg.cli.predict import main as predict
from fsseg.data.scans import load_volume, resolve_scan
from fsseg.errors import DataError


def oblique_affine(spacing=(4.0, 4.0, 4.0)) -> np.ndarray:
    """A rotated grid with an offset, so that an axis or sign mistake shows."""
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = (-30.0, 12.5, 40.0)
    return affine


def converted(nifti, suffix: str):
    """The NIfTI file rewritten by SimpleITK in another format, as 3D Slicer would save it."""
    path = nifti.with_name(nifti.name.replace(".nii.gz", suffix))
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(path))
    return path


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_nrrd_and_metaimage_read_like_the_nifti_they_were_saved_from(tmp_path, suffix):
    nifti = write_nifti(tmp_path / "scan.nii.gz", ct_like((24, 20, 16)), oblique_affine((1.5, 2.0, 3.0)))
    other = converted(nifti, suffix)
    ours, theirs = load_volume(nifti), load_volume(other)
    assert np.array_equal(theirs.array, ours.array)
    assert np.allclose(theirs.affine, ours.affine, atol=1e-4)
    assert resolve_scan(other).name == "scan" and resolve_scan(other).grid().shape == (24, 20, 16)


def test_a_file_of_no_known_format_is_one_line(tmp_path):
    (tmp_path / "scan.png").write_bytes(b"not a scan")
    with pytest.raises(DataError, match=r"scan.png: not a scan fsseg reads \(NIfTI .*NRRD .*MetaImage"):
        load_volume(tmp_path / "scan.png")


def test_a_mask_predicted_for_an_nrrd_scan_is_nrrd_on_the_scans_grid(tiny_checkpoint, tmp_path):
    nifti = write_nifti(tmp_path / "scans" / "b.nii.gz", ct_like((24, 20, 16), seed=3), oblique_affine())
    nrrd = converted(nifti, ".nrrd").rename(tmp_path / "scans" / "a.nrrd")
    assert (
        predict(
            [
                "-i",
                str(tmp_path / "scans"),
                "--out",
                str(tmp_path / "masks"),
                "--checkpoint",
                str(tiny_checkpoint),
                "--organ",
                "liver",
                "spleen",
                "--no-progress",
            ]
        )
        == 0
    )
    mask, scan = sitk.ReadImage(str(tmp_path / "masks" / "a.nrrd")), sitk.ReadImage(str(nrrd))
    assert mask.GetSize() == scan.GetSize()
    assert np.allclose(mask.GetOrigin(), scan.GetOrigin()) and np.allclose(mask.GetSpacing(), scan.GetSpacing())
    assert np.allclose(mask.GetDirection(), scan.GetDirection())
    # the same voxels as the mask of the same scan saved as NIfTI
    assert np.array_equal(
        load_volume(tmp_path / "masks" / "a.nrrd").array, load_volume(tmp_path / "masks" / "b.nii.gz").array
    )
