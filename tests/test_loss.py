import pytest
import torch
from monai.losses import DiceLoss

from fsseg.errors import DataError
from fsseg.losses import PartialLabelLoss


def batch(seed=0, shape=(2, 3, 8, 8, 8)):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator, requires_grad=True)
    target = (torch.rand(shape, generator=generator) > 0.6).float()
    return logits, target


def test_unannotated_channels_get_exactly_zero_gradient():
    logits, target = batch()
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    PartialLabelLoss()(logits, target, mask).total.backward()
    grad = logits.grad.abs().sum(dim=(2, 3, 4))
    assert torch.all(grad[mask == 0] == 0)
    assert torch.all(grad[mask == 1] > 0)


def test_value_is_the_mean_over_annotated_channels_per_sample():
    logits, target = batch()
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=1.0, smooth_dr=1.0)(logits, target).flatten(2).mean(2)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(2).mean(2)
    per = dice + bce
    expected = ((per[0, 0] + per[0, 2]) / 2 + per[1, 2]) / 2
    assert torch.isclose(PartialLabelLoss()(logits, target, mask).total, expected)
    # Changing an unannotated channel's prediction changes nothing.
    changed = logits.detach().clone()
    changed[0, 1] = 50.0
    assert torch.isclose(PartialLabelLoss()(changed, target, mask).total, expected)


def test_dice_only_reproduces_fseft_and_samples_without_annotation_are_skipped():
    logits, target = batch()
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=1.0, smooth_dr=1.0)(logits, target).flatten(2).mean(2)
    result = PartialLabelLoss(dice_weight=1.0, bce_weight=0.0)(logits, target, mask)
    assert torch.isclose(result.total, dice[0].mean())
    assert result.annotated.tolist() == [True, True, True]


def test_a_batch_without_any_annotation_is_an_error():
    logits, target = batch()
    with pytest.raises(DataError, match="no annotated structure"):
        PartialLabelLoss()(logits, target, torch.zeros(2, 3))


def test_bad_arguments():
    with pytest.raises(ValueError):
        PartialLabelLoss(dice_weight=0.0, bce_weight=0.0)
    logits, target = batch()
    with pytest.raises(ValueError, match="shapes differ"):
        PartialLabelLoss()(logits, target[:, :2], torch.ones(2, 3))
