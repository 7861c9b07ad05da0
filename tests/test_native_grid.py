"""The label map on the scan's grid comes from the model-grid winners, interpolating only at the structures'
borders (fsseg.inference.native_grid): it must give the masks that resampling each structure's probabilities
(``Invertd``) and thresholding gives, on every geometry the preprocessing handles; many structures are blended in
float16 without changing the masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fsseg.inference.predictor as predictor_module
from conftest import ct_like, write_nifti
from fsseg.checkpoint import load_model
from fsseg.data.io import load_scan_image
from fsseg.data.transforms import IMAGE, Preprocessing
from fsseg.inference.predictor import InferenceSettings, Predictor
from test_predict import oracle_checkpoint, rotation


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
    "oblique": (affine(rotation(20) @ np.diag([1.3, 1.1, 2.5])),
                Preprocessing(spacing=(2.0, 2.0, 2.0), roi=(32, 32, 32))),
    "lps, cropped and padded": (affine(np.diag([-1.6, -1.6, 3.0])),
                                Preprocessing(spacing=(2.5, 2.5, 2.5), roi=(48, 48, 48))),
    "finer than the scan, uncropped": (affine(np.diag([3.0, 3.0, 4.0])),
                                       Preprocessing(spacing=(1.5, 2.0, 2.5), roi=(32, 32, 32), crop_foreground=False)),
    # the scan's edge voxels lie beyond the model grid's: they take its edge value
    "coarser than the scan, uncropped": (affine(np.diag([1.0, 1.0, 1.2])),
                                         Preprocessing(spacing=(3.0, 3.0, 3.0), roi=(8, 8, 8), crop_foreground=False)),
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


def test_many_structures_blend_in_float16_from_float32_windows_with_the_same_masks(tmp_path, monkeypatch):
    image = ct_like((64, 56, 40))
    axes = np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij")
    image[sum(((a - c) / r) ** 2 for a, c, r in zip(axes, (30, 26, 20), (14, 10, 9))) < 1] = 160  # a bright organ
    path = write_nifti(tmp_path / "scan.nii.gz", image, np.diag([2.0, 2.0, 3.0, 1.0]))
    pre = Preprocessing(spacing=(3.0, 3.0, 3.0), roi=(32, 32, 32))
    network, template, _, _ = load_model(oracle_checkpoint(tmp_path / "oracle.pt", pre))
    liver = template.channel("liver")
    seen: list[torch.dtype] = []

    def liver_only(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.dtype)
        return network(x)[:, [liver]]

    predictor = Predictor(liver_only, ["liver"], pre, torch.device("cpu"), InferenceSettings(overlap=0.5))
    blended_in_float32 = predictor(path).label
    monkeypatch.setattr(predictor_module, "STITCH_FLOAT32_MAX_BYTES", 0)
    seen.clear()
    blended_in_float16 = predictor(path).label
    assert seen and set(seen) == {torch.float32}
    assert blended_in_float32.sum() > 1000 and (blended_in_float16 != blended_in_float32).mean() < 1e-4
