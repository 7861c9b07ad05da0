import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Invertd
from scipy import ndimage

from conftest import LITS_LIST, TOTALSEG_LIST
from fsseg.cache import cached_dataset
from fsseg.data.datalist import load_datalist
from fsseg.data.transforms import (
    IMAGE,
    LABEL,
    TASK_MASK,
    Augmentation,
    case_item,
    inference_transforms,
    train_transforms,
)
from fsseg.errors import ConfigError
from fsseg.preprocessing import Preprocessing
from fsseg.templates import load_template

TEMPLATE = load_template()
CUBE = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity: diagonal neighbours count as one voxel away


def raw_item(case):
    return {"id": case.id, IMAGE: str(case.image), LABEL: str(case.label)}


@pytest.mark.parametrize("case_id", ["ts_example_dicom", "lidc_0001_abd_1p4mm"])  # LAS on disk
def test_inference_pipeline_reorients_resamples_and_windows(sample_ct, case_id):
    case = load_datalist(TOTALSEG_LIST).case(case_id)
    pre = Preprocessing(roi=(32, 32, 32))
    out = inference_transforms(pre, keys=(IMAGE, LABEL))(raw_item(case))
    image, label = out[IMAGE], out[LABEL]
    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    assert np.allclose(np.abs(np.diag(image.affine.numpy())[:3]), 1.5)
    assert image.min() >= 0.0 and image.max() <= 1.0 and image.max() == 1.0
    assert image.shape == label.shape
    # The liver (TotalSegmentator id 5) ends up on the patient's right: larger RAS x than the spleen (id 1).
    liver_x = torch.nonzero(label[0] == 5).float()[:, 0].mean()
    spleen_x = torch.nonzero(label[0] == 1).float()[:, 0].mean()
    assert liver_x > spleen_x


def test_hu_window_maps_linearly_and_clips(sample_ct):
    case = load_datalist(TOTALSEG_LIST).case("ts_example_ct_sm")
    pre = Preprocessing(spacing=(3.0, 3.0, 3.0), hu_window=(-100.0, 300.0), crop_foreground=False, roi=(8, 8, 8))
    out = inference_transforms(pre)({IMAGE: str(case.image)})
    hu = np.asanyarray(nib.load(str(case.image)).dataobj).astype(np.float32)
    expected = np.clip((hu + 100.0) / 400.0, 0.0, 1.0)
    assert np.allclose(out[IMAGE][0].numpy(), expected, atol=1e-5)


def test_foreground_crop_and_pad_to_roi(sample_ct):
    case = load_datalist(TOTALSEG_LIST).case("ts_example_ct_sm")
    big_roi = Preprocessing(roi=(96, 96, 96))
    out = inference_transforms(big_roi)({IMAGE: str(case.image)})
    assert out[IMAGE].shape[1:] >= (96, 96, 96)
    # The crop removed air: much of the 1.5 mm grid of this 36.6 x 30.3 cm field of view is outside the body.
    assert out[IMAGE].shape[1] < 244


def boundary_band(label: np.ndarray) -> np.ndarray:
    """Voxels with a neighbour (26-connected) of another label value: the boundary, one voxel each side."""
    band = np.zeros(label.shape, dtype=bool)
    for value in np.unique(label):
        mask = label == value
        band |= ndimage.binary_dilation(mask, CUBE) & ~ndimage.binary_erosion(mask, CUBE)
    return band


@pytest.mark.parametrize(
    "list_path, case_id",
    [(TOTALSEG_LIST, "ts_example_ct_sm"), (TOTALSEG_LIST, "ts_example_dicom"), (LITS_LIST, "lits_117_crop128")],
)
def test_inverted_label_matches_the_original_up_to_boundaries(sample_ct, list_path, case_id):
    case = load_datalist(list_path).case(case_id)
    transform = inference_transforms(Preprocessing(), keys=(IMAGE, LABEL))
    out = transform(raw_item(case))
    inverted = Invertd(LABEL, transform=transform, orig_keys=LABEL, nearest_interp=True)(out)[LABEL][0].numpy()
    original = np.asanyarray(nib.load(str(case.label)).dataobj)
    assert inverted.shape == original.shape
    differ = inverted.round() != original
    assert not (differ & ~boundary_band(original)).any()
    assert differ.mean() < 0.05


def test_training_pipeline_gives_crops_with_template_channels(sample_ct):
    datalist = load_datalist(TOTALSEG_LIST)
    pre = Preprocessing(spacing=(3.0, 3.0, 3.0), roi=(32, 32, 32))
    samples = train_transforms(pre, TEMPLATE, Augmentation(crops_per_volume=3, pos=1, neg=0))(
        case_item(datalist.case("ts_example_ct_sm"), datalist.label_map)
    )
    assert len(samples) == 3
    for sample in samples:
        assert sample[IMAGE].shape == (1, 32, 32, 32)
        assert sample[LABEL].shape == (29, 32, 32, 32)
        assert sample[LABEL].sum() > 0  # positive crops contain an annotated structure
        assert sample[TASK_MASK].shape == (29,)


def test_cache_reuses_preprocessed_volumes_and_keys_on_content(sample_ct, tmp_path):
    datalist = load_datalist(TOTALSEG_LIST)
    items = [case_item(datalist.case("ts_example_ct_sm"), datalist.label_map)]
    pre = Preprocessing(spacing=(3.0, 3.0, 3.0), roi=(32, 32, 32))
    fingerprint = json.dumps([pre.to_dict(), TEMPLATE.to_dict()])
    cache = tmp_path / "cache"
    first = cached_dataset(items, train_transforms(pre, TEMPLATE), cache, fingerprint)[0]
    entries = sorted(cache.iterdir())
    assert len(entries) == 1
    stamp = entries[0].stat().st_mtime_ns
    second = cached_dataset(items, train_transforms(pre, TEMPLATE), cache, fingerprint)[0]
    assert sorted(cache.iterdir()) == entries and entries[0].stat().st_mtime_ns == stamp  # read, not rebuilt
    assert first[0][IMAGE].shape == second[0][IMAGE].shape
    other = Preprocessing(spacing=(2.5, 2.5, 2.5), roi=(32, 32, 32))
    cached_dataset(items, train_transforms(other, TEMPLATE), cache, json.dumps([other.to_dict()]))[0]
    assert len(list(cache.iterdir())) == 2  # new preprocessing, new key


def test_preprocessing_validates_eagerly():
    with pytest.raises(ConfigError, match="hu_window"):
        Preprocessing(hu_window=(250, -175))
    with pytest.raises(ConfigError, match="orientation"):
        Preprocessing(orientation="XYZ")
    with pytest.raises(ConfigError, match="unknown preprocessing key"):
        Preprocessing.from_dict({"spacing": [1, 1, 1], "window": [0, 1]})
    assert Preprocessing.from_dict(Preprocessing().to_dict()) == Preprocessing()
