"""How a scan is brought into model space: orientation, voxel size, HU window, window size and foreground crop.

Every checkpoint and adapter file stores one. It is its own light module, so that reading a checkpoint does not
import MONAI's transform stack (:mod:`fsseg.data.transforms` builds the transforms from it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from fsseg.config import ranged, setting
from fsseg.errors import ConfigError


@dataclass(frozen=True)
class Preprocessing:
    """How a scan is brought into model space (stored in every checkpoint).

    Attributes:
        orientation: axis codes of the model space, e.g. ``"RAS"``.
        spacing: voxel size in mm of the model space.
        hu_window: HU range mapped linearly to [0, 1], values outside clipped.
        roi: patch size in voxels, for training crops and the sliding window.
        crop_foreground: crop to the bounding box of voxels above the window's lower bound.
    """

    orientation: str = setting("RAS", help="axis codes of the model space, e.g. RAS or LPS")
    spacing: tuple[float, float, float] = ranged(
        (1.5, 1.5, 1.5), "(0, inf)", help="voxel size of the model space in mm along its three axes"
    )
    hu_window: tuple[float, float] = setting(
        (-175.0, 250.0), help="HU range mapped linearly onto [0, 1]; values outside are clipped"
    )
    roi: tuple[int, int, int] = ranged(
        (96, 96, 96), "[1, inf)", help="window size in voxels: training crops and the sliding window"
    )
    crop_foreground: bool = setting(True, help="crop each scan to the voxels above the window's lower bound")

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "hu_window", tuple(float(h) for h in self.hu_window))
        object.__setattr__(self, "roi", tuple(int(r) for r in self.roi))
        codes = self.orientation.upper()
        axes = sorted(next((i for i, pair in enumerate(("LR", "AP", "SI")) if c in pair), -1) for c in codes)
        if axes != [0, 1, 2]:
            raise ConfigError(
                f"preprocessing.orientation '{self.orientation}' is not three axis codes, one of each "
                "pair L/R, A/P, S/I (like RAS or LPS)"
            )
        object.__setattr__(self, "orientation", codes)
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ConfigError(f"preprocessing.spacing must be three positive numbers (mm), got {self.spacing}")
        if len(self.hu_window) != 2 or self.hu_window[0] >= self.hu_window[1]:
            raise ConfigError(f"preprocessing.hu_window must be [low, high] with low < high, got {self.hu_window}")
        if len(self.roi) != 3 or min(self.roi) < 1:
            raise ConfigError(f"preprocessing.roi must be three positive sizes (voxels), got {self.roi}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> Preprocessing:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown preprocessing key(s): {', '.join(unknown)}")
        return cls(**data)
