"""Segmentation models: a feature extractor plus a 1x1x1 convolution head, built by name from a registry."""

from fsseg.models.base import SegmentationModel
from fsseg.models.registry import check_roi, create_model, list_models, register_model

__all__ = ["SegmentationModel", "check_roi", "create_model", "list_models", "register_model"]
