"""Partial-label loss: supervise only the structures each sample's dataset annotates.

For sample n with task mask w_n (1 where its dataset annotates structure k):

    L_n = (1 / Σ_k w_nk) Σ_k w_nk L_SEG(Y_nk, Ŷ_nk),   L_SEG = a · soft Dice + b · BCE   (per channel)

and the batch loss is the mean of L_n over samples with at least one annotated structure. An unannotated
channel contributes exactly zero loss and zero gradient. ``bce_weight=0`` reproduces FSEFT's Dice-only loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from fsseg.errors import DataError


@dataclass(frozen=True)
class LossOutput:
    """The scalar to back-propagate and, for logging, the mean loss per channel over annotated samples."""

    total: torch.Tensor
    per_channel: torch.Tensor
    annotated: torch.Tensor


class PartialLabelLoss(nn.Module):
    """Task-masked Dice + BCE over sigmoid channels.

    Args:
        dice_weight: weight a of the soft Dice term.
        bce_weight: weight b of the binary cross-entropy term.
        smooth: added to the Dice numerator and denominator (FSEFT uses 1).
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, smooth: float = 1.0) -> None:
        super().__init__()
        if dice_weight < 0 or bce_weight < 0 or dice_weight + bce_weight == 0:
            raise ValueError("dice_weight and bce_weight must be non-negative and not both zero")
        self.dice_weight, self.bce_weight = dice_weight, bce_weight
        self.dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=smooth, smooth_dr=smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, task_mask: torch.Tensor) -> LossOutput:
        """
        Args:
            logits: (B, C, X, Y, Z) raw outputs.
            target: (B, C, X, Y, Z) binary masks.
            task_mask: (B, C), 1 for annotated structures.

        Raises:
            DataError: no sample of the batch annotates any structure.
        """
        if logits.shape != target.shape or task_mask.shape != logits.shape[:2]:
            raise ValueError(
                f"shapes differ: logits {tuple(logits.shape)}, target {tuple(target.shape)}, "
                f"task_mask {tuple(task_mask.shape)}"
            )
        logits, target, weight = logits.float(), target.float(), task_mask.float()
        per_channel = logits.new_zeros(logits.shape[:2])
        if self.dice_weight:
            per_channel = per_channel + self.dice_weight * self.dice(logits, target).flatten(2).mean(2)
        if self.bce_weight:
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            per_channel = per_channel + self.bce_weight * bce.flatten(2).mean(2)
        annotated = weight.sum(1)
        supervised = annotated > 0
        if not supervised.any():
            raise DataError(
                "a training batch has no annotated structure: check the data lists' label maps "
                "against the model's template"
            )
        per_sample = (per_channel * weight).sum(1)[supervised] / annotated[supervised]
        channel_count = weight.sum(0)
        channel_mean = (per_channel.detach() * weight).sum(0) / channel_count.clamp(min=1)
        return LossOutput(total=per_sample.mean(), per_channel=channel_mean, annotated=channel_count > 0)
