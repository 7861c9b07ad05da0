"""Adapted models and the method registry.

An adaptation method takes a pretrained :class:`~fsseg.models.SegmentationModel`, freezes what it does not
train, injects what it adds, and returns an :class:`AdaptedModel`: ``head(trunk(features(x)))`` with a new
head holding one sigmoid channel per target structure. Each method is a config dataclass plus an apply
function, registered by name (``fsseg-adapt --method`` choices come from here).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fsseg.config import setting
from fsseg.errors import ConfigError
from fsseg.models import SegmentationModel
from fsseg.models.base import new_head
from fsseg.templates import Template, canonical_name, suggest_name
from fsseg.training.encoder_cache import split_backbone, splits_at_encoder
from fsseg.training.freezing import train_trainable_parts


class AdaptedModel(nn.Module):
    """A pretrained feature extractor, an optional trunk adapter on its features, and a new head.

    ``head_forward`` maps (cached) features to logits, so methods whose backbone is frozen can train on
    features computed once.
    """

    base: SegmentationModel
    trunk: nn.Module
    head: nn.Conv3d

    def __init__(self, base: SegmentationModel, structures: list[str], trunk: nn.Module | None = None) -> None:
        super().__init__()
        self.base = base
        self.trunk = trunk if trunk is not None else nn.Identity()
        self.head = new_head(base.feature_channels, len(structures))
        self.structures = list(structures)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.features(x)

    def head_forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F, ...) features -> (B, K, ...) logits."""
        return self.head(self.trunk(features))

    def decode_forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """The skips of the backbone's encoder (a network that splits there) -> (B, K, ...) logits."""
        return self.head_forward(split_backbone(self.base).decode(skips))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_forward(self.features(x))

    @property
    def backbone_frozen(self) -> bool:
        """True when no parameter of the pretrained feature extractor trains (features can be cached)."""
        return not any(p.requires_grad for p in self.base.backbone.parameters())

    @property
    def encoder_frozen(self) -> bool:
        """True when the backbone splits at its encoder and no encoder parameter trains (the encoder's skips can
        be cached and the decoder trained on them)."""
        return splits_at_encoder(self.base) and not any(
            p.requires_grad for p in self.base.parameter_groups()["encoder"]
        )

    @property
    def per_voxel_head(self) -> bool:
        """True when ``head_forward`` treats each voxel's features on their own (1x1x1 convolutions and
        pointwise activations only), so it can train on any subset of voxels."""
        leaves = [m for part in (self.trunk, self.head) for m in part.modules() if not list(m.children())]
        return all(
            isinstance(m, (nn.Identity, nn.ReLU)) or (isinstance(m, nn.Conv3d) and m.kernel_size == (1, 1, 1))
            for m in leaves
        )

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trained tensors: what an adapter file stores."""
        return {name: p.detach().cpu().clone() for name, p in self.named_parameters() if p.requires_grad}

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters, the base head excluded (it is not used)."""
        params = [p for name, p in self.named_parameters() if not name.startswith("base.head.")]
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def set_train_mode(self) -> None:
        """Train mode only for modules that hold trainable parameters; frozen parts stay in eval mode."""
        train_trainable_parts(self)


def init_head_from_template(adapted: AdaptedModel, template: Template) -> list[str]:
    """Copy the pretrained head row of every target structure the template shares (zero-shot start).

    Returns the structures that started from a pretrained row; the others keep the fresh head's init. A base
    whose head was never trained (an imported backbone) gives no rows: they would be random, not zero-shot.
    """
    if adapted.base.num_classes != len(template):
        raise ConfigError(
            f"the model has {adapted.base.num_classes} output channels but template '{template.name}' "
            f"has {len(template)} structures"
        )
    started: list[str] = []
    if not adapted.base.head_trained:
        return started
    with torch.no_grad():
        for k, name in enumerate(adapted.structures):
            channel = template.channel(name)
            if channel is not None:
                adapted.head.weight[k] = adapted.base.head.weight[channel]
                bias, base_bias = adapted.head.bias, adapted.base.head.bias
                assert bias is not None and base_bias is not None  # every head is a PointwiseConv3d with one
                bias[k] = base_bias[channel]
                started.append(name)
    return started


