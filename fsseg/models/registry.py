"""Model registry: ``create_model(name, num_classes, **kwargs)`` over MONAI networks.

>>> model = create_model("unet_tiny", num_classes=3)
>>> model.feature_channels, model.num_classes
(8, 3)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from monai.networks.nets import BasicUNet, SwinUNETR
from torch import nn

from fsseg.errors import ConfigError
from fsseg.models.base import SegmentationModel
from fsseg.models.i3resnet import ENCODER_MODULES, I3ResNetUNet
from fsseg.models.nnunet import NnUNetBackbone, nnunet_blocks
from fsseg.models.unet3d import UNet3D


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered backbone: factory(**kwargs) -> (backbone, feature channels)."""

    factory: Callable[..., tuple[nn.Module, int]]
    defaults: dict
    blocks: dict | Callable[[dict], dict]  # or: the model's keyword arguments -> its blocks
    description: str
    roi_multiple: int = 1  # window sizes must be multiples of the network's total down-sampling
    peft_targets: str = ""  # the layers LoRA, DoRA and IA3 adapt by default (a regex of layer names)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    factory: Callable[..., tuple[nn.Module, int]],
    defaults: dict,
    blocks: dict | Callable[[dict], dict],
    description: str,
    roi_multiple: int = 1,
    peft_targets: str = "",
) -> None:
    """Add a backbone under a lower-case ``name``; a name can be registered once. ``blocks`` maps each block group
    to submodule names, or is a function of the model's keyword arguments that does; ``peft_targets`` is a regular
    expression of the layers (linear, 3D convolution) that LoRA, DoRA and IA3 adapt unless told otherwise."""
    if name != name.lower() or name in _REGISTRY:
        raise ValueError(f"model name '{name}' must be lower case and new")
    _REGISTRY[name] = ModelSpec(factory, dict(defaults), blocks, description, roi_multiple, peft_targets)


def peft_targets(name: str) -> str:
    """The layers PEFT methods adapt in model ``name`` by default ("" when it registers none)."""
    return _REGISTRY[name].peft_targets if name in _REGISTRY else ""


def check_roi(name: str, roi: tuple[int, ...]) -> None:
    """Refuse a window size the network cannot process (not a multiple of its down-sampling).

    Raises:
        ConfigError: naming the model, the roi and the multiple it needs.
    """
    multiple = _REGISTRY[name].roi_multiple if name in _REGISTRY else 1
    if any(size % multiple for size in roi):
        raise ConfigError(
            f"preprocessing.roi {list(roi)}: model '{name}' needs window sizes that are multiples of {multiple}"
        )


def list_models() -> dict[str, str]:
    """Registered model names and their one-line descriptions."""
    return {name: spec.description for name, spec in sorted(_REGISTRY.items())}


