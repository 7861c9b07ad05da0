"""Predict label maps on a scan's own grid.

image file -> deterministic preprocessing (RAS, spacing, HU window, crop, pad) -> MONAI sliding window with
gaussian blending, only the requested structures' logits kept -> sigmoid -> one label map on the input grid
(ids 1..K in the order of ``structures``; a structure where its trilinearly resampled probability passes 0.5,
and where several pass, the most probable): found from the model-grid winners, interpolating only at the
structures' borders (:mod:`fsseg.inference.native_grid`), or, when the native probabilities of every structure or
largest components are asked for, by ``Invertd`` resampling one structure at a time.

A network whose backbone is frozen (:class:`FrozenBackbone`) runs in two passes instead: the backbone's
features are stitched over the whole scan (float16), then the heads slide over them. Frozen-backbone adapters
are trained on exactly these features (fsseg-adapt caches them), so fsseg-adapt scores its runs and
fsseg-predict delivers their masks through this one path.

Host memory: the stitched logits (K x model grid, float32) while the window slides, then the probabilities in
float16, plus a constant few native-size volumes; native-grid probabilities of every structure are kept only
when asked for (``--save-probabilities``). The two-pass path adds the stitched features (F x model grid,
float32 while stitching, then float16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import Invertd, KeepLargestConnectedComponent

from fsseg.data.scans import load_scan_image
from fsseg.data.transforms import IMAGE, inference_transforms
from fsseg.inference.confidence import Uncertainty, structure_uncertainty
from fsseg.inference.native_grid import native_label
from fsseg.models.base import pointwise_conv
from fsseg.preprocessing import Preprocessing

PROBABILITIES = "probabilities"
# Stitch on the GPU only while the output (channels x voxels, float32) stays under this size.
GPU_STITCH_MAX_BYTES = 2 * 1024**3
RECORDED = ("overlap", "amp", "cpu_bf16")
# The largest roi that the CPU runs two windows at a time (see InferenceSettings).
CPU_SMALL_ROI_VOXELS = 64**3


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

    ``sw_batch_size``: windows per forward pass; None picks 4 on CUDA and, on the CPU, 2 for a roi of at most
    64^3 voxels and 1 for a larger one. A single small window sends PyTorch's CPU convolutions down their slow
    path (4x slower for the demo's UNet at 48^3), while a single large one already takes the fast path, where a
    second window saves no time and doubles the activations' memory. ``amp``: float16 autocast on CUDA.
    ``cpu_bf16``: bfloat16 autocast on the CPU: off by default. Where the CPU has bfloat16 instructions it runs
    about 1.8x faster, but ``bench/predict_scaling.py`` finds the masks of a UNet agreeing with float32 on fewer
    voxels than the 99.99 % fsseg asks of a default; check it on your model.
    """

    overlap: float = 0.5
    sw_batch_size: int | None = None
    amp: bool = True
    cpu_bf16: bool = False
    threshold: float = 0.5
    largest_component: bool = False

    def record(self) -> dict:
        """The settings that shape the masks besides the weights, as adapter files keep them (fsseg-predict's
        defaults for an adapter, so that it delivers the masks fsseg-adapt scored)."""
        return {name: getattr(self, name) for name in RECORDED}


@dataclass
class Prediction:
    """A prediction on the input grid: ``label`` (X, Y, Z) uint8 and, when asked for, ``probabilities``
    (K, X, Y, Z) float32; ``uncertainty``: what each structure's model-space probabilities say of it."""

    label: np.ndarray
    probabilities: np.ndarray | None
    reference: nib.Nifti1Image
    structures: list[str]
    uncertainty: list[Uncertainty]

    def masks(self) -> dict[str, np.ndarray]:
        """One boolean mask per structure."""
        return {name: self.label == i + 1 for i, name in enumerate(self.structures)}


Network = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FrozenBackbone:
    """A network predicted in two passes: ``features`` (image windows -> (B, ``channels``, ...)) stitched over the
    whole scan, then ``heads`` (feature windows -> logits) sliding over the stitched features. ``pointwise``:
    (weight (K, F), bias (K,)) when the heads are one 1x1x1 convolution, applied to the stitched features voxel by
    voxel instead of sliding."""

    features: Network
    channels: int
    heads: Network
    pointwise: tuple[torch.Tensor, torch.Tensor] | None = None


