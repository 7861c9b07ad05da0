import math

import numpy as np
import pytest
from scipy import ndimage

from fsseg.metrics import score_structure, summarise


def box(shape, lo, hi):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def reference_nsd(pred, gt, spacing, tolerance):
    """NSD from first principles: surface voxels (6-connected border) within ``tolerance`` mm of the other surface."""

    def surface(mask):
        return mask & ~ndimage.binary_erosion(mask)

    sp, sg = surface(pred), surface(gt)
    to_gt = ndimage.distance_transform_edt(~sg, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    close = (to_gt[sp] <= tolerance).sum() + (to_pred[sg] <= tolerance).sum()
    return close / (sp.sum() + sg.sum())


def test_dice_by_hand():
    gt = box((20, 20, 20), (5, 5, 5), (15, 15, 15))  # 1000 voxels
    pred = box((20, 20, 20), (6, 5, 5), (15, 15, 15))  # 900, all inside
    assert score_structure(pred, gt, (1, 1, 1)).dice == pytest.approx(2 * 900 / 1900)


def test_hd95_and_nsd_use_the_anisotropic_spacing():
    gt = box((30, 30, 30), (10, 10, 10), (20, 20, 20))
    # The prediction is the box shifted by one voxel along axis 2, where voxels are 3 mm.
    pred = box((30, 30, 30), (10, 10, 11), (20, 20, 21))
    score = score_structure(pred, gt, (1.0, 1.0, 3.0), tolerance_mm=2.0)
    assert score.hd95 == pytest.approx(3.0)
    assert score.nsd == pytest.approx(reference_nsd(pred, gt, (1.0, 1.0, 3.0), 2.0))
    assert 0.5 < score.nsd < 1.0  # the faces normal to axis 2 moved 3 mm, beyond the 2 mm tolerance
    same_shift_fine = score_structure(pred, gt, (1.0, 1.0, 1.0), tolerance_mm=2.0)
    assert same_shift_fine.hd95 == pytest.approx(1.0) and same_shift_fine.nsd == pytest.approx(1.0)
    assert score_structure(gt, gt, (1.0, 1.0, 3.0)).nsd == pytest.approx(1.0)


def test_empty_cases_follow_the_policy():
    empty = np.zeros((8, 8, 8), bool)
    full = box((8, 8, 8), (2, 2, 2), (5, 5, 5))
    both = score_structure(empty, empty, (1, 1, 1))
    assert (both.dice, both.nsd, both.hd95, both.kind) == (1.0, 1.0, 0.0, "both_empty")
    fp = score_structure(full, empty, (1, 1, 1))
    assert fp.dice == 0.0 and math.isnan(fp.hd95) and fp.kind == "empty_gt"
    fn = score_structure(empty, full, (1, 1, 1))
    assert fn.dice == 0.0 and fn.nsd == 0.0 and fn.kind == "empty_pred"
    summary = summarise([both, fp, fn, score_structure(full, full, (1, 1, 1))])
    assert summary["dice"]["mean"] == pytest.approx(0.5)
    assert summary["hd95"]["n"] == 2  # NaN skipped
    assert summary["count_empty_gt"] == 1 and summary["count_empty_pred"] == 1 and summary["count_both_empty"] == 1


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differs"):
        score_structure(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1))
