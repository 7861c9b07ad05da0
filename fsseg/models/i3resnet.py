"""Merlin's CT image encoder, the I3ResNet-152, with a U-Net decoder over its skip features.

The encoder is a ResNet-152 inflated to 3D (I3D, Carreira & Zisserman 2017) as Merlin (Blankemeier et al.,
2024) uses it: the scan is read with its superior-inferior axis first, (B, 1, X, Y, Z) -> (B, 3, Z, X, Y) with
the one channel repeated three times; a (3, 7, 7) stem of stride (1, 2, 2), a 3^3 max-pool of stride 2 and
bottleneck stages [3, 8, 36, 3] whose 3^3 convolutions carry the strides. Its output is 2048 channels at
stride 16 in z and 32 in-plane. MONAI's ResNet builds exactly this network; its submodules (``conv1``, ``bn1``,
``layer1.0.conv1``, ..., ``layer4.2.bn3``) are kept as children of the backbone under the same names, so
Merlin's image-encoder keys load by name after their prefix.

Merlin ships no decoder. The one here is written for fsseg: each skip (the image, the stem, stages 1-4) is
projected to the decoder's width and joined by MONAI's U-Net up-blocks (transposed convolution, concatenation,
two 3^3 convolutions with instance norm), back to full resolution; the heads read its last block's features.
Batch norm in the encoder uses its running statistics whenever the encoder is frozen (eval mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, UnetResBlock, UnetUpBlock
from monai.networks.nets import ResNet
from torch import nn

ENCODER_MODULES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
# Up-sampling factor of each decoder step in the encoder's (Z, X, Y) order, from stage 4 back to the image.
UPSAMPLING = ((2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))
NORM = "instance"
# Stride of each skip of :meth:`I3ResNetUNet.encode` in (X, Y, Z).
STRIDES = ((1, 1, 1), (2, 2, 1), (4, 4, 2), (8, 8, 4), (16, 16, 8), (32, 32, 16))


class I3ResNetUNet(nn.Module):
    """(B, 1, X, Y, Z) -> (B, F, X, Y, Z) features, F = ``decoder_channels[-1]``; X and Y must be multiples of 32
    and Z of 16. :meth:`encode` and :meth:`decode` split it where the pretrained part ends, so that frozen
    encoder features can be computed once and the decoder trained on them.

    Args:
        layers: bottleneck blocks per stage (Merlin: 3, 8, 36, 3).
        widths: bottleneck widths per stage (ResNet: 64, 128, 256, 512; each stage outputs 4x its width).
        decoder_channels: the decoder's width at strides 16, 8, 4, 2 and 1 (in-plane).
    """

    # ResNet's modules, added by name from MONAI's network
    conv1: nn.Module
    bn1: nn.Module
    act: nn.Module
    maxpool: nn.Module
    layer1: nn.Module
    layer2: nn.Module
    layer3: nn.Module
    layer4: nn.Module

    def __init__(
        self,
        layers: Sequence[int] = (3, 8, 36, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 32),
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4 or len(decoder_channels) != 5:
            raise TypeError("layers and widths need 4 entries (one per stage), decoder_channels 5")
        resnet = ResNet(
            "bottleneck",
            list(layers),
            list(widths),
            spatial_dims=3,
            n_input_channels=3,
            conv1_t_size=(3, 7, 7),  # type: ignore[arg-type]  # MONAI takes a size per axis, its hint says one
            conv1_t_stride=(1, 2, 2),  # type: ignore[arg-type]
            shortcut_type="B",
            bias_downsample=False,
            feed_forward=False,
        )
        for name in ENCODER_MODULES:
            self.add_module(name, getattr(resnet, name))
        self.act, self.maxpool = resnet.act, resnet.maxpool
        self.strides = STRIDES
        # Channels of the skips at strides 1 (the image), 2 (stem), 4, 8, 16 and of stage 4's output.
        skips = [1, widths[0], *(4 * w for w in widths)]
        self.skip0 = UnetResBlock(3, skips[0], decoder_channels[4], kernel_size=3, stride=1, norm_name=NORM)
        for level in range(1, 5):
            self.add_module(
                f"skip{level}",
                Convolution(3, skips[level], decoder_channels[4 - level], kernel_size=1, norm=NORM, act="leakyrelu"),
            )
        below = skips[5]
        for step, (channels, factor) in enumerate(zip(decoder_channels, UPSAMPLING)):
            self.add_module(
                f"decoder{4 - step}",
                UnetUpBlock(3, below, channels, kernel_size=3, stride=1, upsample_kernel_size=factor, norm_name=NORM),
            )
            below = channels

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The skips: the image, the stem's output and each stage's, (B, C, X/s, Y/s, Z/s) for the strides of
        :attr:`STRIDES`."""
        x = image.permute(0, 1, 4, 2, 3)
        x = self.act(self.bn1(self.conv1(x.expand(-1, 3, -1, -1, -1))))
        skips = [image, x.permute(0, 1, 3, 4, 2)]
        x = self.maxpool(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            skips.append(x.permute(0, 1, 3, 4, 2))
        return skips

    def decode(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """The decoder's features (B, F, X, Y, Z) from the skips of :meth:`encode` (or crops of them)."""
        skips = [skip.permute(0, 1, 4, 2, 3) for skip in skips]
        x = skips[5]
        for level in range(4, -1, -1):
            x = getattr(self, f"decoder{level}")(x, getattr(self, f"skip{level}")(skips[level]))
        return x.permute(0, 1, 3, 4, 2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(image))
