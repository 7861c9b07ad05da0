"""The sample CT that ships with fsseg: written anywhere with lists that work there, never over a user's file, and
nothing in the project reading data from outside the repository."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from fsseg.cli.check_data import main as check_data
from fsseg.cli.sample_data import main as sample_data
from fsseg.data import samples
from fsseg.data.datalist import load_datalist


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return samples.write_sample_data(tmp_path_factory.mktemp("samples") / "out")


def test_written_lists_pass_check_data_and_point_into_the_written_folder(written, capsys):
    assert set(written.lists) == {
        "sample_ct_totalseg",
        "sample_ct_lits",
        "sample_ct_liver_pretrain",
        "sample_ct_liver_fewshot",
    }
    assert check_data([str(p) for p in written.lists.values()] + ["--no-progress"]) == 0
    cases = sum(len(load_datalist(p).cases) for p in written.lists.values())
    assert capsys.readouterr().out.strip().endswith(f"all lists: {cases} passed, 0 failed")
    for path in written.lists.values():
        datalist = load_datalist(path)
        assert datalist.root == written.folder.resolve()
        assert all(f.resolve().is_relative_to(written.folder.resolve()) for c in datalist.cases for f in c.files)
    assert "Apache-2.0" in (written.folder / "README.md").read_text()


def test_writing_again_keeps_the_files_and_a_different_file_is_refused_before_any_write(tmp_path, capsys):
    out = tmp_path / "samples"
    assert sample_data(["--out", str(out)]) == 0
    assert sample_data(["--out", str(out)]) == 0  # all identical: nothing to do
    mine = out / "ct" / "README.md"
    mine.write_text("my notes")
    missing = out / "ct" / "images" / "lits_117_crop128.nii.gz"
    missing.unlink()
    capsys.readouterr()
    assert sample_data(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(mine) in err and "already exists" in err
    assert mine.read_text() == "my notes" and not missing.exists()


def test_a_damaged_packaged_scan_is_named_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    damaged = tmp_path / "packaged"
    shutil.copytree(samples.sample_ct_dir(), damaged)
    scan = damaged / "images" / "ts_example_dicom.nii.gz"
    scan.write_bytes(scan.read_bytes()[:1000])  # a truncated copy, as an interrupted install leaves
    monkeypatch.setattr(samples, "sample_ct_dir", lambda: damaged)
    assert sample_data(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(scan) in err and "damaged" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*"))


def test_the_demo_split_keeps_pretraining_support_and_test_subjects_apart(written):
    pretrain = load_datalist(written.lists["sample_ct_liver_pretrain"])
    fewshot = load_datalist(written.lists["sample_ct_liver_fewshot"])
    assert "liver" not in pretrain.structures  # the liver's id is background: never supervised
    assert 5 in pretrain.label_map.background_ids
    pretraining_subjects = {c.group for c in pretrain.cases}
    assert not pretraining_subjects & {c.group for c in fewshot.cases}
    assert [(c.group, c.id) for c in fewshot.split("test")] == [("LITS-117", "lits_117_crop128")]
    assert len({c.group for c in fewshot.split("train")}) == 2  # K = 1 and K = 2 from distinct subjects


def test_no_file_of_the_project_reads_data_from_beside_the_checkout():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    this = Path(__file__).relative_to(REPO).as_posix()
    readers = [
        name
        for name in tracked.split()
        if name.endswith((".py", ".sh", ".json", ".yaml", ".cfg", "Makefile"))
        and name != this
        and "shared/data" in (REPO / name).read_text(errors="replace")
    ]
    assert readers == []
    manifest = json.loads((samples.sample_ct_dir() / "manifest.json").read_text())
    assert {c["subject_group"] for c in manifest["cases"].values()} == {"TS-A", "TS-B", "LIDC-0001", "LITS-117"}
