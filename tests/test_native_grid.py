"""The label map on the scan's grid comes from the model-grid winners, interpolating only at the structures'
borders (fsseg.inference.native_grid): it must give the masks that resampling each structure's probabilities
(``Invertd``) and thresholding gives, on every geometry the preprocessing handles. More structures than feature
channels: the features are blended over windows and the 1x1x1 head applied voxel by voxel, with the masks of
sliding the whole network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_predict import rotation

from conftest import ct_like, write_nifti
from fsseg.data.scans import load_scan_image
from fsseg.data.transforms import IMAGE
from fsseg.inference.predictor import FrozenBackbone, InferenceSettings, Predictor, prediction_network
from fsseg.models import create_model
from fsseg.preprocessing import Preprocessing
from fsseg.templates import load_template


def organs(grid: tuple[int, ...], count: int, seed: int = 0) -> torch.Tensor:
    """``count`` overlapping ellipsoids with smooth borders (logit 6 (1 - r)), as float16 probabilities; the first
    reaches the grid's corner, where the crop and the padding lie."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.arange(n) for n in grid], indexing="ij")
    probabilities = torch.empty((count, *grid), dtype=torch.float16)
    for k in range(count):
        centre = np.zeros(3) if k == 0 else rng.uniform(0.2, 0.8, 3) * grid
        radii = rng.uniform(0.15, 0.4, 3) * grid
        r = np.sqrt(sum(((a - c) / s) ** 2 for a, c, s in zip(axes, centre, radii)))
        probabilities[k] = torch.sigmoid(torch.from_numpy(6 * (1 - r)))
    return probabilities


def affine(linear: np.ndarray) -> np.ndarray:
    result = np.eye(4)
    result[:3, :3] = linear
    return result


GEOMETRIES = {
    "oblique": (
        affine(rotation(20) @ np.diag([1.3, 1.1, 2.5])),
        Preprocessing(spacing=(2.0, 2.0, 2.0), roi=(32, 32, 32)),
    ),
    "lps, cropped and padded": (
        affine(np.diag([-1.6, -1.6, 3.0])),
        Preprocessing(spacing=(2.5, 2.5, 2.5), roi=(48, 48, 48)),
    ),
    "finer than the scan, uncropped": (
        affine(np.diag([3.0, 3.0, 4.0])),
        Preprocessing(spacing=(1.5, 2.0, 2.5), roi=(32, 32, 32), crop_foreground=False),
    ),
    # the scan's edge voxels lie beyond the model grid's: they take its edge value
    "coarser than the scan, uncropped": (
        affine(np.diag([1.0, 1.0, 1.2])),
        Preprocessing(spacing=(3.0, 3.0, 3.0), roi=(8, 8, 8), crop_foreground=False),
    ),
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_the_label_map_matches_resampling_each_structure_and_thresholding(tmp_path, geometry):
    affine, pre = GEOMETRIES[geometry]
    image = ct_like((48, 40, 24))
    image[:6] = -1000  # air on one side: the foreground crop cuts there
    path = write_nifti(tmp_path / "scan.nii.gz", image, affine)
    predictor = Predictor(lambda x: x, [f"s{k}" for k in range(6)], pre, torch.device("cpu"))
    data = predictor.preprocess(path)
    probabilities = organs(tuple(data[IMAGE].shape[1:]), 6)
    reference = load_scan_image(path)
    each = predictor.finish(data, probabilities, reference, keep_probabilities=True).label
    direct = predictor.finish(data, probabilities, reference).label
    assert direct.shape == each.shape == image.shape
    assert (direct != each).sum() <= 2, (direct != each).sum()  # float rounding of MONAI's resampling at most
    assert len(np.unique(each)) >= 5  # the structures overlap and each is somewhere


def test_more_structures_than_feature_channels_blend_the_features_with_the_same_masks(tmp_path):
    image = ct_like((64, 56, 40))
    image[20:44, 16:40, 10:30] = 160  # a bright organ
    path = write_nifti(tmp_path / "scan.nii.gz", image, np.diag([2.0, 2.0, 3.0, 1.0]))
    template, pre = load_template(), Preprocessing(spacing=(3.0, 3.0, 3.0), roi=(32, 32, 32))
    torch.manual_seed(0)
    model = create_model("unet_tiny", num_classes=len(template))
    with torch.no_grad():  # masks of many voxels, overlapping, most of them far from the threshold
        model.head.weight.mul_(3.0)
        model.head.bias.normal_(0.0, 1.0)
    model.eval()
    channels = list(range(12))  # more than the tiny UNet's 8 feature channels
    network = prediction_network([model], channels, adapted=False)
    assert isinstance(network, FrozenBackbone) and network.pointwise is not None
    names = [template.structures[c] for c in channels]
    blended = Predictor(network, names, pre, torch.device("cpu"), InferenceSettings(overlap=0.5))(path).label
    sliding = Predictor(
        lambda x: model(x)[:, channels], names, pre, torch.device("cpu"), InferenceSettings(overlap=0.5)
    )(path).label
    assert len(np.unique(sliding)) > 6 and (blended != sliding).mean() < 1e-3, (blended != sliding).mean()
