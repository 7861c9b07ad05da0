"""DICOM CT series as input: read with their geometry and HU, predicted like the NIfTI they came from, and bad
series refused in one line."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_series import new_uid, write_dicom_series
from test_predict import oracle_checkpoint

from conftest import write_method_configs
from fsseg.adapt.cli import main as adapt
from fsseg.checkpoint import save_checkpoint
from fsseg.cli.predict import main as predict
from fsseg.data.dicom import read_series, read_series_header
from fsseg.models import create_model
from fsseg.preprocessing import Preprocessing
from fsseg.templates import load_template

CASE = "ts_example_dicom"  # LAS, 0.98 x 0.98 x 2 mm, int16 HU down to -1024
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def series(sample_ct, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom") / CASE
    write_dicom_series(sample_ct / "images" / f"{CASE}.nii.gz", folder)
    return folder


def canonical(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    image = nib.as_closest_canonical(image)
    return np.asanyarray(image.dataobj), image.affine


def test_a_series_reads_as_the_scan_it_was_written_from_in_hu(sample_ct, series):
    source = nib.load(str(sample_ct / "images" / f"{CASE}.nii.gz"))
    header, (read, voxels) = read_series_header(series), read_series(series)
    stored = pydicom.dcmread(header.files[0]).pixel_array
    # The files hold HU + 1024, and their names say nothing of the slice order.
    assert stored.min() >= 0 and sorted(header.files) != list(header.files)
    assert read.shape == voxels.shape == source.shape and np.array_equal(read.affine, header.affine)
    array, affine = canonical(nib.Nifti1Image(voxels, read.affine))
    expected, expected_affine = canonical(source)
    assert np.allclose(affine, expected_affine, atol=1e-5)
    assert np.array_equal(array, expected) and array.min() == -1024


def test_prediction_from_a_series_equals_the_prediction_from_its_nifti(sample_ct, series, tmp_path):
    checkpoint = oracle_checkpoint(tmp_path / "oracle.pt", Preprocessing(spacing=(3.0, 3.0, 3.0), roi=(32, 32, 32)))
    batch = tmp_path / "batch"  # a folder of series folders and NIfTI files
    batch.mkdir()
    (batch / "from_dicom").symlink_to(series, target_is_directory=True)
    (batch / "from_nifti.nii.gz").symlink_to(sample_ct / "images" / f"{CASE}.nii.gz")
    out = tmp_path / "pred"
    assert predict(["-i", str(batch), "-o", str(out), "-m", str(checkpoint), "--organs", "liver", "--no-progress"]) == 0
    from_dicom, from_nifti = nib.load(str(out / "from_dicom.nii.gz")), nib.load(str(out / "from_nifti.nii.gz"))
    # On the series' own grid, as its headers give it ...
    grid = read_series_header(series)
    assert from_dicom.shape == grid.shape and np.allclose(from_dicom.affine, grid.affine, atol=1e-6)
    # ... and the same voxels as the NIfTI's prediction, once both are in one orientation.
    mask, mask_affine = canonical(from_dicom)
    expected, expected_affine = canonical(from_nifti)
    assert expected.sum() > 1000 and np.allclose(mask_affine, expected_affine, atol=1e-5)
    assert np.array_equal(mask, expected)
    cases = json.loads((out / "predictions.json").read_text())["cases"]
    assert cases["from_dicom"]["image"] == str(batch / "from_dicom") and cases["from_dicom"]["status"] == "ok"


def test_a_data_list_may_name_a_series_as_a_cases_image(sample_ct, series, tmp_path):
    # The label is written on the series' grid, as a tool reading the series (ITK, 3D Slicer) would save it.
    label = nib.load(str(sample_ct / "labels" / f"{CASE}.nii.gz"))
    ornt = nib.orientations.ornt_transform(
        nib.io_orientation(label.affine), nib.io_orientation(read_series_header(series).affine)
    )
    nib.save(label.as_reoriented(ornt), str(tmp_path / "label.nii.gz"))
    label_map = json.loads((sample_ct / "label_maps" / "totalsegmentator_v2_total.json").read_text())
    listing = {
        "name": "dicom",
        "label_map": label_map,
        "cases": [
            {"id": "series", "image": str(series), "label": "label.nii.gz", "split": "train"},
            {
                "id": "nifti",
                "image": str(sample_ct / "images" / f"{CASE}.nii.gz"),
                "label": str(sample_ct / "labels" / f"{CASE}.nii.gz"),
                "split": "test",
            },
        ],
    }
    data_list = tmp_path / "list.json"
    data_list.write_text(json.dumps(listing))
    checked = subprocess.run(
        [sys.executable, "-m", "fsseg.cli.check_data", str(data_list), "--no-progress"], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    checkpoint = oracle_checkpoint(tmp_path / "oracle.pt", Preprocessing(spacing=(3.0, 3.0, 3.0), roi=(32, 32, 32)))
    assert (
        predict(
            [
                "-i",
                str(data_list),
                "--split",
                "train",
                "-o",
                str(tmp_path / "pred"),
                "-m",
                str(checkpoint),
                "--organs",
                "liver",
                "--no-progress",
            ]
        )
        == 0
    )
    assert nib.load(str(tmp_path / "pred" / "series.nii.gz")).shape == read_series_header(series).shape
    # The series is the support set of an adaptation.
    template = load_template()
    model = create_model("unet_tiny", num_classes=len(template))
    base = save_checkpoint(
        tmp_path / "base.pt",
        {
            "arch": model.arch,
            "template": template.to_dict(),
            "preprocessing": Preprocessing(spacing=(3.0, 3.0, 3.0), roi=(32, 32, 32)).to_dict(),
            "state_dict": model.state_dict(),
        },
    )
    configs = write_method_configs(tmp_path / "configs", epochs=1)
    out = tmp_path / "adapt"
    assert (
        adapt(
            [
                "--checkpoint",
                str(base),
                "--data-list",
                str(data_list),
                "--organ",
                "liver",
                "--shots",
                "1",
                "--method",
                "lp",
                "--seeds",
                "1",
                "--out",
                str(out),
                "--set",
                f"method_configs={configs}",
                "--set",
                "pictures=false",
                "--no-progress",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert [(r["support"], r["case"]) for r in rows] == [("series", "nifti")]


BAD_SERIES = {
    "mixed": ({}, "holds 2 series"),
    "missing": ({"drop": (9,)}, "slice(s) missing between"),
    "uneven": ({"shift_mm": {9: 0.6}}, "non-uniform slice spacing"),
    "mr": ({"modality": "MR"}, "modality MR, expected CT"),
    "repeated": ({"shift_mm": {9: -2.0}}, "lie at the same position"),
    # two acquisitions under one series UID, half a slice apart: they would interleave into one even volume
    "interleaved": ({}, "instance number 1 is given to"),
    "nan": ({}, "hold a non-finite number"),  # a NaN position would sort its slice anywhere
    "damaged": ({}, "not a readable DICOM file, among the series' slices"),  # it was dropped silently
}


@pytest.mark.parametrize("kind", sorted(BAD_SERIES))
def test_a_bad_series_is_one_line_and_nothing_is_written(sample_ct, tmp_path, capsys, kind):
    tweaks, message = BAD_SERIES[kind]
    folder = tmp_path / "scan"
    source = sample_ct / "images" / f"{CASE}.nii.gz"
    uid = write_dicom_series(source, folder, **tweaks)
    if kind == "mixed":
        write_dicom_series(source, folder, series_uid=new_uid(), drop=tuple(range(5, 20)))
    if kind == "interleaved":
        write_dicom_series(source, folder, series_uid=uid, shift_mm={i: 1.0 for i in range(20)})
    if kind == "nan":
        path = sorted(folder.iterdir())[3]
        dataset = pydicom.dcmread(str(path))
        dataset[0x0020, 0x0032].value = "nan\\0\\0"
        dataset.save_as(str(path))
    if kind == "damaged":
        last = read_series_header(folder).files[-1]
        last.write_bytes(b"\0" * 64)  # the end of a copy that failed
    checkpoint = oracle_checkpoint(tmp_path / "oracle.pt", Preprocessing(spacing=(3.0, 3.0, 3.0), roi=(32, 32, 32)))
    out = tmp_path / "pred"
    assert predict(["-i", str(folder), "-o", str(out), "-m", str(checkpoint), "--no-progress"]) == 1
    printed = capsys.readouterr().err
    errors = [line for line in printed.splitlines() if "failed" in line]
    assert len(errors) == 1 and str(folder) in errors[0] and message in errors[0], printed
    assert not (out / "scan.nii.gz").exists()


def test_dicom_seg_reads_back_as_the_nifti_mask_on_the_source_slices(series, tmp_path):
    checkpoint = oracle_checkpoint(tmp_path / "oracle.pt", Preprocessing(spacing=(3.0, 3.0, 3.0), roi=(32, 32, 32)))
    out = tmp_path / "pred"
    assert (
        predict(
            [
                "-i",
                str(series),
                "-o",
                str(out),
                "-m",
                str(checkpoint),
                "--organs",
                "liver",
                "kidney_right",
                "--output-type",
                "nifti",
                "dicom-seg",
                "--no-progress",
            ]
        )
        == 0
    )
    seg = hd.seg.segread(str(out / f"{CASE}.seg.dcm"))
    grid = read_series_header(series)
    source = pydicom.dcmread(str(grid.files[0]), stop_before_pixels=True)
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    segments = {d.SegmentLabel: d for d in seg.SegmentSequence}
    assert list(segments) == ["liver", "kidney_right"]  # kidney_right is predicted nowhere: an empty segment
    liver_type = segments["liver"].SegmentedPropertyTypeCodeSequence[0]
    assert (liver_type.CodeValue, liver_type.CodingSchemeDesignator) == ("10200004", "SCT")
    right = segments["kidney_right"].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
    assert right.CodeMeaning == "Right"
    # Frame by frame on the source instances, in the series' slice order: the NIfTI mask.
    instances = [pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID for p in grid.files]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=instances, combine_segments=True)
    mask = np.asanyarray(nib.load(str(out / f"{CASE}.nii.gz")).dataobj)
    assert mask.sum() > 1000 and np.array_equal(frames, mask.transpose(2, 1, 0))


def test_dicom_seg_of_a_series_with_only_the_mandatory_tags_is_written(sample_ct, tmp_path):
    folder = tmp_path / "bare"
    write_dicom_series(sample_ct / "images" / f"{CASE}.nii.gz", folder)
    optional = ("SliceThickness", "PatientID", "PatientName", "StudyDate", "StudyTime", "StudyID", "AccessionNumber")
    for path in folder.iterdir():  # as SimpleITK's own example series, which has no SliceThickness
        source = pydicom.dcmread(str(path))
        for keyword in optional:
            if keyword in source:
                delattr(source, keyword)
        source.save_as(str(path))
    checkpoint = oracle_checkpoint(tmp_path / "oracle.pt", Preprocessing(spacing=(3.0, 3.0, 3.0), roi=(32, 32, 32)))
    out = tmp_path / "pred"
    assert (
        predict(
            [
                "-i",
                str(folder),
                "-o",
                str(out),
                "-m",
                str(checkpoint),
                "--organs",
                "liver",
                "--output-type",
                "nifti",
                "dicom-seg",
                "--no-progress",
            ]
        )
        == 0
    )
    seg = hd.seg.segread(str(out / "bare.seg.dcm"))
    assert seg.PatientID == "" and [d.SegmentLabel for d in seg.SegmentSequence] == ["liver"]


def test_dicom_seg_of_a_nifti_scan_is_refused_before_predicting(sample_ct, tmp_path, capsys):
    checkpoint = oracle_checkpoint(tmp_path / "oracle.pt", Preprocessing(spacing=(3.0, 3.0, 3.0), roi=(32, 32, 32)))
    scan = sample_ct / "images" / f"{CASE}.nii.gz"
    out = tmp_path / "pred"
    assert predict(["-i", str(scan), "-o", str(out), "-m", str(checkpoint), "--output-type", "dicom-seg"]) == 2
    assert "needs DICOM series as input" in capsys.readouterr().err and not out.exists()


def test_a_study_folder_with_a_stray_file_at_its_root_is_refused_not_read_as_that_file(series, tmp_path, capsys):
    study = tmp_path / "study"
    shutil.copytree(series, study / "abdomen")
    stray = sorted(series.iterdir())[0]
    shutil.copyfile(stray, study / stray.name)  # one slice left at the study's root
    checkpoint = oracle_checkpoint(tmp_path / "oracle.pt", Preprocessing(spacing=(3.0, 3.0, 3.0), roi=(32, 32, 32)))
    assert predict(["-i", str(study), "-o", str(tmp_path / "pred"), "-m", str(checkpoint), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "beside series folders (abdomen, ...)" in err and err.count("\n") == 1
