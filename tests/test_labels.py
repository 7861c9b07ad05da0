import json

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import TOTALSEG_LIST
from fsseg.data.datalist import load_datalist
from fsseg.data.labels import LabelMap, midline_x, structure_masks
from fsseg.data.transforms import LABEL, TASK_MASK, LoadVolumed, TemplateLabelsd, TemplateOneHotd, case_item
from fsseg.errors import DataError
from fsseg.templates import load_template

TEMPLATE = load_template()


def convert(item):
    loader = LoadVolumed(["image"])
    return TemplateOneHotd(len(TEMPLATE))(TemplateLabelsd(TEMPLATE, loader)(loader(item)))


def raw_counts(path, ids):
    label = np.asanyarray(nib.load(str(path)).dataobj)
    return {i: int((label == i).sum()) for i in ids}


def test_template_channels_keep_raw_voxel_counts(sample_ct):
    datalist = load_datalist(TOTALSEG_LIST)
    case = datalist.case("ts_example_ct")
    out = convert(case_item(case, datalist.label_map))
    assert out[LABEL].shape == (29, 122, 101, 112)
    counts = out[LABEL].sum(dim=(1, 2, 3))
    manifest = json.loads((sample_ct / "manifest.json").read_text())["cases"]["ts_example_ct"]["label_ids_present"]
    for name, ts_id in [
        ("liver", "5"),
        ("spleen", "1"),
        ("kidney_right", "2"),
        ("kidney_left", "3"),
        ("pancreas", "7"),
    ]:
        assert counts[TEMPLATE.channel(name)] == manifest[ts_id]["voxels"], name
    # Channels are disjoint binary masks.
    assert set(torch.unique(out[LABEL]).tolist()) == {0.0, 1.0}
    assert out[LABEL].sum(0).max() == 1
    # Task mask: the template structures the TotalSegmentator label map annotates, nothing else.
    expected = {n for n in datalist.label_map.structures if n in TEMPLATE}
    assert {TEMPLATE.structures[c] for c in torch.nonzero(out[TASK_MASK])[:, 0].tolist()} == expected
    assert out[TASK_MASK][TEMPLATE.channel("liver_tumor")] == 0


def joint_kidney_case(tmp_path, sample_ct, case_id):
    """The case's label with only spleen, liver and both kidneys, the kidneys merged into one id."""
    label_image = nib.load(str(sample_ct / "labels" / f"{case_id}.nii.gz"))
    original = np.asanyarray(label_image.dataobj)
    merged = np.zeros_like(original)
    merged[original == 1] = 1
    merged[(original == 2) | (original == 3)] = 2
    merged[original == 5] = 5
    path = tmp_path / f"{case_id}_joint.nii.gz"
    nib.save(nib.Nifti1Image(merged, label_image.affine, label_image.header), str(path))
    item = {
        "id": case_id,
        "image": str(sample_ct / "images" / f"{case_id}.nii.gz"),
        LABEL: str(path),
        "label_map": {"1": "spleen", "2": "kidney@split", "5": "liver"},
    }
    return item, original


@pytest.mark.parametrize("case_id", ["ts_example_ct", "lidc_0001_abd_1p4mm"])  # RAS and LAS grids
def test_joint_kidney_label_is_split_at_the_midline(tmp_path, sample_ct, case_id):
    item, original = joint_kidney_case(tmp_path, sample_ct, case_id)
    out = convert(item)
    right = out[LABEL][TEMPLATE.channel("kidney_right")].numpy().astype(bool)
    left = out[LABEL][TEMPLATE.channel("kidney_left")].numpy().astype(bool)
    assert np.array_equal(right, original == 2)
    assert np.array_equal(left, original == 3)
    assert out[TASK_MASK][TEMPLATE.channel("kidney_left")] == 1
    assert out[TASK_MASK][TEMPLATE.channel("stomach")] == 0


def test_midline_follows_the_body_not_the_field_of_view():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = np.full((40, 10, 10), -1000.0)
    image[20:36] = 40.0  # the patient lies off-centre, at x = 40..70 mm
    assert midline_x(affine, image.shape, image) == pytest.approx(55.0, abs=2.0)
    assert midline_x(affine, image.shape) == pytest.approx(39.0)


def test_unknown_label_ids_are_reported_with_the_file(tmp_path, sample_ct):
    datalist = load_datalist(TOTALSEG_LIST)
    item = case_item(datalist.case("ts_example_ct_sm"), LabelMap.parse({"5": "liver"}))
    item["label_map"] = {"5": "liver"}
    with pytest.raises(DataError, match=r"ts_example_ct_sm.nii.gz: label id\(s\) 1, 2, 3"):
        convert(item)


def test_per_structure_masks_give_the_same_channels(tmp_path, sample_ct):
    label_image = nib.load(str(sample_ct / "labels" / "ts_example_ct_sm.nii.gz"))
    label = np.asanyarray(label_image.dataobj)
    labels = {}
    for name, ts_id in [("liver", 5), ("spleen", 1), ("heart", 51)]:  # heart lies outside the template
        path = tmp_path / "segmentations" / f"{name}.nii.gz"
        path.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image((label == ts_id).astype(np.uint8), label_image.affine), str(path))
        labels[name] = str(path)
    out = convert({"id": "sm", "image": str(sample_ct / "images" / "ts_example_ct_sm.nii.gz"), "labels": labels})
    assert out[LABEL][TEMPLATE.channel("liver")].sum() == (label == 5).sum()
    assert out[LABEL][TEMPLATE.channel("spleen")].sum() == (label == 1).sum()
    assert out[TASK_MASK].sum() == 2


def test_structure_masks_keep_names_outside_the_template():
    label = np.zeros((4, 4, 4), dtype=np.uint8)
    label[0, 0, 0] = 7
    masks = structure_masks(label, LabelMap.parse({"7": "heart_atrium_left"}), np.eye(4))
    assert list(masks) == ["heart_atrium_left"] and masks["heart_atrium_left"].sum() == 1


def test_label_on_another_grid_is_rejected(tmp_path, sample_ct):
    image_path = sample_ct / "images" / "ts_example_ct_sm.nii.gz"
    reference = nib.load(str(image_path))
    shifted = reference.affine.copy()
    shifted[0, 3] += 5.0
    label = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(reference.shape, np.uint8), shifted), str(label))
    with pytest.raises(DataError, match="shifted.nii.gz: does not match its image .*affines differ by up to 5"):
        convert({"id": "x", "image": str(image_path), LABEL: str(label), "label_map": {"1": "liver"}})
