import json

import numpy as np
import pytest

from conftest import ct_like, write_nifti
from fsseg.cli.check_data import main as check_data
from fsseg.cli.make_list import main
from fsseg.data.datalist import load_datalist
from fsseg.data.make_list import available_datasets, load_spec, scan
from fsseg.errors import ConfigError, DataError

SHAPE = (16, 16, 12)


def volume_pair(image_path, label_path, label_value=1):
    write_nifti(image_path, ct_like(SHAPE))
    label = np.zeros(SHAPE, np.uint8)
    label[6:10, 6:10, 4:8] = label_value
    write_nifti(label_path, label)


def test_every_dataset_of_the_pretraining_assembly_has_a_spec():
    expected = {
        "btcv",
        "amos",
        "lits",
        "kits",
        "abdomenct1k",
        "chaos",
        "ctorg",
        "msd_task03_liver",
        "msd_task06_lung",
        "msd_task07_pancreas",
        "msd_task08_hepaticvessel",
        "msd_task09_spleen",
        "msd_task10_colon",
        "word",
        "flare22",
        "totalsegmentator",
    }
    assert expected <= set(available_datasets())
    for name in expected:
        assert load_spec(name)["layouts"]


def test_msd_layout_becomes_a_valid_list(tmp_path, capsys):
    root = tmp_path / "Task09_Spleen"
    for i in (2, 10):
        volume_pair(root / "imagesTr" / f"spleen_{i}.nii.gz", root / "labelsTr" / f"spleen_{i}.nii.gz")
    write_nifti(root / "imagesTs" / "spleen_1.nii.gz", ct_like(SHAPE))
    write_nifti(root / "imagesTr" / "._spleen_2.nii.gz", ct_like(SHAPE))  # macOS resource-fork junk is ignored
    out = tmp_path / "spleen.json"
    assert main(["msd_task09_spleen", "--root", str(root), "-o", str(out)]) == 0
    assert "3 cases (2 train, 1 test)" in capsys.readouterr().out
    datalist = load_datalist(out)
    assert [(c.id, c.split, c.label is not None) for c in datalist.cases] == [
        ("spleen_10", "train", True),
        ("spleen_2", "train", True),
        ("spleen_1", "test", False),
    ]
    assert datalist.label_map.structures == ["spleen"]
    assert check_data([str(out), "--no-progress"]) == 0


def test_totalsegmentator_layout_uses_masks_and_meta_csv(tmp_path):
    root = tmp_path / "ts"
    for subject in ("s0001", "s0002"):
        volume_pair(root / subject / "ct.nii.gz", root / subject / "segmentations" / "liver.nii.gz")
        volume_pair(root / subject / "ct.nii.gz", root / subject / "segmentations" / "kidney_left.nii.gz")
    (root / "meta.csv").write_text("image_id;age;split\ns0001;50;train\ns0002;61;test\n")
    cases = scan(load_spec("totalsegmentator"), root)
    assert [(c["id"], c["split"]) for c in cases] == [("s0001", "train"), ("s0002", "test")]
    assert set(cases[0]["labels"]) == {"liver", "kidney_left"}


def test_kits_joint_kidney_label_map(tmp_path):
    root = tmp_path / "kits"
    volume_pair(root / "case_00000" / "imaging.nii.gz", root / "case_00000" / "segmentation.nii.gz")
    out = tmp_path / "kits.json"
    assert main(["kits", "--root", str(root), "-o", str(out)]) == 0
    assert load_datalist(out).label_map.structures[:2] == ["kidney_right", "kidney_left"]


