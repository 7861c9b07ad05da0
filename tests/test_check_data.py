import gzip
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import LITS_LIST, TOTALSEG_LIST, ct_like, write_nifti
from fsseg.cli.check_data import main
from fsseg.data.scans import load_volume
from fsseg.errors import DataError

SHAPE = (24, 20, 16)


def good_case(folder, name="good"):
    image = write_nifti(folder / f"{name}.nii.gz", ct_like(SHAPE))
    label = np.zeros(SHAPE, np.uint8)
    label[8:12, 8:12, 6:10] = 1
    write_nifti(folder / f"{name}_label.nii.gz", label)
    return {"id": name, "image": image.name, "label": f"{name}_label.nii.gz"}


def write_list(folder, cases, label_map=None):
    path = folder / "list.json"
    path.write_text(json.dumps({"name": "t", "label_map": label_map or {"1": "liver"}, "cases": cases}))
    return path


def corrupt(folder):
    (folder / "bad.nii.gz").write_bytes(b"this is not a nifti file at all" * 10)
    return {"id": "bad", "image": "bad.nii.gz"}, "cannot be read as NIfTI"


def truncated(folder):
    case = good_case(folder, "cut")
    data = (folder / case["image"]).read_bytes()
    (folder / case["image"]).write_bytes(data[: len(data) // 2])
    return case, "truncated or corrupt"


def image_2d(folder):
    write_nifti(folder / "flat.nii.gz", ct_like((24, 20, 8))[..., 4])
    return {"id": "flat", "image": "flat.nii.gz"}, "expected a 3D volume, got a 2D image"


def image_4d(folder):
    write_nifti(folder / "time.nii.gz", np.stack([ct_like(SHAPE)] * 2, axis=-1))
    return {"id": "time", "image": "time.nii.gz"}, r"got a 4D \(2 volumes\) image"


def shape_mismatch(folder):
    case = good_case(folder, "shape")
    write_nifti(folder / case["label"], np.zeros((24, 20, 15), np.uint8))
    return case, r"does not match its image shape.nii.gz: shape \(24, 20, 15\) != \(24, 20, 16\)"


def affine_mismatch(folder):
    case = good_case(folder, "aff")
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    write_nifti(folder / case["label"], np.zeros(SHAPE, np.uint8), affine)
    return case, "does not match its image aff.nii.gz: affines differ"


def unknown_ids(folder):
    case = good_case(folder, "ids")
    label = np.zeros(SHAPE, np.uint8)
    label[1, 1, 1], label[2, 2, 2] = 1, 7
    write_nifti(folder / case["label"], label)
    return case, r"label id\(s\) 7 not in the dataset's label_map"


def empty_mask(folder):
    case = good_case(folder, "empty")
    write_nifti(folder / "liver_mask.nii.gz", np.zeros(SHAPE, np.uint8))
    return {"id": "empty", "image": case["image"], "labels": {"liver": "liver_mask.nii.gz"}}, "mask of 'liver' is empty"


def non_binary_mask(folder):
    case = good_case(folder, "nb")
    write_nifti(folder / "mask.nii.gz", np.full(SHAPE, 2, np.uint8))
    return {"id": "nb", "image": case["image"], "labels": {"liver": "mask.nii.gz"}}, "is not binary"


def not_hu(folder):
    write_nifti(folder / "unit.nii.gz", np.random.default_rng(0).random(SHAPE).astype(np.float32))
    return {"id": "unit", "image": "unit.nii.gz"}, "does not look like CT in HU"


def missing(folder):
    return {"id": "gone", "image": "gone.nii.gz"}, "gone.nii.gz: file not found"


@pytest.mark.parametrize(
    "make_bad",
    [
        corrupt,
        truncated,
        image_2d,
        image_4d,
        shape_mismatch,
        affine_mismatch,
        unknown_ids,
        empty_mask,
        non_binary_mask,
        not_hu,
        missing,
    ],
)
def test_each_bad_input_fails_its_case_and_names_the_problem(tmp_path, capsys, make_bad):
    bad, message = make_bad(tmp_path)
    path = write_list(tmp_path, [good_case(tmp_path), bad])
    assert main([str(path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "1 passed, 1 failed" in out
    failing = [line for line in out.splitlines() if line.startswith(bad["id"])]
    assert failing and failing[0].rstrip().endswith("FAIL")
    assert any(line.strip().startswith("error:") for line in out.splitlines())
    assert re.search(message, out), out


def test_empty_masks_can_be_allowed(tmp_path, capsys):
    bad, _ = empty_mask(tmp_path)
    path = write_list(tmp_path, [good_case(tmp_path), bad])
    assert main([str(path), "--no-progress", "--allow-empty"]) == 0
    assert "warning:" in capsys.readouterr().out


def test_real_ct_lists_pass(sample_ct, capsys):
    assert main([str(TOTALSEG_LIST), str(LITS_LIST), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "lidc_0001_abd_1p4mm" in out and "all lists: 5 passed, 0 failed" in out


def test_malformed_list_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "list.json"
    path.write_text('{"name": "x",\n "cases": [\n}')
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("fsseg-check-data: error: ") and "line 3" in err


def test_console_script_prints_no_traceback(tmp_path):
    path = write_list(tmp_path, [{"id": "a", "image": "a.nii.gz", "split": "everything"}])
    result = subprocess.run([sys.executable, "-m", "fsseg.cli.check_data", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "split 'everything'" in result.stderr


def test_load_volume_accepts_singleton_4th_dimension(tmp_path):
    path = write_nifti(tmp_path / "x.nii.gz", ct_like(SHAPE)[..., None])
    assert load_volume(path).array.shape == SHAPE


def test_truncated_uncompressed_nifti(tmp_path):
    path = write_nifti(tmp_path / "x.nii", ct_like(SHAPE))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="x.nii: file is truncated or corrupt"):
        load_volume(path)


def test_gzip_with_garbage_inside(tmp_path):
    path = tmp_path / "x.nii.gz"
    path.write_bytes(gzip.compress(b"\x00" * 400))
    with pytest.raises(DataError, match="x.nii.gz"):
        load_volume(path)
