"""Names from data lists and command lines never become paths outside an output folder, and two outputs never share
a file: refused in one line before the first write (issue 44, classes 1 and 3)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SAMPLE_CT, ct_like, write_nifti
from fsseg.adapt.cli import main as adapt
from fsseg.cli.check_data import main as check_data
from fsseg.cli.predict import main as predict

SCAN = SAMPLE_CT / "images" / "ts_example_ct_sm.nii.gz"
LABEL = SAMPLE_CT / "labels" / "ts_example_ct_sm.nii.gz"


def one_case_list(path, case_id="sm", label_map=None):
    path.write_text(
        json.dumps(
            {
                "name": "x",
                "label_map": label_map or {"5": "liver"},
                "cases": [{"id": case_id, "image": str(SCAN), "label": str(LABEL), "split": "test"}],
            }
        )
    )
    return path


def files_under(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file())


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("case_id", ["../outside", "/tmp/absolute", "sub/dir", "back\\slash", "nul\x00byte"])
def test_a_case_id_that_could_leave_the_output_folder_is_refused_before_any_write(
    tmp_path, capsys, tiny_checkpoint, case_id
):
    data_list = one_case_list(tmp_path / "list.json", case_id)
    before = files_under(tmp_path)
    assert check_data([str(data_list), "--no-progress"]) == 2
    assert "cannot be part of a file name" in one_line(capsys)
    assert (
        predict(
            [
                "-i",
                str(data_list),
                "-o",
                str(tmp_path / "out" / "masks"),
                "-m",
                str(tiny_checkpoint),
                "--preview",
                "--no-progress",
            ]
        )
        == 2
    )
    assert repr(case_id) in one_line(capsys)
    assert files_under(tmp_path) == before


def test_a_structure_name_with_a_separator_is_refused_in_lists_and_options(tmp_path, capsys, tiny_checkpoint):
    assert check_data([str(one_case_list(tmp_path / "l.json", label_map={"5": "../liver"})), "--no-progress"]) == 2
    assert "structure name '../liver'" in one_line(capsys)
    good = one_case_list(tmp_path / "good.json")
    assert (
        adapt(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--data-list",
                str(good),
                "--organ",
                "x/../../y",
                "--shots",
                "1",
                "--out",
                str(tmp_path / "run"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "structure name 'x/../../y'" in one_line(capsys)
    assert not (tmp_path / "run").exists()


def test_two_cases_whose_outputs_would_share_a_file_are_refused_before_any_write(tmp_path, capsys, tiny_checkpoint):
    scans = tmp_path / "scans"
    for name in ("x", "x_probabilities"):  # x's probabilities and x_probabilities's mask: one file name
        write_nifti(scans / f"{name}.nii.gz", ct_like(), np.diag([4.0, 4.0, 4.0, 1.0]))
    out = tmp_path / "out"
    assert (
        predict(["-i", str(scans), "-o", str(out), "-m", str(tiny_checkpoint), "--save-probabilities", "--no-progress"])
        == 2
    )
    err = one_line(capsys)
    assert "would both be written to" in err and "x_probabilities.nii.gz" in err
    assert not out.exists() or not files_under(out)
