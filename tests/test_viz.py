"""Pictures follow one convention: radiological orientation, ground truth green, prediction red."""

import numpy as np
import pytest

from conftest import ct_like
from fsseg.viz import PREDICTION_COLOURS, TRUTH_COLOURS, overlay_png

pytest.importorskip("matplotlib")


def pixels_of(picture: np.ndarray, colour: str) -> np.ndarray:
    """(row, column) of the pixels drawn in ``colour`` (a '#rrggbb' string)."""
    rgb = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return np.argwhere(np.abs(picture[..., :3] - rgb).max(-1) < 0.08)


def test_a_structure_on_the_patients_right_is_drawn_on_the_viewers_left_in_the_truth_and_prediction_colours(tmp_path):
    from matplotlib.image import imread

    image = ct_like((40, 40, 20)).astype(np.float32)
    right = np.zeros(image.shape, bool)
    right[28:36, 16:24, 8:12] = True  # identity affine: RAS, so high x is the patient's right
    left = np.zeros(image.shape, bool)
    left[4:12, 16:24, 8:12] = True
    path = overlay_png(tmp_path / "p.png", image, np.eye(4), {"liver": right}, "t", truth={"spleen": left})
    picture = imread(str(path))
    axial = picture[:, : picture.shape[1] // 3]  # the first of the three panels
    predicted, truth = pixels_of(axial, PREDICTION_COLOURS[0]), pixels_of(axial, TRUTH_COLOURS[0])
    assert len(predicted) and len(truth)
    # the legend's short lines sit below the slices: count only the panel's slice area
    predicted, truth = predicted[predicted[:, 0] < 0.8 * axial.shape[0]], truth[truth[:, 0] < 0.8 * axial.shape[0]]
    assert predicted[:, 1].mean() < axial.shape[1] / 2 < truth[:, 1].mean()
