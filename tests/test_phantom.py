import json

import nibabel as nib
import numpy as np
import pytest

from fsseg.cli.check_data import main as check_data
from fsseg.cli.phantom import main as phantom_command
from fsseg.data import phantom
from fsseg.data.datalist import load_datalist
from fsseg.data.labels import LabelMap, structure_masks
from fsseg.errors import DataError
from fsseg.templates import load_template


def test_same_seed_same_volume_other_seed_other_volume():
    a = phantom.generate_volume(np.random.default_rng(5), (3.0, 3.0, 3.0))
    b = phantom.generate_volume(np.random.default_rng(5), (3.0, 3.0, 3.0))
    c = phantom.generate_volume(np.random.default_rng(6), (3.0, 3.0, 3.0))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == c[0].shape  # the field of view is fixed; the anatomy is not
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_anatomy_is_plausible():
    image, label, affine = phantom.generate_volume(np.random.default_rng(1), (2.5, 2.5, 2.5))
    assert image.dtype == np.int16 and label.dtype == np.uint8
    assert set(np.unique(label)) == set(range(len(phantom.STRUCTURES) + 1))
    canonical = nib.as_closest_canonical(nib.Nifti1Image(label, affine))
    ras = np.asanyarray(canonical.dataobj)
    centroid = {name: np.argwhere(ras == i + 1).mean(0) for i, name in enumerate(phantom.STRUCTURES)}
    assert centroid["liver"][0] > centroid["spleen"][0]  # liver on the patient's right
    assert centroid["kidney_right"][0] > centroid["kidney_left"][0]
    assert centroid["kidney_left"][1] < centroid["stomach"][1]  # kidneys posterior to the stomach
    liver_hu = image[label == 1].mean()
    assert 30 < liver_hu < 90
    assert image.min() <= -1000 and image.max() > 200  # air and bone


def test_writes_partial_source_lists_and_a_target_with_splits(tmp_path, capsys):
    assert (
        phantom_command(
            [
                "--out",
                str(tmp_path),
                "--source-cases",
                "1",
                "--target-train",
                "2",
                "--target-test",
                "1",
                "--spacing",
                "3",
                "3",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    lists = sorted(tmp_path.glob("*.json"))
    assert [p.stem for p in lists] == ["phantom_source_a", "phantom_source_b", "phantom_source_c", "phantom_target"]
    template = load_template()
    annotated = {}
    for path in lists:
        datalist = load_datalist(path)
        annotated[datalist.name] = set(datalist.structures)
        assert datalist.template_coverage(template)[1] == []
    sources = set.union(*(v for k, v in annotated.items() if "source" in k))
    assert "gallbladder" not in sources and "gallbladder" in annotated["phantom_target"]
    assert annotated["phantom_source_a"] != annotated["phantom_source_c"]
    target = load_datalist(tmp_path / "phantom_target.json")
    assert [len(target.split(s)) for s in ("train", "test")] == [2, 1]
    assert check_data([str(p) for p in lists] + ["--no-progress"]) == 0


def test_joint_kidney_source_splits_back_into_both_kidneys(tmp_path):
    dataset = phantom.default_datasets(source_cases=1)[1]
    assert dataset.label_map["2"] == "kidney@split"
    rng = np.random.default_rng(0)
    image, label, affine = phantom.generate_volume(rng, (3.0, 3.0, 3.0))
    joint = phantom.relabel(label, dataset.label_map)
    masks = structure_masks(joint, LabelMap.parse(dataset.label_map), affine, image)
    right_true = label == phantom.STRUCTURES.index("kidney_right") + 1
    assert (masks["kidney_right"] == right_true).mean() > 0.999
    assert masks["kidney_right"].sum() == pytest.approx(right_true.sum(), rel=0.02)


def test_lists_are_readable_json_with_relative_root(tmp_path):
    path = phantom.write_dataset(
        tmp_path, phantom.PhantomDataset("tiny", {"1": "liver"}, 1), seed=0, spacing=(3, 3, 3), progress=False
    )
    data = json.loads(path.read_text())
    assert data["root"] == "tiny" and data["cases"][0]["image"] == "images/tiny_000.nii.gz"


def test_a_run_that_fails_midway_leaves_no_half_written_data_set(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    (out / ".fsseg-staging.killed.part" / "phantom_source_a").mkdir(parents=True)  # what a kill -9 left
    real, calls = phantom.generate_volume, []

    def fails_at_the_fourth_volume(*args):
        calls.append(1)
        if len(calls) == 4:
            raise DataError("disk full")
        return real(*args)

    monkeypatch.setattr(phantom, "generate_volume", fails_at_the_fourth_volume)
    argv = [
        "--out",
        str(out),
        "--source-cases",
        "1",
        "--target-train",
        "1",
        "--target-test",
        "1",
        "--spacing",
        "6",
        "6",
        "6",
        "--no-progress",
    ]
    assert phantom_command(argv) == 2
    assert "disk full" in capsys.readouterr().err
    assert list(out.iterdir()) == []  # three data sets were complete: none of them is left, nor the staging folder
    monkeypatch.setattr(phantom, "generate_volume", real)
    assert phantom_command(argv) == 0
    assert len(list(out.glob("*.json"))) == 4 and not list(out.glob(".*"))


def test_a_list_of_the_users_in_the_output_folder_is_refused_not_replaced(tmp_path, capsys):
    mine = tmp_path / "phantom_target.json"
    mine.write_text('{"name": "mine", "cases": []}')
    assert phantom_command(["--out", str(tmp_path), "--source-cases", "1", "--no-progress"]) == 2
    assert "is not a list of fsseg-phantom" in capsys.readouterr().err
    assert mine.read_text() == '{"name": "mine", "cases": []}' and list(tmp_path.iterdir()) == [mine]
