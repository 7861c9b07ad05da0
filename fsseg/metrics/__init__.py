"""Segmentation metrics in native space: Dice, normalised surface Dice and HD95 with the real voxel spacing."""

from fsseg.metrics.segmentation import StructureScore, score_structure, summarise

__all__ = ["StructureScore", "score_structure", "summarise"]