def pointwise_probabilities(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Sigmoid probabilities (K, *grid, float16) of a 1x1x1 convolution (``weight`` (K, F), ``bias`` (K,)) of
    stitched ``features`` (F, *grid), in float32 a slab of voxels at a time."""
    flat = features.reshape(features.shape[0], -1)
    weight, bias = weight.detach().float().cpu(), bias.detach().float().cpu()[:, None]
    probabilities = torch.empty((weight.shape[0], flat.shape[1]), dtype=torch.float16)
    step = max(1, 2**25 // weight.shape[0])  # 128 MB of float32 logits at a time
    for start in range(0, flat.shape[1], step):
        logits = torch.addmm(bias, weight, flat[:, start : start + step].float())
        probabilities[:, start : start + step] = torch.sigmoid_(logits)
    return probabilities.reshape(weight.shape[0], *features.shape[1:])


class LabelMap:
    """One label map assembled from native-grid probabilities, one structure at a time: structure k (id k + 1)
    where its probability passes the threshold (in its largest component, when asked) and no earlier-added
    structure's is higher."""

    def __init__(self, shape: Sequence[int], settings: InferenceSettings) -> None:
        self.label, self.best = torch.zeros(tuple(shape), dtype=torch.uint8), torch.zeros(tuple(shape))
        self.settings = settings
        # Applied to each structure's mask as a one-channel stack; by default MONAI skips channel 0 as background.
        self.keep_largest = KeepLargestConnectedComponent(applied_labels=[0], is_onehot=True, independent=True)

    def add(self, k: int, probability: torch.Tensor) -> None:
        hard = probability > self.settings.threshold
        if self.settings.largest_component:
            hard = self.keep_largest(hard[None])[0].bool()
        wins = hard & (probability > self.best)  # ties keep the earlier structure, as argmax does
        self.label[wins], self.best[wins] = k + 1, probability[wins]


def prediction_network(
    models: Sequence[Any], channels: Sequence[int], adapted: bool = True
) -> Network | FrozenBackbone:
    """Models as one network over ``channels`` of their concatenated outputs, in order. A checkpoint's own model
    (``adapted`` False) runs on each window with only the requested rows of its 1x1x1 head (a template of 117
    structures would compute every row in every window), or, for more structures than it has feature channels,
    in two passes with those rows applied voxel by voxel. Adapted models (on one base checkpoint) run in two passes (the
    backbone's features stitched once, every head over them) when every model keeps the backbone frozen, since
    those heads were trained and scored on stitched features; else every model on each window. ``models``: a
    checkpoint's SegmentationModel, or AdaptedModels (typed Any: this module is below fsseg.adapters)."""
    channels = list(channels)
    if not adapted:
        model = models[0]  # its head is a 1x1x1 convolution (the model contract, fsseg.models.base)
        weight, bias = model.head.weight.flatten(1)[channels], model.head.bias[channels]

        def rows(features: torch.Tensor) -> torch.Tensor:  # only the requested structures' rows of the head
            return pointwise_conv(features, weight, bias)

        if len(channels) > model.feature_channels:
            # Blending windows is linear: the head of the blended features is the blend of the heads' logits, and
            # F feature channels cost less to blend than K > F logits (117 structures take 5.5 GB at 1.5 mm).
            return FrozenBackbone(model.features, model.feature_channels, rows, (weight, bias))
        return lambda x: rows(model.features(x))

    def heads(features: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.head_forward(features) for m in models], dim=1)[:, channels]

    def whole(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in models], dim=1)[:, channels]

    if all(m.backbone_frozen for m in models):
        return FrozenBackbone(models[0].features, models[0].base.feature_channels, heads)
    return whole


