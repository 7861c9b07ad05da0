"""A full disk is one line naming the file, in every command that writes, and leaves no temporary file behind
(issue 44, class 8). The disk is a small tmpfs, where the machine lets the tests mount one."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from conftest import REPO, ct_like, write_method_configs, write_nifti
from fsseg.adapt.cli import main as adapt
from fsseg.cli.export_bundle import main as export_bundle
from fsseg.cli.phantom import main as phantom
from fsseg.cli.predict import main as predict
from fsseg.cli.sample_data import main as sample_data

pytestmark = pytest.mark.skipif(
    subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0",
    reason="mounting a tmpfs needs root",
)


@pytest.fixture
def full_disk(tmp_path):
    """A 256 kB tmpfs: big enough to start writing, too small for any command's outputs."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this machine does not let the tests mount a tmpfs")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)  # a memory-mapped cache may still be open


def one_line(capsys) -> str:
    """The one error line of a command (progress lines may come before it)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(full_disk, tmp_path, tiny_checkpoint, capsys):
    scans = tmp_path / "scans"
    write_nifti(scans / "a.nii.gz", ct_like((64, 64, 48)), np.diag([4.0, 4.0, 4.0, 1.0]))
    runs = {
        "sample-data": lambda: sample_data(["--out", str(full_disk / "samples")]),
        "phantom": lambda: phantom(
            [
                "--out",
                str(full_disk / "phantoms"),
                "--source-cases",
                "1",
                "--target-train",
                "1",
                "--target-test",
                "1",
                "--no-progress",
            ]
        ),
        "export-bundle": lambda: export_bundle(["-m", str(tiny_checkpoint), "-o", str(full_disk / "bundle")]),
        "adapt": lambda: adapt(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--data-list",
                str(REPO / "data_lists" / "examples" / "sample_ct_liver_fewshot.json"),
                "--organ",
                "liver",
                "--shots",
                "1",
                "--method",
                "lp",
                "--out",
                str(full_disk / "adapt"),
                "--set",
                f"method_configs={write_method_configs(tmp_path / 'm', epochs=1)}",
                "--no-progress",
            ]
        ),
    }
    for name, run in runs.items():
        assert run() == 2, name
        err = one_line(capsys)
        assert "free on its disk" in err, name
        assert not list(full_disk.rglob(".*.part*")), name
        if name in ("sample-data", "phantom"):  # data sets: all files or none, never a half-written one
            assert not [p for p in full_disk.rglob("*") if p.is_file()], name
        subprocess.run(["find", str(full_disk), "-mindepth", "1", "-delete"], check=True)
    # a prediction batch: the case fails, named, and the record cannot be written either
    assert (
        predict(
            [
                "-i",
                str(scans),
                "-o",
                str(full_disk / "pred"),
                "-m",
                str(tiny_checkpoint),
                "--save-probabilities",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "free on its disk" in one_line(capsys)
    assert not list(full_disk.rglob(".*.part*"))
