"""Frozen-backbone features computed once per scan and kept on disk.

Methods that freeze the backbone (linear probe, spatial adapter, the transductive query pass) train on
these instead of running the backbone for every crop of every epoch. Features are computed by sliding
window over the preprocessed scan (windows blended with gaussian weights, like logits), stored as float16
``.npy`` files and memory-mapped, keyed by the checkpoint's and the scan's content and the preprocessing,
so every method, shot count and seed sharing the backbone reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer

from fsseg.data.io import atomic_path
from fsseg.models import SegmentationModel

log = logging.getLogger("fsseg.features")


class FeatureStore:
    """Disk cache of (F, X, Y, Z) float16 feature volumes.

    Args:
        folder: where the ``.npy`` files go.
        model: the pretrained model whose ``features`` are cached (kept frozen and in eval mode).
        backbone_key: identifies the backbone weights and preprocessing (e.g. the checkpoint's sha256).
        roi: sliding-window size; overlap: window overlap.
    """

    def __init__(self, folder: Path, model: SegmentationModel, backbone_key: str, roi, device: torch.device,
                 overlap: float = 0.5) -> None:
        self.folder = Path(folder)
        self.model = model.eval()
        self.backbone_key = backbone_key
        self.device = device
        self.inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=1, overlap=overlap, mode="gaussian",
                                            sw_device=device, device=torch.device("cpu"))

    def path(self, scan_key: str) -> Path:
        digest = hashlib.sha1(json.dumps([self.backbone_key, scan_key]).encode()).hexdigest()[:20]
        return self.folder / f"{digest}.npy"

    @torch.no_grad()
    def get(self, scan_key: str, image: torch.Tensor, name: str = "") -> np.ndarray:
        """Features of a preprocessed (1, X, Y, Z) image, read-only memory-mapped; computed on first use.

        ``scan_key`` identifies the scan's content and preprocessing; ``name`` is only for the log.
        """
        path = self.path(scan_key)
        if path.exists():
            try:
                return np.load(path, mmap_mode="r")
            except (ValueError, OSError, EOFError) as error:  # truncated by a kill or a full disk
                log.warning(f"cached features {path} are damaged ({type(error).__name__}); recomputing them")
                path.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        plain = torch.as_tensor(image).as_subclass(torch.Tensor)
        features = self.inferer(plain[None].to(self.device), self.model.features)
        with atomic_path(path) as tmp:
            np.save(tmp, features[0].to(torch.float16).numpy())
        log.info(f"cached features of {name or path.stem}: {tuple(features.shape[1:])}, "
                 f"{path.stat().st_size / 2**20:.0f} MB")
        return np.load(path, mmap_mode="r")
