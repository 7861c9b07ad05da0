"""Predict label maps on a scan's own grid.

image file -> deterministic preprocessing (RAS, spacing, HU window, crop, pad) -> MONAI sliding window with
gaussian blending, only the requested structures' logits kept -> sigmoid -> ``Invertd`` resamples the
probabilities onto the input grid -> threshold 0.5 -> one label map (ids 1..K in the order of ``structures``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import Invertd, KeepLargestConnectedComponent

from fsseg.data.io import load_nifti_image
from fsseg.data.transforms import IMAGE, Preprocessing, inference_transforms

PROBABILITIES = "probabilities"
# Stitch on the GPU only while the output (channels x voxels, float32) stays under this size.
GPU_STITCH_MAX_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class InferenceSettings:
    """Sliding-window settings (the roi comes from the checkpoint's preprocessing).

    ``amp``: float16 autocast on CUDA. ``cpu_bf16``: bfloat16 autocast on the CPU (about 1.8x faster for a UNet
    here, masks agreeing on > 99.99 % of voxels with random weights; off by default: check it on your model).
    """

    overlap: float = 0.5
    sw_batch_size: int = 1
    amp: bool = True
    cpu_bf16: bool = False
    threshold: float = 0.5
    largest_component: bool = False


@dataclass
class Prediction:
    """A prediction on the input grid: ``label`` (X, Y, Z) uint8, ``probabilities`` (K, X, Y, Z) float32."""

    label: np.ndarray
    probabilities: np.ndarray
    reference: nib.Nifti1Image
    structures: list[str]

    def masks(self) -> dict[str, np.ndarray]:
        """One boolean mask per structure."""
        return {name: self.label == i + 1 for i, name in enumerate(self.structures)}


class Predictor:
    """Runs a network over whole scans.

    Args:
        network: (B, 1, *roi) image -> (B, K, *roi) logits of the K requested structures.
        structures: names of the K channels, in order.
        preprocessing: the checkpoint's preprocessing.
        device: where the network runs.
        settings: sliding-window and post-processing settings.
    """

    def __init__(
        self,
        network: Callable[[torch.Tensor], torch.Tensor],
        structures: Sequence[str],
        preprocessing: Preprocessing,
        device: torch.device,
        settings: InferenceSettings = InferenceSettings(),
    ) -> None:
        self.network = network
        self.structures = list(structures)
        self.preprocessing = preprocessing
        self.device = device
        self.settings = settings
        self.transform = inference_transforms(preprocessing)
        self.invert = Invertd(PROBABILITIES, transform=self.transform, orig_keys=IMAGE, nearest_interp=False)

    def _inferer(self, spatial_shape: Sequence[int]) -> SlidingWindowInferer:
        output_bytes = 4 * len(self.structures) * int(np.prod(spatial_shape))
        stitch = self.device if self.device.type == "cuda" and output_bytes < GPU_STITCH_MAX_BYTES else torch.device("cpu")
        return SlidingWindowInferer(
            roi_size=self.preprocessing.roi, sw_batch_size=self.settings.sw_batch_size,
            overlap=self.settings.overlap, mode="gaussian", sw_device=self.device, device=stitch,
        )

    @torch.no_grad()
    def model_space_probabilities(self, data: dict, network: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Sigmoid probabilities (K, *model grid) of a preprocessed ``data[IMAGE]`` (by default with ``self.network``)."""
        image = data[IMAGE]
        batch = image.as_tensor()[None].to(self.device)
        if self.device.type == "cuda":
            autocast = torch.autocast("cuda", dtype=torch.float16, enabled=self.settings.amp)
        else:
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.settings.cpu_bf16)
        with autocast:
            logits = self._inferer(image.shape[1:])(batch, network or self.network)
        return torch.sigmoid(logits[0].float()).cpu()

    def preprocess(self, path: str | Path) -> dict:
        """The scan in model space (``data[IMAGE]``, (1, X, Y, Z)), with what is needed to map back."""
        return self.transform({IMAGE: str(path)})

    def finish(self, data: dict, probabilities: torch.Tensor, reference: nib.Nifti1Image) -> Prediction:
        """Map model-space ``probabilities`` (K, *model grid) of ``data`` back onto the scan's grid and threshold."""
        data = dict(data)
        data[PROBABILITIES] = MetaTensor(probabilities, meta=dict(data[IMAGE].meta))
        native = self.invert(data)[PROBABILITIES].as_tensor().float().clamp_(0, 1)
        hard = native > self.settings.threshold
        if self.settings.largest_component:
            # Every channel is a structure: by default MONAI would take channel 0 for background and skip it.
            keep = KeepLargestConnectedComponent(applied_labels=list(range(hard.shape[0])), is_onehot=True,
                                                 independent=True)
            hard = keep(hard).bool()
        best = torch.where(hard, native, torch.zeros_like(native))
        label = torch.where(hard.any(0), best.argmax(0) + 1, 0).numpy().astype(np.uint8)
        return Prediction(label=label, probabilities=native.numpy(), reference=reference, structures=self.structures)

    def __call__(self, path: str | Path) -> Prediction:
        """Predict one scan; the result lies on the scan's own grid (shape and affine)."""
        reference = load_nifti_image(path)
        data = self.preprocess(path)
        return self.finish(data, self.model_space_probabilities(data), reference)