def create_model(name: str, num_classes: int, **kwargs) -> SegmentationModel:
    """Build a registered model with ``num_classes`` sigmoid output channels.

    Raises:
        ConfigError: unknown name (the message lists the valid ones) or invalid keyword arguments.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model '{name}'; available: {', '.join(sorted(_REGISTRY))}")
    spec = _REGISTRY[name]
    arguments = {**spec.defaults, **kwargs}
    try:
        backbone, channels = spec.factory(**arguments)
    except TypeError as error:
        raise ConfigError(f"model '{name}': invalid arguments {kwargs} ({error})") from None
    blocks = spec.blocks(arguments) if callable(spec.blocks) else spec.blocks
    return SegmentationModel(backbone, channels, num_classes, blocks, {"name": name, "kwargs": arguments})


def _swinunetr(feature_size: int, **kwargs) -> tuple[nn.Module, int]:
    network = SwinUNETR(in_channels=1, out_channels=1, feature_size=feature_size, **kwargs)
    # The network's own output block is replaced by the shared head; what reaches it are decoder1's features.
    network.out = nn.Identity()  # type: ignore[assignment]
    return network, feature_size


def _basic_unet(features: list[int] | tuple[int, ...], **kwargs) -> tuple[nn.Module, int]:
    network = BasicUNet(spatial_dims=3, in_channels=1, out_channels=1, features=tuple(features), **kwargs)
    network.final_conv = nn.Identity()
    return network, int(features[-1])


def _unet3d() -> tuple[nn.Module, int]:
    return UNet3D(), 64


def _nnunet(
    network_class: str,
    arch_kwargs: dict,
    requires_import: list[str],
    input_scale: float = 1.0,
    input_shift: float = 0.0,
) -> tuple[nn.Module, int]:
    backbone = NnUNetBackbone(network_class, arch_kwargs, requires_import, input_scale, input_shift)
    return backbone, backbone.features


def _i3resnet_unet(decoder_channels: list[int], **kwargs) -> tuple[nn.Module, int]:
    return I3ResNetUNet(decoder_channels=decoder_channels, **kwargs), int(decoder_channels[-1])


_SWIN_BLOCKS = {
    "encoder": ["swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10"],
    "decoder": ["decoder5", "decoder4", "decoder3", "decoder2", "decoder1"],
    "last_decoder_block": ["decoder1"],
    "bottleneck": ["encoder1", "encoder2", "encoder3", "encoder4", "encoder10"],
}
# The reference code's LoRA placement on SwinUNETR (attention qkv and output projection), and the 3x3x3
# convolutions of BasicUNet's blocks.
_SWIN_PEFT = r"swinViT\.layers\d\.\d\.blocks\.\d+\.attn\.(qkv|proj)$"
_UNET_PEFT = r"(conv_0|down_\d|upcat_\d)\.(convs\.)?conv_\d\.conv$"
_UNET_BLOCKS = {
    "encoder": ["conv_0", "down_1", "down_2", "down_3", "down_4"],
    "decoder": ["upcat_4", "upcat_3", "upcat_2", "upcat_1"],
    "last_decoder_block": ["upcat_1"],
    "bottleneck": ["down_4"],
}

register_model(
    "unet3d",
    _unet3d,
    {},
    {
        "encoder": ["down_tr64", "down_tr128", "down_tr256", "down_tr512"],
        "decoder": ["up_tr256", "up_tr128", "up_tr64"],
        "last_decoder_block": ["up_tr64"],
        "bottleneck": ["down_tr512"],
    },
    "Models-Genesis 3D U-Net (19M parameters; the SuPreM / CLIP-Driven UNet backbone), 64 feature channels. "
    "Spatial sizes must be divisible by 8.",
    roi_multiple=8,
)
register_model(
    "i3resnet152",
    _i3resnet_unet,
    {"layers": [3, 8, 36, 3], "widths": [64, 128, 256, 512], "decoder_channels": [256, 128, 64, 32, 32]},
    {
        "encoder": list(ENCODER_MODULES),
        "decoder": [f"{kind}{level}" for level in range(4, -1, -1) for kind in ("skip", "decoder")],
        "last_decoder_block": ["decoder0"],
        "bottleneck": ["layer4"],
    },
    "Merlin's I3ResNet-152 CT encoder (117.5M parameters; its weights load with fsseg-import-checkpoint "
    "--format merlin/astra) with a U-Net decoder, 32 feature channels. X and Y must be multiples of 32, "
    "Z of 16 (sizes are checked as multiples of 32).",
    roi_multiple=32,
)
register_model(
    "i3resnet_tiny",
    _i3resnet_unet,
    {"layers": [1, 1, 1, 1], "widths": [8, 8, 16, 16], "decoder_channels": [16, 16, 8, 8, 8]},
    _REGISTRY["i3resnet152"].blocks,
    "The I3ResNet U-Net with one narrow block per stage (0.1M parameters), for tests.",
    roi_multiple=32,
)
register_model(
    "nnunet",
    _nnunet,
    {},
    lambda kwargs: nnunet_blocks(kwargs["arch_kwargs"]["n_stages"]),
    "An nnU-Net network (TotalSegmentator's and other nnU-Net v2 results) built by "
    "dynamic-network-architectures from its plans; made by fsseg-import-checkpoint --format nnunet.",
)
register_model(
    "swinunetr",
    _swinunetr,
    {"feature_size": 48},
    _SWIN_BLOCKS,
    "MONAI SwinUNETR, feature_size 48 (62M parameters; the FSEFT/CLIP-Driven backbone). Spatial sizes "
    "must be divisible by 32.",
    roi_multiple=32,
    peft_targets=_SWIN_PEFT,
)
register_model(
    "swinunetr_tiny",
    _swinunetr,
    {"feature_size": 12},
    _SWIN_BLOCKS,
    "SwinUNETR with feature_size 12 (4M parameters), for tests and demos.",
    roi_multiple=32,
    peft_targets=_SWIN_PEFT,
)
register_model(
    "unet",
    _basic_unet,
    {"features": [32, 32, 64, 128, 256, 32]},
    _UNET_BLOCKS,
    "MONAI BasicUNet (5.8M parameters), 32 feature channels at full resolution. Spatial sizes must be divisible by 16.",
    roi_multiple=16,
    peft_targets=_UNET_PEFT,
)
register_model(
    "unet_tiny",
    _basic_unet,
    {"features": [8, 8, 16, 32, 64, 8]},
    _UNET_BLOCKS,
    "BasicUNet with 8..64 channels (0.36M parameters), for tests and the CPU demo.",
    roi_multiple=16,
    peft_targets=_UNET_PEFT,
)