def test_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown dataset 'btvc'"):
        load_spec("btvc")
    with pytest.raises(DataError, match="dataset root folder not found"):
        scan(load_spec("btcv"), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images of dataset 'btcv' found"):
        scan(load_spec("btcv"), tmp_path / "empty")
    root = tmp_path / "flare"
    write_nifti(root / "images" / "FLARE22_Tr_0001_0000.nii.gz", ct_like(SHAPE))
    with pytest.raises(DataError, match=r"1 image\(s\) have no label file: labels/FLARE22_Tr_0001.nii.gz"):
        scan(load_spec("flare22"), root)
    out = tmp_path / "exists.json"
    out.write_text("{}")
    assert main(["btcv", "--root", str(tmp_path), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert json.loads(out.read_text()) == {}


def nnunet_dataset(root, sample_ct, labels_json=None):
    """An nnU-Net raw dataset written from the real CT: two training cases (liver 1, spleen 2) and a test case."""
    import shutil

    import nibabel as nib

    sources = {"ts_example_ct_sm": {5: 1, 1: 2}, "lidc_0001_abd_1p4mm": {5: 1, 1: 2}}
    for i, (case, ids) in enumerate(sources.items()):
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample_ct / "images" / f"{case}.nii.gz", root / "imagesTr" / f"liver_{i:03d}_0000.nii.gz")
        label = nib.load(sample_ct / "labels" / f"{case}.nii.gz")
        values = np.asanyarray(label.dataobj)
        remapped = np.zeros(values.shape, np.uint8)
        for source_id, target_id in ids.items():
            remapped[values == source_id] = target_id
        write_nifti(root / "labelsTr" / f"liver_{i:03d}.nii.gz", remapped, label.affine)
    (root / "imagesTs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sample_ct / "images" / "ts_example_dicom.nii.gz", root / "imagesTs" / "liver_100_0000.nii.gz")
    meta = {
        "channel_names": {"0": "CT"},
        "labels": labels_json or {"background": 0, "liver": 1, "spleen": 2},
        "numTraining": 2,
        "file_ending": ".nii.gz",
        "name": "Liver from the sample CT",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_an_nnunet_raw_dataset_becomes_a_valid_list(tmp_path, sample_ct, capsys):
    root = nnunet_dataset(tmp_path / "Dataset042_SharedLiver", sample_ct)
    out = tmp_path / "liver.json"
    assert main(["nnunet", "--root", str(root), "-o", str(out)]) == 0
    assert "3 cases (2 train, 1 test)" in capsys.readouterr().out
    datalist = load_datalist(out)
    assert datalist.name == "Dataset042_SharedLiver" and datalist.label_map.structures == ["liver", "spleen"]
    assert [(c.id, c.split, c.label is not None) for c in datalist.cases] == [
        ("liver_000", "train", True),
        ("liver_001", "train", True),
        ("liver_100", "test", False),
    ]
    assert check_data([str(out), "--no-progress"]) == 0
    meta = json.loads((root / "dataset.json").read_text())  # nnU-Net v1's Task format: id -> name
    del meta["channel_names"]
    meta.update(modality={"0": "CT"}, labels={"0": "background", "1": "liver", "2": "spleen"})
    (root / "dataset.json").write_text(json.dumps(meta))
    assert main(["nnunet", "--root", str(root), "-o", str(tmp_path / "v1.json")]) == 0
    assert load_datalist(tmp_path / "v1.json").label_map.structures == ["liver", "spleen"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"channel_names": {"0": "CT", "1": "PET"}}, "2 input channels"),
        ({"labels": {"background": 0, "liver": [1, 2]}}, "region-based"),
        ({"labels": {"background": 0, "liver": 1, "ignore": 3}}, "label 'ignore'"),
        ({"file_ending": ".mha"}, "fsseg reads NIfTI"),
        # label maps that lie (issue 44): liver voxels would become spleen, 1.5 would be read as 1
        ({"labels": {"background": "0", "liver": "1", "spleen": "1"}}, "id 1 is given to both 'liver' and 'spleen'"),
        ({"labels": {"background": 0, "liver": 1.5}}, "label 'liver' has id 1.5, not an integer"),
    ],
)
def test_nnunet_datasets_fsseg_cannot_read_are_one_line(tmp_path, sample_ct, capsys, change, message):
    root = nnunet_dataset(tmp_path / "Dataset001_X", sample_ct)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps(meta | change))
    assert main(["nnunet", "--root", str(root), "-o", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "x.json").exists()


def test_a_plain_folder_becomes_a_list_with_supports_held_out_tests_and_scans_to_predict(tmp_path, capsys):
    root = tmp_path / "my_scans"
    for case in ("a", "b", "c"):
        volume_pair(root / "images" / f"{case}.nii.gz", root / "labels" / f"{case}.nii.gz")
    write_nifti(root / "images" / "new.nii", ct_like(SHAPE))  # not labelled: to predict
    out = tmp_path / "mine.json"
    assert main(["folder", "--root", str(root), "--label-map", "1=liver", "--test-ids", "c", "-o", str(out)]) == 0
    assert "4 cases (2 train, 2 test)" in capsys.readouterr().out
    datalist = load_datalist(out)
    assert [(c.id, c.split, c.label is not None) for c in datalist.cases] == [
        ("a", "train", True),
        ("b", "train", True),
        ("c", "test", True),
        ("new", "test", False),
    ]
    assert datalist.label_map.structures == ["liver"]
    assert check_data([str(out), "--no-progress"]) == 0


@pytest.mark.parametrize(
    "change, args, message",
    [
        ("none", [], "give --label-map"),
        ("none", ["--label-map", "liver"], "expected ID=NAME pairs"),
        ("none", ["--label-map", "1=liver", "--test-ids", "zz"], "--test-ids zz: no labelled case"),
        ("orphan", ["--label-map", "1=liver"], "orphan.nii.gz: a label without an image"),
        ("no_images", ["--label-map", "1=liver"], "no images/ folder"),
    ],
)
def test_plain_folders_fsseg_cannot_list_are_one_line(tmp_path, capsys, change, args, message):
    root = tmp_path / "my_scans"
    volume_pair(root / "images" / "a.nii.gz", root / "labels" / "a.nii.gz")
    if change == "orphan":
        volume_pair(tmp_path / "x.nii.gz", root / "labels" / "orphan.nii.gz")
    elif change == "no_images":
        (root / "images" / "a.nii.gz").rename(root / "a.nii.gz")
        (root / "images").rmdir()
    assert main(["folder", "--root", str(root), "-o", str(tmp_path / "out.json"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out.json").exists()


def test_folder_options_are_refused_for_a_named_dataset(tmp_path, capsys):
    assert main(["btcv", "--root", str(tmp_path), "--label-map", "1=liver", "-o", str(tmp_path / "o.json")]) == 2
    assert "for 'folder' only" in capsys.readouterr().err
