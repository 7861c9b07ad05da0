"""AdaptFormer: a bottleneck MLP beside the MLP of every Swin transformer block (Chen et al., NeurIPS 2022).

``x + attn(x)`` then ``x + mlp(norm2(x)) + scale * up(relu(down(x)))``, the adapter reading the block's input to
its MLP branch before the norm, as the reference FSEFT code does; ``up`` starts at zero, so the network is
unchanged until it trains.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from fsseg.errors import ConfigError


class ParallelAdapter(nn.Module):
    """``scale * up(relu(down(x)))`` over the last (channel) dimension."""

    def __init__(self, dim: int, bottleneck: int, scale: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(x))) * self.scale


def _mlp_branch_with_adapter(block: Any, x: torch.Tensor) -> torch.Tensor:
    return type(block).forward_part2(block, x) + block.adaptformer(x)


def inject_adaptformer(module: nn.Module, bottleneck: int, scale: float) -> int:
    """Give every block with an MLP branch (MONAI's ``SwinTransformerBlock.forward_part2``) a parallel adapter;
    return how many blocks got one.

    Raises:
        ConfigError: the network has no such block (AdaptFormer needs a Swin transformer).
    """
    # MONAI's SwinTransformerBlock, found by what is used of it (typed Any: its attributes are set at run time)
    blocks: list[Any] = [m for m in module.modules() if hasattr(type(m), "forward_part2") and hasattr(m, "mlp")]
    if not blocks:
        raise ConfigError("AdaptFormer needs transformer blocks with an MLP branch (a swinunetr backbone)")
    for block in blocks:
        block.adaptformer = ParallelAdapter(block.mlp.linear1.in_features, bottleneck, scale)
        block.forward_part2 = types.MethodType(_mlp_branch_with_adapter, block)
    return len(blocks)
