"""Adaptation methods (linear probe, spatial adapter, FT-last, FT, scratch, LoRA, bias), chosen by name."""

from fsseg.adapters import methods as _methods  # noqa: F401  (registers the methods)
from fsseg.adapters.base import AdaptedModel, Method, adapt_model, get_method, list_methods, register_method

__all__ = ["AdaptedModel", "Method", "adapt_model", "get_method", "list_methods", "register_method"]
