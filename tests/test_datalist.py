import json

import pytest

from conftest import LITS_LIST, TOTALSEG_LIST
from fsseg.data.datalist import load_datalist
from fsseg.errors import DataError


def write_list(path, **fields):
    data = {
        "name": "demo",
        "label_map": {"1": "liver"},
        "cases": [{"id": "a", "image": "a.nii.gz", "label": "a_l.nii.gz"}],
    }
    data.update(fields)
    path.write_text(json.dumps(data))
    return path


def test_shipped_real_ct_lists_resolve_into_the_sample_data(sample_ct):
    datalist = load_datalist(TOTALSEG_LIST)
    assert datalist.root == sample_ct.resolve()
    assert all(case.image.is_file() and case.label.is_file() for case in datalist.cases)
    assert [c.id for c in datalist.split("test")] == ["lidc_0001_abd_1p4mm"]
    # Same-subject cases never straddle the train/test line.
    groups = {split: {c.group for c in datalist.split(split)} for split in ("train", "test")}
    assert not groups["train"] & groups["test"]
    assert "liver" in datalist.structures and "lung_upper_lobe_left" in datalist.structures
    assert load_datalist(LITS_LIST).label_map.structures == ["liver", "liver_tumor"]


def test_example_list_matches_the_example_format(tmp_path):
    path = tmp_path / "btcv.json"
    path.write_text(
        json.dumps(
            {
                "name": "btcv",
                "root": "base",
                "label_map": {"1": "spleen", "2": "kidney_right", "6": "liver"},
                "cases": [
                    {
                        "id": "img0001",
                        "image": "imagesTr/img0001.nii.gz",
                        "label": "labelsTr/label0001.nii.gz",
                        "split": "train",
                    },
                    {
                        "id": "s0011",
                        "image": "s0011/ct.nii.gz",
                        "labels": {"liver": "s0011/segmentations/liver.nii.gz"},
                        "split": "test",
                    },
                ],
            }
        )
    )
    datalist = load_datalist(path)
    first, second = datalist.cases
    assert first.image == tmp_path / "base" / "imagesTr" / "img0001.nii.gz"
    assert first.annotated_structures(datalist.label_map) == ["spleen", "kidney_right", "liver"]
    assert second.labels == {"liver": tmp_path / "base" / "s0011" / "segmentations" / "liver.nii.gz"}
    assert second.split == "test" and first.split == "train"
    assert [c.id for c in datalist.cases_annotating("liver", "test")] == ["s0011"]


def test_relative_paths_resolve_root_then_data_root_then_env_then_list_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("FSSEG_DATA_ROOT", raising=False)
    plain = write_list(tmp_path / "plain.json")
    assert load_datalist(plain).cases[0].image == tmp_path / "a.nii.gz"
    monkeypatch.setenv("FSSEG_DATA_ROOT", str(tmp_path / "env"))
    assert load_datalist(plain).cases[0].image == tmp_path / "env" / "a.nii.gz"
    assert load_datalist(plain, data_root=tmp_path / "cli").cases[0].image == tmp_path / "cli" / "a.nii.gz"
    rooted = write_list(tmp_path / "rooted.json", root="own")
    assert load_datalist(rooted, data_root=tmp_path / "cli").cases[0].image == tmp_path / "own" / "a.nii.gz"


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n "name": "x",\n "cases": [\n  {"id": "a" "image": "b"}\n ]\n}\n')
    with pytest.raises(DataError, match=r"broken.json: malformed JSON at line 4"):
        load_datalist(path)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"cases": []}, "'cases' must be a non-empty list"),
        ({"cases": [{"id": "a"}]}, "case 'a': missing or empty 'image'"),
        ({"cases": [{"id": "a", "image": "a", "split": "training"}]}, "split 'training' is not one of"),
        ({"cases": [{"id": "a", "image": "a", "label": "l", "labels": {"liver": "m"}}]}, "either 'label'"),
        ({"cases": [{"id": "a", "image": "a"}, {"id": "a", "image": "b"}]}, "duplicate case id 'a'"),
        ({"label_map": {"one": "liver"}}, "key 'one' is not an integer"),
        ({"label_map": {"1": ""}}, "must name a structure"),
        ({"labelmap": {}}, "unknown key"),
        ({"cases": [{"id": "a", "image": "a", "mask": "m"}]}, "unknown key\\(s\\) mask"),
    ],
)
def test_invalid_lists_are_rejected_with_the_reason(tmp_path, fields, message):
    with pytest.raises(DataError, match=message):
        load_datalist(write_list(tmp_path / "list.json", **fields))


def test_missing_list_file(tmp_path):
    with pytest.raises(DataError, match="data list not found"):
        load_datalist(tmp_path / "nope.json")


def test_split_suffix_expands_to_both_sides(tmp_path):
    datalist = load_datalist(
        write_list(tmp_path / "l.json", label_map={"1": "liver", "2": "kidney@split", "3": "gall"})
    )
    assert datalist.label_map.structures == ["liver", "kidney_right", "kidney_left", "gallbladder"]
    assert datalist.label_map.ids_of("lkidney") == [2]
    assert datalist.label_map.to_dict() == {"1": "liver", "2": "kidney@split", "3": "gallbladder"}
