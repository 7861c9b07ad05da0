"""Predict label maps on a scan's own grid.

image file -> deterministic preprocessing (RAS, spacing, HU window, crop, pad) -> MONAI sliding window with
gaussian blending, only the requested structures' logits kept -> sigmoid -> ``Invertd`` resamples the
probabilities onto the input grid one structure at a time -> threshold 0.5 -> one label map (ids 1..K in the
order of ``structures``; where several pass, the most probable).

Host memory: the stitched logits (K x model grid, float32) while the window slides, then the probabilities in
float16, plus a constant few native-size volumes; native-grid probabilities of every structure are kept only
when asked for (``--save-probabilities``).
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


def probabilities_of(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid of stitched (K, X, Y, Z) logits, kept in float16 on the CPU, one channel at a time: the K x volume
    float32 copies are what a full-size CT with many structures cannot afford (the threshold lies far from
    float16's resolution, 5e-4 at 0.5)."""
    probabilities = torch.empty(logits.shape, dtype=torch.float16)
    for k in range(logits.shape[0]):
        probabilities[k] = torch.sigmoid(logits[k].float()).cpu()
    return probabilities


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
    """A prediction on the input grid: ``label`` (X, Y, Z) uint8 and, when asked for, ``probabilities``
    (K, X, Y, Z) float32."""

    label: np.ndarray
    probabilities: np.ndarray | None
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
        # Applied to each structure's mask as a one-channel stack; by default MONAI skips channel 0 as background.
        self.keep_largest = KeepLargestConnectedComponent(applied_labels=[0], is_onehot=True, independent=True)

    def _inferer(self, spatial_shape: Sequence[int]) -> SlidingWindowInferer:
        output_bytes = 4 * len(self.structures) * int(np.prod(spatial_shape))
        stitch = self.device if self.device.type == "cuda" and output_bytes < GPU_STITCH_MAX_BYTES else torch.device("cpu")
        return SlidingWindowInferer(
            roi_size=self.preprocessing.roi, sw_batch_size=self.settings.sw_batch_size,
            overlap=self.settings.overlap, mode="gaussian", sw_device=self.device, device=stitch,
        )

    @torch.no_grad()
    def model_space_probabilities(self, data: dict, network: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Sigmoid probabilities (K, *model grid, float16) of a preprocessed ``data[IMAGE]`` (by default with
        ``self.network``)."""
        image = data[IMAGE]
        batch = image.as_tensor()[None].to(self.device)
        if self.device.type == "cuda":
            autocast = torch.autocast("cuda", dtype=torch.float16, enabled=self.settings.amp)
        else:
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.settings.cpu_bf16)
        with autocast:
            logits = self._inferer(image.shape[1:])(batch, network or self.network)
        return probabilities_of(logits[0])

    def preprocess(self, path: str | Path) -> dict:
        """The scan in model space (``data[IMAGE]``, (1, X, Y, Z)), with what is needed to map back."""
        return self.transform({IMAGE: str(path)})

    def finish(self, data: dict, probabilities: torch.Tensor, reference: nib.Nifti1Image,
               keep_probabilities: bool = False) -> Prediction:
        """Map model-space ``probabilities`` (K, *model grid) of ``data`` back onto the scan's grid, one structure
        at a time, and threshold them into one label map."""
        shape = tuple(reference.shape[:3])
        label, best, kept = torch.zeros(shape, dtype=torch.uint8), torch.zeros(shape), []
        for k in range(probabilities.shape[0]):
            channel = dict(data)
            channel[PROBABILITIES] = MetaTensor(probabilities[k : k + 1].float(), meta=dict(data[IMAGE].meta))
            native = self.invert(channel)[PROBABILITIES].as_tensor()[0].float().clamp_(0, 1)
            hard = native > self.settings.threshold
            if self.settings.largest_component:
                hard = self.keep_largest(hard[None])[0].bool()
            wins = hard & (native > best)  # ties keep the earlier structure, as argmax does
            label[wins], best[wins] = k + 1, native[wins]
            if keep_probabilities:
                kept.append(native.numpy())
        return Prediction(label=label.numpy(), probabilities=np.stack(kept) if keep_probabilities else None,
                          reference=reference, structures=self.structures)

    def __call__(self, path: str | Path, keep_probabilities: bool = False) -> Prediction:
        """Predict one scan; the result lies on the scan's own grid (shape and affine)."""
        reference = load_nifti_image(path)
        data = self.preprocess(path)
        return self.finish(data, self.model_space_probabilities(data), reference, keep_probabilities)
