"""The spatial adapter: a residual convolution block on frozen decoder features."""

from __future__ import annotations

import torch
from torch import nn


class SpatialAdapter(nn.Module):
    """``f + conv_k(relu(conv_k(f)))`` with F -> F channels, no bias, the second convolution zero-initialised.

    At initialisation the adapter is the identity, so training starts from the linear-probe (or zero-shot)
    model. ``kernel_size=1`` gives the CLIP-Adapter-like variant.
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.down = nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.up = nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.up(torch.relu(self.down(features)))
