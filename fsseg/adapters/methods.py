"""The registered adaptation methods: what each one trains."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fsseg.adapters.adaptformer import inject_adaptformer
from fsseg.adapters.base import AdaptedModel, freeze, init_head_from_template, register_method
from fsseg.adapters.spatial import SpatialAdapter
from fsseg.config import setting
from fsseg.errors import ConfigError
from fsseg.models import SegmentationModel, create_model
from fsseg.templates import Template


@dataclass
class LinearProbeConfig:
    """init_from_template: start a structure the pretrained template knows from its head row (zero-shot)."""

    init_from_template: bool = setting(
        True, help="start a structure the pretrained template knows from its head row (zero-shot)"
    )


@dataclass
class SpatialAdapterConfig:
    """kernel_size: 3 for the spatial adapter, 1 for the CLIP-Adapter-like variant."""

    kernel_size: int = setting(3, help="3 for the spatial adapter, 1 for the CLIP-Adapter-like variant")
    init_from_template: bool = setting(
        True, help="start a structure the pretrained template knows from its head row (zero-shot)"
    )


@dataclass
class NoOptions:
    """This method has no options of its own."""


BIAS_SELECTIONS = ("bias-terms", "reference")


@dataclass
class BiasConfig:
    """Which parameters count as biases. ``bias-terms`` (default): every backbone parameter named ``bias``
    (21,697 trained on SwinUNETR-48 with one structure). ``reference``: the reference code's name filter, the Swin
    transformer's ``attn``/``mlp`` parameters with ``bias`` in their name, its relative-position bias tables
    included (210,739)."""

    selection: str = setting("bias-terms", help="which parameters count as biases: bias-terms or reference")

    def __post_init__(self) -> None:
        if self.selection not in BIAS_SELECTIONS:
            raise ConfigError(f"bias.selection '{self.selection}' is not one of {', '.join(BIAS_SELECTIONS)}")


@dataclass
class AdaptFormerConfig:
    """bottleneck width and output scale of the adapter beside each Swin block's MLP (reference: 16 and 0.1)."""

    bottleneck: int = setting(16, help="width of the adapter beside each Swin block's MLP")
    scale: float = setting(0.1, help="scale of the adapter's output")


def frozen_with_head(
    base: SegmentationModel, template: Template, structures: list, init: bool, trunk=None
) -> AdaptedModel:
    freeze(base)
    adapted = AdaptedModel(base, structures, trunk)
    if init:
        init_head_from_template(adapted, template)
    return adapted


@register_method(
    "lp", LinearProbeConfig, frozen_backbone=True, description="linear probe: a new 1x1x1 head on frozen features"
)
def linear_probe(
    base: SegmentationModel, template: Template, structures: list, config: LinearProbeConfig
) -> AdaptedModel:
    return frozen_with_head(base, template, structures, config.init_from_template)


@register_method(
    "adapter",
    SpatialAdapterConfig,
    frozen_backbone=True,
    description="spatial adapter: residual conv block (identity at start) + head on frozen features",
)
def spatial_adapter(
    base: SegmentationModel, template: Template, structures: list, config: SpatialAdapterConfig
) -> AdaptedModel:
    trunk = SpatialAdapter(base.feature_channels, config.kernel_size)
    return frozen_with_head(base, template, structures, config.init_from_template, trunk)


@register_method(
    "ft-last", LinearProbeConfig, frozen_backbone=False, description="fine-tune the last decoder block and a head"
)
def fine_tune_last(
    base: SegmentationModel, template: Template, structures: list, config: LinearProbeConfig
) -> AdaptedModel:
    adapted = frozen_with_head(base, template, structures, config.init_from_template)
    for module in base.block_modules("last_decoder_block"):
        for parameter in module.parameters():
            parameter.requires_grad_(True)
    return adapted


@register_method("ft", LinearProbeConfig, frozen_backbone=False, description="fine-tune everything")
def fine_tune(base: SegmentationModel, template: Template, structures: list, config: LinearProbeConfig) -> AdaptedModel:
    adapted = AdaptedModel(base, structures)
    if config.init_from_template:
        init_head_from_template(adapted, template)
    freeze(base.head)  # the base head is replaced, never used
    return adapted


@register_method(
    "scratch",
    NoOptions,
    frozen_backbone=False,
    description="train the same architecture from random weights (a baseline)",
)
def from_scratch(base: SegmentationModel, template: Template, structures: list, config: NoOptions) -> AdaptedModel:
    fresh = create_model(base.arch["name"], num_classes=base.num_classes, **base.arch["kwargs"])
    freeze(fresh.head)
    return AdaptedModel(fresh, structures)


@register_method(
    "bias",
    BiasConfig,
    frozen_backbone=False,
    description="bias terms of the backbone + head (selection: bias-terms or the reference's filter)",
)
def bias_tuning(base: SegmentationModel, template: Template, structures: list, config: BiasConfig) -> AdaptedModel:
    adapted = frozen_with_head(base, template, structures, True)
    for name, parameter in base.backbone.named_parameters():
        if config.selection == "reference":
            chosen = name.startswith("swinViT.") and "bias" in name and ("attn" in name or "mlp" in name)
        else:  # exactly the parameters called "bias": relative-position bias *tables* are not bias terms
            chosen = name.rsplit(".", 1)[-1] == "bias"
        parameter.requires_grad_(chosen)
    if not any(p.requires_grad for p in base.backbone.parameters()):
        raise ConfigError(
            f"bias: selection '{config.selection}' picks no parameter of model "
            f"'{base.arch.get('name')}' (the reference filter needs a swinunetr backbone)"
        )
    return adapted


NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@register_method(
    "affine-ln",
    NoOptions,
    frozen_backbone=False,
    description="the affine parameters of the backbone's normalisation layers + head",
)
def affine_norms(base: SegmentationModel, template: Template, structures: list, config: NoOptions) -> AdaptedModel:
    adapted = frozen_with_head(base, template, structures, True)
    norms = [m for m in base.backbone.modules() if isinstance(m, NORMS) and any(True for _ in m.parameters())]
    if not norms:
        raise ConfigError(
            f"affine-ln: model '{base.arch.get('name')}' has no normalisation layer with affine parameters"
        )
    for module in norms:
        for parameter in module.parameters():
            parameter.requires_grad_(True)
    return adapted


@register_method(
    "adaptformer",
    AdaptFormerConfig,
    frozen_backbone=False,
    description="AdaptFormer: a bottleneck MLP beside each Swin block's MLP + head (transformers)",
)
def adaptformer(
    base: SegmentationModel, template: Template, structures: list, config: AdaptFormerConfig
) -> AdaptedModel:
    adapted = frozen_with_head(base, template, structures, True)
    inject_adaptformer(base.backbone, config.bottleneck, config.scale)
    return adapted
