"""LoRA, DoRA and IA³ through Hugging Face PEFT, injected into any backbone by the names of the layers they adapt.

``targets`` is a regular expression searched in the backbone's layer names (linear and 3D convolution layers);
left out, the backbone's registered placement (``peft_targets`` of :func:`fsseg.models.registry.register_model`):
the attention ``qkv``/``proj`` layers of SwinUNETR (the reference code's LoRA), the 3x3x3 convolutions of the
U-Nets. PEFT is the ``peft`` extra (``pip install 'fsseg[peft]'``): it brings transformers and accelerate, which
nothing else in fsseg needs, so a clinical install that never uses these methods stays without them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from fsseg.adapters.base import AdaptedModel, register_method
from fsseg.adapters.methods import frozen_with_head
from fsseg.config import setting
from fsseg.errors import ConfigError
from fsseg.models import SegmentationModel
from fsseg.models.registry import peft_targets
from fsseg.templates import Template

# The layers PEFT adapts in a 3D network, and the methods registered here.
ADAPTABLE = (nn.Linear, nn.Conv3d)
METHODS = ("lora", "dora", "ia3")


@dataclass
class LoRAConfig:
    r"""rank r and alpha (updates scaled by alpha / r) on the layers matching ``targets`` (default: the backbone's
    placement).

    On SwinUNETR-48 the default puts rank-4 updates on the attention ``qkv`` and ``proj`` layers (34,609
    parameters with one structure). The reference code's placement: ``qkv`` only, rank 12 across the fused
    q, k, v and no scaling, i.e. ``targets: 'swinViT\.layers\d\.\d\.blocks\.\d+\.attn\.qkv$'``, ``rank: 12``,
    ``alpha: 12`` (69,169 parameters).
    """

    rank: int = setting(4, help="rank r of each update")
    alpha: float = setting(8.0, help="updates are scaled by alpha / r")
    targets: str | None = setting(None, help="regex of the layer names to adapt (default: the backbone's placement)")


@dataclass
class IA3Config:
    """IA³: a learned scale of each output channel of the layers matching ``targets`` (default: the backbone's
    placement), starting at 1."""

    targets: str | None = setting(None, help="regex of the layer names to adapt (default: the backbone's placement)")


def target_layers(base: SegmentationModel, pattern: str | None, method: str) -> list[str]:
    """The names of the backbone's linear and 3D convolution layers that ``pattern`` (or the backbone's
    placement) finds.

    Raises:
        ConfigError: no pattern for this backbone, or it finds no layer (a silent no-op would train the head alone).
    """
    name = base.arch.get("name", "")
    pattern = pattern or peft_targets(name)
    if not pattern:
        raise ConfigError(f"{method}: model '{name}' registers no layers for PEFT methods; set options.targets")
    regex = re.compile(pattern)
    found = [n for n, m in base.backbone.named_modules() if isinstance(m, ADAPTABLE) and regex.search(n)]
    if not found:
        raise ConfigError(f"{method}: targets '{pattern}' match no linear or 3D convolution layer of model '{name}'")
    return found


def inject(base: SegmentationModel, config: Any) -> None:
    """PEFT's layers into the backbone in place; PEFT leaves only their parameters trainable there."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, base.backbone)


def peft() -> Any:
    """The ``peft`` package, or a ConfigError saying how to install it."""
    try:
        import peft as package
    except ImportError:
        raise ConfigError("LoRA, DoRA and IA3 run through Hugging Face PEFT: pip install 'fsseg[peft]'") from None
    return package


def _low_rank(
    base: SegmentationModel, template: Template, structures: list, config: LoRAConfig, method: str, dora: bool
) -> AdaptedModel:
    adapted = frozen_with_head(base, template, structures, True)
    layers = target_layers(base, config.targets, method)
    settings = peft().LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=layers, use_dora=dora)
    inject(base, settings)
    return adapted


@register_method("lora", LoRAConfig, frozen_backbone=False, description="LoRA (PEFT) on the backbone's layers + head")
def lora(base: SegmentationModel, template: Template, structures: list, config: LoRAConfig) -> AdaptedModel:
    return _low_rank(base, template, structures, config, "lora", dora=False)


@register_method(
    "dora",
    LoRAConfig,
    frozen_backbone=False,
    description="DoRA (PEFT): LoRA on each weight's direction, its magnitude learned apart + head",
)
def dora(base: SegmentationModel, template: Template, structures: list, config: LoRAConfig) -> AdaptedModel:
    return _low_rank(base, template, structures, config, "dora", dora=True)


@register_method("ia3", IA3Config, frozen_backbone=False, description="IA3 (PEFT): learned output scales + head")
def ia3(base: SegmentationModel, template: Template, structures: list, config: IA3Config) -> AdaptedModel:
    adapted = frozen_with_head(base, template, structures, True)
    layers = target_layers(base, config.targets, "ia3")
    inject(base, peft().IA3Config(target_modules=layers, feedforward_modules=[]))
    return adapted


def merge_into_backbone(model: nn.Module) -> bool:
    """Fold every PEFT layer of ``model`` into the layer it adapts (the plain layer, its weights updated);
    returns whether there was one."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge()
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attribute, layer.get_base_layer())
    return bool(layers)


# The hand-written LoRA of fsseg 0.1's adapter files, in PEFT's names.
_OLD_LORA_KEYS = (
    (re.compile(r"\.lora_a\.weight$"), ".lora_A.default.weight"),
    (re.compile(r"\.lora_b\.weight$"), ".lora_B.default.weight"),
    (re.compile(r"\.base\.(weight|bias)$"), r".base_layer.\1"),
)


def upgrade_lora_state(state: dict) -> dict:
    """An adapter state of fsseg's earlier hand-written LoRA in PEFT's parameter names (others unchanged)."""
    if not any(key.endswith((".lora_a.weight", ".lora_b.weight")) for key in state):
        return state
    upgraded = {}
    for key, value in state.items():
        for pattern, replacement in _OLD_LORA_KEYS:
            key = pattern.sub(replacement, key)
        upgraded[key] = value
    return upgraded
