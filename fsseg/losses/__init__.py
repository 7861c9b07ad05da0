"""Losses: the partial-label segmentation loss of pretraining and adaptation."""

from fsseg.losses.partial import PartialLabelLoss

__all__ = ["PartialLabelLoss"]
