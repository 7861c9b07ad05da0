"""The model contract every stage relies on: ``features`` (θ_f) then ``head`` (θ_c)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fsseg.errors import ConfigError

# Names of the parameter groups every registered model provides.
# ``bottleneck``: the encoder's blocks between its first stage and the decoder (for SwinUNETR the convolution
# blocks beside the Swin transformer, what the reference's --bottleneck acts on); a part of ``encoder``.
BLOCK_GROUPS = ("encoder", "decoder", "last_decoder_block", "bottleneck", "head")
# A structure fills a small share of a CT: a new head starts at this foreground probability, so training
# does not spend its first hundreds of steps pulling every logit down (RetinaNet's prior initialisation).
HEAD_PRIOR_PROBABILITY = 0.01


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1x1 convolution of (B, C, X, Y, Z) ``x`` with ``weight`` (out, C) as a matrix product over channels."""
    return F.linear(x.movedim(1, -1), weight, bias).movedim(-1, 1)


class PointwiseConv3d(nn.Conv3d):
    """A 1x1x1 convolution computed as a matrix product over channels.

    Same parameters and state-dict layout as ``nn.Conv3d(in, out, 1)``; on CPUs PyTorch's generic 3D
    convolution path is several times slower for this shape, and heads run on every voxel of every crop.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_conv(x, self.weight.view(self.out_channels, self.in_channels), self.bias)


def new_head(feature_channels: int, num_classes: int) -> nn.Conv3d:
    """A 1x1x1 convolution head whose sigmoid starts near :data:`HEAD_PRIOR_PROBABILITY` everywhere."""
    head = PointwiseConv3d(feature_channels, num_classes)
    assert head.bias is not None  # a PointwiseConv3d always has one
    nn.init.constant_(head.bias, math.log(HEAD_PRIOR_PROBABILITY / (1 - HEAD_PRIOR_PROBABILITY)))
    return head


class SegmentationModel(nn.Module):
    """A 3D segmentation network split into a feature extractor and a per-structure sigmoid head.

    Args:
        backbone: encoder + decoder returning the last full-resolution decoder features (B, F, X, Y, Z).
        feature_channels: F.
        num_classes: one output channel (logit) per template structure.
        blocks: for each of ``encoder``, ``decoder``, ``last_decoder_block``, the backbone submodule names in it
            (dotted paths, like ``net.decoder.stages``, for blocks nested inside the backbone).
        arch: ``{"name": ..., "kwargs": ...}``, enough to rebuild the model from a checkpoint.

    ``model.features(x)`` and ``model.head(f)`` are public: adaptation trains new heads and adapters on them.
    ``head_trained`` is False for a backbone imported without its head: its rows are initialisation, not a model;
    ``decoder_trained`` is False for an encoder imported alone.
    """

    head: nn.Conv3d
    feature_channels: int
    num_classes: int
    arch: dict
    head_trained: bool
    decoder_trained: bool

    def __init__(
        self,
        backbone: nn.Module,
        feature_channels: int,
        num_classes: int,
        blocks: Mapping[str, Sequence[str]],
        arch: dict,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = new_head(feature_channels, num_classes)
        self.feature_channels = feature_channels
        self.num_classes = num_classes
        self.blocks = {group: tuple(names) for group, names in blocks.items()}
        self.arch = arch
        self.head_trained = True
        self.decoder_trained = True
        for module in backbone.modules():
            # MONAI's Swin attention through torch's fused kernel when no gradient is taken (inference, feature
            # extraction): the same values (to 1e-6 here) 1.2x faster on the CPU; training keeps the plain path.
            if hasattr(module, "use_flash_attention"):
                setattr(module, "use_flash_attention", True)  # noqa: B010 (not declared by torch's Module type)
        for group in BLOCK_GROUPS[:-1]:
            for name in self.blocks.get(group, ()):
                try:
                    backbone.get_submodule(name)
                except AttributeError:
                    raise ConfigError(
                        f"model '{arch.get('name')}': block '{name}' of group '{group}' does not exist"
                    ) from None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) image -> (B, F, X, Y, Z) decoder features."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) image -> (B, C, X, Y, Z) logits (apply a sigmoid per channel)."""
        return self.head(self.features(x))

    def block_modules(self, group: str) -> list[nn.Module]:
        """The modules of a named group (``encoder``, ``decoder``, ``last_decoder_block``, ``head``)."""
        if group == "head":
            return [self.head]
        if group not in self.blocks:
            raise ConfigError(f"unknown block group '{group}'; expected one of {', '.join(BLOCK_GROUPS)}")
        return [self.backbone.get_submodule(name) for name in self.blocks[group]]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per block group this model has; ``last_decoder_block`` is a part of ``decoder``,
        ``bottleneck`` of ``encoder``."""
        return {
            group: [p for m in self.block_modules(group) for p in m.parameters()]
            for group in BLOCK_GROUPS
            if group == "head" or group in self.blocks
        }

    def named_block_parameters(self, group: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(full parameter name, parameter) pairs of one group, as named in ``state_dict``."""
        blocks = (
            [("head", self.head)]
            if group == "head"
            else [(f"backbone.{name}", module) for name, module in zip(self.blocks[group], self.block_modules(group))]
        )
        for prefix, module in blocks:
            for name, parameter in module.named_parameters():
                yield f"{prefix}.{name}", parameter
