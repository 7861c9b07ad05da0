"""Frozen-backbone features computed once per scan and kept on disk.

Methods that freeze the backbone (linear probe, spatial adapter, the transductive query pass) train on
these instead of running the backbone for every crop of every epoch. Features come from
:meth:`fsseg.inference.Predictor.stitched_features` (the path fsseg-predict takes for such adapters), are
stored as float16 ``.npy`` files and memory-mapped, keyed by the checkpoint's and the scan's content, the
preprocessing and the precision, so every method, shot count and seed sharing the backbone reuses them (the
policy of :mod:`fsseg.cache`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fsseg.cache import cache_key, discard_damaged
from fsseg.files import atomic_path

log = logging.getLogger("fsseg.features")


class FeatureStore:
    """Disk cache of (F, X, Y, Z) float16 feature volumes.

    Args:
        folder: where the ``.npy`` files go.
        backbone_key: identifies the backbone weights and how features are computed (checkpoint sha256,
            precision).
        compute: a preprocessed (1, X, Y, Z) image -> its (F, X, Y, Z) float16 features.
    """

    def __init__(self, folder: Path, backbone_key: str, compute: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.folder = Path(folder)
        self.backbone_key = backbone_key
        self.compute = compute

    def path(self, scan_key: str) -> Path:
        return self.folder / f"{cache_key(self.backbone_key, scan_key)}.npy"

    def get(self, scan_key: str, image: torch.Tensor, name: str = "") -> np.ndarray:
        """Features of a preprocessed (1, X, Y, Z) image, read-only memory-mapped; computed on first use.

        ``scan_key`` identifies the scan's content and preprocessing; ``name`` is only for the log.
        """
        path = self.path(scan_key)
        if path.exists():
            try:
                return np.load(path, mmap_mode="r")
            except (ValueError, OSError, EOFError) as error:  # truncated by a kill or a full disk
                discard_damaged(path, error, "features")
        self.folder.mkdir(parents=True, exist_ok=True)
        features = self.compute(image)
        with atomic_path(path) as tmp:
            np.save(tmp, features.to(torch.float16).numpy())
        log.info(
            f"cached features of {name or path.stem}: {tuple(features.shape)}, {path.stat().st_size / 2**20:.0f} MB"
        )
        return np.load(path, mmap_mode="r")