class Predictor:
    """Runs a network over whole scans.

    Args:
        network: (B, 1, *roi) image -> (B, K, *roi) logits of the K requested structures, or a
            :class:`FrozenBackbone` to predict in two passes.
        structures: names of the K channels, in order.
        preprocessing: the checkpoint's preprocessing.
        device: where the network runs.
        settings: sliding-window and post-processing settings.
    """

    def __init__(
        self,
        network: Network | FrozenBackbone,
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

    def _inferer(self, spatial_shape: Sequence[int], channels: int) -> SlidingWindowInferer:
        output_bytes = 4 * channels * int(np.prod(spatial_shape))
        on_gpu = self.device.type == "cuda" and output_bytes < GPU_STITCH_MAX_BYTES
        return SlidingWindowInferer(
            roi_size=self.preprocessing.roi,
            sw_batch_size=self.sw_batch_size,
            overlap=self.settings.overlap,
            mode="gaussian",
            sw_device=self.device,
            device=self.device if on_gpu else torch.device("cpu"),
        )

    @property
    def sw_batch_size(self) -> int:
        if self.settings.sw_batch_size:
            return self.settings.sw_batch_size
        if self.device.type == "cuda":
            return 4
        return 2 if np.prod(self.preprocessing.roi) <= CPU_SMALL_ROI_VOXELS else 1

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16, enabled=self.settings.amp)
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.settings.cpu_bf16)

    @property
    def precision(self) -> str:
        """What the forward passes compute in (features made with other settings differ)."""
        if self.device.type == "cuda" and self.settings.amp:
            return "cuda-float16"
        return "cpu-bfloat16" if self.device.type == "cpu" and self.settings.cpu_bf16 else "float32"

    @torch.no_grad()
    def stitched_features(self, image: torch.Tensor, backbone: FrozenBackbone) -> torch.Tensor:
        """The backbone's features (F, *model grid) of a preprocessed (1, X, Y, Z) image, blended over windows
        and kept in float16 on the CPU: what frozen-backbone adapters train on and are predicted from."""
        plain = torch.as_tensor(image).as_subclass(torch.Tensor)
        with self._autocast():
            features = self._inferer(plain.shape[1:], backbone.channels)(plain[None].to(self.device), backbone.features)
        return features[0].to(device="cpu", dtype=torch.float16)

    @torch.no_grad()
    def head_probabilities(self, features: torch.Tensor, heads: Network) -> torch.Tensor:
        """Sigmoid probabilities (K, *model grid, float16) of the ``heads`` slid over stitched ``features``, in
        float32 (the heads are small)."""
        inferer = self._inferer(features.shape[1:], len(self.structures))
        logits = inferer(features[None], lambda window: heads(window.float()))
        return probabilities_of(logits[0])

    @torch.no_grad()
    def model_space_probabilities(self, data: dict, network: Network | FrozenBackbone | None = None) -> torch.Tensor:
        """Sigmoid probabilities (K, *model grid, float16) of a preprocessed ``data[IMAGE]`` (by default with
        ``self.network``)."""
        network = network if network is not None else self.network
        image = data[IMAGE]
        if isinstance(network, FrozenBackbone):
            features = self.stitched_features(image, network)
            if network.pointwise is not None:
                return pointwise_probabilities(features, *network.pointwise)
            return self.head_probabilities(features, network.heads)
        with self._autocast():
            logits = self._inferer(image.shape[1:], len(self.structures))(
                image.as_tensor()[None].to(self.device), network
            )
        return probabilities_of(logits[0])

    def preprocess(self, path: str | Path) -> dict:
        """The scan in model space (``data[IMAGE]``, (1, X, Y, Z)), with what is needed to map back."""
        return self.transform({IMAGE: str(path)})

    def finish(
        self, data: dict, probabilities: torch.Tensor, reference: nib.Nifti1Image, keep_probabilities: bool = False
    ) -> Prediction:
        """Map model-space ``probabilities`` (K, *model grid) of ``data`` back onto the scan's grid and threshold
        them into one label map: directly (:func:`native_label`, a cost that hardly grows with K) or, when every
        structure's probabilities or largest component are asked for, by resampling one structure at a time."""
        if keep_probabilities or self.settings.largest_component:
            return self.resample_each(data, probabilities, reference, keep_probabilities)
        label = native_label(probabilities, data[IMAGE], self.settings.threshold)
        return self._prediction(label, None, reference, probabilities)

    def resample_each(
        self, data: dict, probabilities: torch.Tensor, reference: nib.Nifti1Image, keep_probabilities: bool = False
    ) -> Prediction:
        """:meth:`finish` by resampling each structure's probabilities onto the scan's grid (``Invertd``) and
        thresholding them: seconds per structure on a full-size scan."""
        labels, kept = LabelMap(tuple(reference.shape[:3]), self.settings), []
        for k in range(probabilities.shape[0]):
            channel = dict(data)
            channel[PROBABILITIES] = MetaTensor(probabilities[k : k + 1].float(), meta=dict(data[IMAGE].meta))
            native = self.invert(channel)[PROBABILITIES].as_tensor()[0].float().clamp_(0, 1)
            labels.add(k, native)
            if keep_probabilities:
                kept.append(native.numpy())
        stacked = np.stack(kept) if keep_probabilities else None
        return self._prediction(labels.label.numpy(), stacked, reference, probabilities)

    def _prediction(
        self, label: np.ndarray, kept: np.ndarray | None, reference: nib.Nifti1Image, probabilities: torch.Tensor
    ) -> Prediction:
        """A :class:`Prediction` of either path back to the scan's grid, with the uncertainty of each structure's
        model-space ``probabilities``: every prediction carries it, whichever path made it."""
        uncertainty = [structure_uncertainty(p, self.settings.threshold) for p in probabilities]
        return Prediction(label, kept, reference, self.structures, uncertainty)

    def __call__(self, path: str | Path, keep_probabilities: bool = False) -> Prediction:
        """Predict one scan; the result lies on the scan's own grid (shape and affine)."""
        reference = load_scan_image(path)
        data = self.preprocess(path)
        return self.finish(data, self.model_space_probabilities(data), reference, keep_probabilities)
