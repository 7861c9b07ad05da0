"""Adaptation methods (linear probe, spatial adapter, FT-last, FT, scratch, LoRA, DoRA, IA3, bias, affine-ln,
AdaptFormer),
chosen by name, and their composition with a frozen, fine-tuned or new decoder and bottleneck."""

from fsseg.adapters import methods as _methods  # noqa: F401  (registers the methods)
from fsseg.adapters import peft_methods as _peft_methods  # noqa: F401  (registers LoRA, DoRA, IA3)
from fsseg.adapters.base import (
    AdaptedModel,
    Composition,
    Method,
    adapt_model,
    get_method,
    list_methods,
    register_method,
)

__all__ = ["AdaptedModel", "Composition", "Method", "adapt_model", "get_method", "list_methods", "register_method"]
