"""Low-rank adaptation (LoRA) of ``nn.Linear`` layers chosen by a name pattern."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from fsseg.errors import ConfigError


class LoRALinear(nn.Module):
    """``W x + (alpha / r) B A x`` around a frozen linear layer; B starts at zero, so the output is unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x)) * self.scaling


def inject_lora(module: nn.Module, pattern: str, rank: int, alpha: float) -> list[str]:
    """Wrap every ``nn.Linear`` whose full name matches ``pattern``; return their names.

    Raises:
        ConfigError: no linear layer matches (a silent no-op would train only the head).
    """
    regex = re.compile(pattern)
    targets = [name for name, child in module.named_modules() if isinstance(child, nn.Linear) and regex.search(name)]
    if not targets:
        raise ConfigError(
            f"LoRA pattern '{pattern}' matches no linear layer of this model "
            "(LoRA targets the attention layers of transformer backbones such as swinunetr)"
        )
    for name in targets:
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attribute, LoRALinear(getattr(parent, attribute), rank, alpha))
    return targets
