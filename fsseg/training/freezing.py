"""Which parts of a model train: freezing block groups, and train mode for the trainable parts only."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from fsseg.models import SegmentationModel


def freeze_groups(model: SegmentationModel, groups: Sequence[str]) -> int:
    """Stop gradients in the named block groups (``encoder``, ``decoder``, ...); returns the parameters left
    to train."""
    for group in groups:
        for module in model.block_modules(group):
            module.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_trainable_parts(model: nn.Module) -> None:
    """Train mode only for modules that hold trainable parameters: frozen parts stay in eval mode (batch norm
    keeps its running statistics, dropout stays off)."""
    model.train()
    for module in model.modules():
        if not any(p.requires_grad for p in module.parameters()):
            module.eval()
