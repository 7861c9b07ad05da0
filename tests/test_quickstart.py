"""The README's quickstart works as written: its commands, run in order on a plain folder of scans made from the
sample CT, with a tiny model as MODEL.pt (only fsseg-adapt's schedules shortened, for time)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO, SAMPLE_CT, write_method_configs

pytestmark = pytest.mark.long
LIVER = 5  # TotalSegmentator's id
# my_scans: 5 support candidates and the 2 test ids of the quickstart (copies where the sample has too few scans)
SCANS = {
    "case_01": "ts_example_dicom",
    "case_02": "lidc_0001_abd_1p4mm",
    "case_03": "ts_example_ct",
    "case_04": "ts_example_ct_sm",
    "case_05": "ts_example_dicom",
    "case_09": "lidc_0001_abd_1p4mm",
    "case_10": "ts_example_ct_sm",
}


def quickstart() -> list[str]:
    """The command lines of the README's quickstart block, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Quickstart on your own scans") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def liver_label(case: str, path: Path) -> None:
    """The case's liver as a label map with id 1 (the quickstart's --label-map 1=liver)."""
    source = nib.load(str(SAMPLE_CT / "labels" / f"{case}.nii.gz"))
    liver = (np.asanyarray(source.dataobj) == LIVER).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(liver, source.affine), str(path))


def test_the_quickstart_runs_as_written(tmp_path, tiny_checkpoint):
    for name, case in SCANS.items():
        (tmp_path / "my_scans" / "images").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLE_CT / "images" / f"{case}.nii.gz", tmp_path / "my_scans" / "images" / f"{name}.nii.gz")
        liver_label(case, tmp_path / "my_scans" / "labels" / f"{name}.nii.gz")
    (tmp_path / "new_scans").mkdir()
    shutil.copyfile(SAMPLE_CT / "images" / "ts_example_ct.nii.gz", tmp_path / "new_scans" / "new_01.nii.gz")
    liver_label("ts_example_ct", tmp_path / "new_labels" / "new_01.nii.gz")
    shutil.copyfile(tiny_checkpoint, tmp_path / "MODEL.pt")
    short = write_method_configs(tmp_path / "short_schedules", epochs=2)
    bin_dir = Path(sys.executable).parent
    lines = quickstart()
    assert [line.split()[0] for line in lines] == [
        "fsseg-make-list",
        "fsseg-check-data",
        "fsseg-adapt",
        "fsseg-predict",
        "fsseg-evaluate",
    ]
    for line in lines:
        command = shlex.split(line)
        if command[0] == "fsseg-adapt":
            command += ["--set", f"method_configs={short}", "--set", "pictures=false", "--no-progress"]
        result = subprocess.run(
            [str(bin_dir / command[0]), *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"
    report = (tmp_path / "report" / "per_case.csv").read_text().splitlines()
    assert report[1].startswith("new_01,liver,") and report[1].endswith(",ok")
