"""nnU-Net's networks (TotalSegmentator's among them) as fsseg backbones, built by dynamic-network-architectures.

The network is the one nnU-Net builds from its plans (``architecture``: class name and keyword arguments), with
its segmentation layers taken out: what reaches fsseg's head are the last decoder stage's features at full
resolution. nnU-Net normalises CT by clipping to two percentiles and z-scoring; fsseg's preprocessing clips to
the same percentiles and maps them to [0, 1], and the backbone's first step maps [0, 1] back onto nnU-Net's
z-scores (``input_scale``, ``input_shift``), so the network sees the values it was trained on, zero-padding
included.
"""

from __future__ import annotations

import importlib
from typing import Any, cast

import torch
from torch import nn

from fsseg.errors import ConfigError

NETWORK_PACKAGE = "dynamic_network_architectures."
# What plans may name as classes: a network of dynamic-network-architectures, or a torch.nn layer.
IMPORTABLE = (NETWORK_PACKAGE, "torch.nn.")
INSTALL = "pip install dynamic-network-architectures (or 'fsseg[nnunet]')"


def resolve(name: str) -> type:
    """The class a plans file names (``torch.nn.modules.conv.Conv3d``); nothing outside :data:`IMPORTABLE`.

    Raises:
        ConfigError: a name outside those packages, or one that does not exist.
    """
    if not name.startswith(IMPORTABLE):
        raise ConfigError(
            f"nnU-Net plans name class '{name}', which is neither a torch.nn layer nor a "
            "dynamic-network-architectures network; fsseg imports nothing else"
        )
    module, _, attribute = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attribute)
    except ModuleNotFoundError:
        if name.startswith(NETWORK_PACKAGE):
            raise ConfigError(f"nnU-Net networks need dynamic-network-architectures: {INSTALL}") from None
        raise ConfigError(f"nnU-Net plans name class '{name}', which does not exist here") from None
    except AttributeError:
        raise ConfigError(f"nnU-Net plans name class '{name}', which does not exist here") from None


def build_network(network_class: str, arch_kwargs: dict, requires_import: list[str], num_classes: int = 2) -> nn.Module:
    """The network as nnU-Net builds it from its plans' ``architecture`` (one input channel, no deep
    supervision)."""
    kwargs = {
        key: resolve(value) if key in requires_import and value is not None else value
        for key, value in arch_kwargs.items()
    }
    try:
        return resolve(network_class)(input_channels=1, num_classes=num_classes, deep_supervision=False, **kwargs)
    except TypeError as error:
        raise ConfigError(f"nnU-Net network {network_class}: arguments do not fit ({error})") from None


class NnUNetBackbone(nn.Module):
    """An nnU-Net network returning its last decoder stage's features (``features`` channels)."""

    net: Any  # an nnU-Net network of dynamic-network-architectures (untyped)

    def __init__(
        self,
        network_class: str,
        arch_kwargs: dict,
        requires_import: list[str],
        input_scale: float = 1.0,
        input_shift: float = 0.0,
    ) -> None:
        super().__init__()
        self.net = build_network(network_class, arch_kwargs, requires_import)
        if not hasattr(self.net, "decoder") or not hasattr(self.net.decoder, "seg_layers"):
            raise ConfigError(
                f"nnU-Net network {network_class} has no decoder with segmentation layers; fsseg "
                "imports U-Net-shaped networks"
            )
        self.features = int(self.net.decoder.seg_layers[-1].in_channels)
        # With deep supervision off the decoder applies only its last segmentation layer: the head's place.
        self.net.decoder.seg_layers = nn.ModuleList([nn.Identity()])
        self.register_buffer("input_scale", torch.tensor(float(input_scale)), persistent=False)
        self.register_buffer("input_shift", torch.tensor(float(input_shift)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = cast(torch.Tensor, self.input_scale), cast(torch.Tensor, self.input_shift)  # buffers
        return self.net(x * scale + shift)


def nnunet_blocks(n_stages: int) -> dict[str, list[str]]:
    """fsseg's parameter groups in the network's module names (the decoder has one stage fewer)."""
    last = n_stages - 2
    return {
        "encoder": ["net.encoder"],
        "decoder": ["net.decoder.stages", "net.decoder.transpconvs"],
        "last_decoder_block": [f"net.decoder.stages.{last}", f"net.decoder.transpconvs.{last}"],
        "bottleneck": [f"net.encoder.stages.{n_stages - 1}"],
    }
