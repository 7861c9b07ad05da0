"""The Models-Genesis-style 3D U-Net used as a backbone by SuPreM and the CLIP-Driven Universal Model.

Written from the architecture's description (Zhou et al., Models Genesis; SuPreM's ``unet.py``): four
down transitions of two 3x3x3 conv + batch-norm + ReLU units (32->64, 64->128, 128->256, 256->512 channels,
max-pooling between), three up transitions (transposed conv, concatenation with the skip, two units) back to
64 channels at full resolution. Submodule names follow the published weights (``down_tr64.ops.0.conv1``, ...)
so they load by name. Batch-norm uses its running statistics in eval mode (the reference code's always-batch-
statistics normalisation made predictions depend on the sliding-window batch).
"""

from __future__ import annotations

import torch
from torch import nn


class ConvUnit(nn.Module):
    """3x3x3 convolution, batch-norm, ReLU (``LUConv``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm3d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn1(self.conv1(x)))


class DownTransition(nn.Module):
    """Two units at depth d (32·2^d then 64·2^d channels); returns (pooled output, pre-pool skip)."""

    def __init__(self, in_channels: int, depth: int, pool: bool = True) -> None:
        super().__init__()
        width = 32 * 2**depth
        self.ops = nn.Sequential(ConvUnit(in_channels, width), ConvUnit(width, 2 * width))
        self.pool = nn.MaxPool3d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.ops(x)
        return self.pool(skip), skip


class UpTransition(nn.Module):
    """Transposed-conv upsampling, concatenation with the skip, two units of 64·2^d channels."""

    def __init__(self, in_channels: int, depth: int) -> None:
        super().__init__()
        width = 64 * 2**depth
        self.up_conv = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        # The skip carries half the input's channels.
        self.ops = nn.Sequential(ConvUnit(in_channels + in_channels // 2, width), ConvUnit(width, width))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat([self.up_conv(x), skip], dim=1))


class UNet3D(nn.Module):
    """(B, 1, X, Y, Z) -> (B, 64, X, Y, Z) features; sizes must be divisible by 8."""

    def __init__(self) -> None:
        super().__init__()
        self.down_tr64 = DownTransition(1, 0)
        self.down_tr128 = DownTransition(64, 1)
        self.down_tr256 = DownTransition(128, 2)
        self.down_tr512 = DownTransition(256, 3, pool=False)
        self.up_tr256 = UpTransition(512, 2)
        self.up_tr128 = UpTransition(256, 1)
        self.up_tr64 = UpTransition(128, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out64, skip64 = self.down_tr64(x)
        out128, skip128 = self.down_tr128(out64)
        out256, skip256 = self.down_tr256(out128)
        out512, _ = self.down_tr512(out256)
        up256 = self.up_tr256(out512, skip256)
        up128 = self.up_tr128(up256, skip128)
        return self.up_tr64(up128, skip64)