def freeze(module: nn.Module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(False)


ApplyFn = Callable[[SegmentationModel, Template, list, object], AdaptedModel]


@dataclass(frozen=True)
class Method:
    """A registered adaptation method."""

    name: str
    config_cls: type
    apply: ApplyFn
    frozen_backbone: bool
    description: str


_METHODS: dict[str, Method] = {}


def register_method(name: str, config_cls: type, frozen_backbone: bool, description: str):
    """Decorator registering ``apply(base, template, structures, config) -> AdaptedModel`` under ``name``."""

    def decorator(apply: ApplyFn) -> ApplyFn:
        if name in _METHODS or name != name.lower():
            raise ValueError(f"method name '{name}' must be lower case and new")
        if not dataclasses.is_dataclass(config_cls):  # its YAML options are validated into it
            raise TypeError(f"method '{name}': its options class {config_cls.__name__} must be a dataclass")
        _METHODS[name] = Method(name, config_cls, apply, frozen_backbone, description)
        return apply

    return decorator


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ConfigError(
            f"unknown method '{name}'{suggest_name(name, sorted(_METHODS))}; available: {', '.join(sorted(_METHODS))}"
        )
    return _METHODS[name]


def list_methods() -> dict[str, str]:
    return {name: m.description for name, m in sorted(_METHODS.items())}


BLOCK_CHOICES = ("frozen", "fine-tuned", "new")


@dataclass
class Composition:
    """What becomes of the decoder and the bottleneck on top of a method, as the reference's ``--decoder`` and
    ``--bottleneck`` (e.g. LoRA in the encoder with the decoder fine-tuned). ``None`` leaves a part as the method
    has it; ``frozen``, ``fine-tuned`` (trained from the pretrained weights) or ``new`` (re-initialised and
    trained)."""

    decoder: str | None = setting(None, help="the decoder: frozen, fine-tuned or new (null: as the method has it)")
    bottleneck: str | None = setting(
        None, help="the bottleneck: frozen, fine-tuned or new (null: as the method has it)"
    )

    def __post_init__(self) -> None:
        for part in ("decoder", "bottleneck"):
            choice = getattr(self, part)
            if choice is not None and choice not in BLOCK_CHOICES:
                raise ConfigError(f"compose.{part} '{choice}' is not one of {', '.join(BLOCK_CHOICES)}")


def compose(adapted: AdaptedModel, composition: Composition) -> AdaptedModel:
    """Freeze, unfreeze or re-initialise the decoder and bottleneck blocks of ``adapted``'s backbone."""
    for group in ("decoder", "bottleneck"):
        choice = getattr(composition, group)
        if choice is None:
            continue
        if group not in adapted.base.blocks:
            raise ConfigError(f"compose.{group}: model '{adapted.base.arch.get('name')}' names no {group} blocks")
        for block in adapted.base.block_modules(group):
            if choice == "new":
                for module in block.modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()  # type: ignore[operator]
            for parameter in block.parameters():
                parameter.requires_grad_(choice != "frozen")
    return adapted


def adapt_model(
    base: SegmentationModel,
    template: Template,
    structures: list[str],
    method: str,
    config=None,
    composition: Composition | None = None,
) -> AdaptedModel:
    """Apply ``method`` (then ``composition``) to a deep copy of ``base`` (the base itself is left untouched);
    returned in eval mode."""
    spec = get_method(method)
    config = config if config is not None else spec.config_cls()
    names = [canonical_name(s) for s in structures]
    adapted = spec.apply(copy.deepcopy(base), template, names, config)
    return compose(adapted, composition or Composition()).eval()
