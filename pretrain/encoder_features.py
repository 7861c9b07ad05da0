"""Pretraining a decoder on a frozen encoder's features, computed once per scan.

With ``model.freeze: [encoder]`` on a network that splits at its encoder (``backbone.encode`` /
``backbone.decode``: the I3ResNet), each training scan's encoder features are computed once over the whole
padded scan and kept as float16 files; every step then crops them at positions aligned to the encoder's
strides, and only the decoder and head run. The encoder is convolutional with batch norm in eval mode, so a
crop of the whole-scan features is what the encoder computes on that region with its full context (a crop
computed alone would see zero padding at its borders instead). The price: no augmentation but the crop.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.transforms import DivisiblePad, SpatialPad
from torch import nn

from fsseg.data.io import atomic_path
from fsseg.data.sampling import CropSampler
from fsseg.data.transforms import IMAGE, LABEL, TASK_MASK
from fsseg.models import SegmentationModel

log = logging.getLogger("fsseg.pretrain")
SKIPS = "skips"


def splits_at_encoder(model: SegmentationModel) -> bool:
    """Whether the network offers ``encode``/``decode`` around its encoder (what the cache needs)."""
    return all(hasattr(model.backbone, name) for name in ("encode", "decode", "strides"))


class DecoderHead(nn.Module):
    """The trained part of a model with a frozen encoder: encoder features (a list of crops) -> logits."""

    def __init__(self, model: SegmentationModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        return self.model.head(self.model.backbone.decode(skips))


def _padded(array: torch.Tensor, multiple: Sequence[int], minimum: Sequence[int]) -> torch.Tensor:
    """(C, X, Y, Z) zero-padded at the end to at least ``minimum``, then to a multiple of ``multiple``, per axis
    (``minimum`` is itself a multiple: the roi)."""
    padded = SpatialPad(minimum, method="end")(array)
    return DivisiblePad(multiple, method="end")(padded).as_subclass(torch.Tensor)


class EncoderFeatureDataset(torch.utils.data.Dataset):
    """Crops of the cached encoder features of preprocessed scans, with their one-hot labels and task masks.

    Args:
        scans: a dataset of preprocessed cases (``image`` (1, X, Y, Z), ``label`` (1, X, Y, Z) template index map,
            ``task_mask``), e.g. the cached deterministic preprocessing.
        keys: one content key per scan (what its preprocessed data depends on).
        model: the model whose frozen encoder is cached; ``encoder_key`` identifies its weights.
        folder: where the feature files go.
        roi: crop size in voxels (multiples of the encoder's deepest stride).
        crops, pos, neg: crops per scan and their foreground:background ratio.
        channels: the template's structure count (one-hot label channels).
    """

    def __init__(self, scans: torch.utils.data.Dataset, keys: Sequence[str], model: SegmentationModel,
                 encoder_key: str, folder: Path, roi: Sequence[int], crops: int, pos: float, neg: float,
                 channels: int) -> None:
        self.scans, self.keys, self.model = scans, list(keys), model
        self.encoder_key, self.folder = encoder_key, Path(folder)
        self.roi, self.crops, self.pos, self.neg, self.channels = tuple(roi), crops, pos, neg, channels
        self.strides = model.backbone.strides
        self.rng = np.random.RandomState(0)
        self._cases: dict[int, tuple[list[np.ndarray], np.ndarray, torch.Tensor, CropSampler]] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def set_random_state(self, seed: int) -> None:
        self.rng = np.random.RandomState(seed)

    def _folder(self, index: int) -> Path:
        digest = hashlib.sha1(json.dumps([self.encoder_key, self.keys[index]]).encode()).hexdigest()[:20]
        return self.folder / digest

    @torch.no_grad()
    def prepare(self, index: int) -> None:
        """Compute scan ``index``'s encoder features unless its files are complete (a kill leaves no marker)."""
        folder = self._folder(index)
        if (folder / "done.json").is_file():
            return
        data = self.scans[index]
        deepest = self.strides[-1]
        image = _padded(torch.as_tensor(data[IMAGE]).as_subclass(torch.Tensor).float(), deepest, self.roi)
        label = _padded(torch.as_tensor(data[LABEL]).as_subclass(torch.Tensor), deepest, self.roi)
        folder.mkdir(parents=True, exist_ok=True)
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        skips = [skip.cpu() for skip in self.model.backbone.encode(image[None].to(device))]
        self.model.train(was_training)
        arrays = {"image": image, "label": label.to(torch.uint8)} | {f"level{level}": skip[0] for level, skip in
                                                                     enumerate(skips) if level > 0}
        for name, tensor in arrays.items():
            with atomic_path(folder / f"{name}.npy") as tmp:
                np.save(tmp, tensor.to(torch.float16 if tensor.is_floating_point() else tensor.dtype).numpy())
        with atomic_path(folder / "done.json") as tmp:
            tmp.write_text(json.dumps({"task_mask": torch.as_tensor(data[TASK_MASK]).tolist(),
                                       "shape": list(image.shape[1:])}))
        log.info(f"cached the encoder features of scan {index + 1}/{len(self)} ({tuple(image.shape[1:])}): "
                 f"{sum(t.numel() for t in skips[1:]) * 2 / 2**20:.0f} MB")

    def _case(self, index: int):
        if index not in self._cases:
            self.prepare(index)
            folder = self._folder(index)
            levels = [np.load(folder / "image.npy", mmap_mode="r")]
            levels += [np.load(folder / f"level{level}.npy", mmap_mode="r") for level in range(1, len(self.strides))]
            label = np.load(folder / "label.npy")
            task_mask = torch.tensor(json.loads((folder / "done.json").read_text())["task_mask"])
            body = np.asarray(levels[0], dtype=np.float32)
            self._cases[index] = (levels, label, task_mask, CropSampler(label > 0, self.roi, self.pos, self.neg,
                                                                        body=body, align=self.strides[-1]))
        return self._cases[index]

    def __getitem__(self, index: int) -> list[dict]:
        levels, label, task_mask, sampler = self._case(index)
        samples = []
        for crop in sampler.slices(self.crops, self.rng):
            starts = [s.start for s in crop[1:]]
            skips = []
            for array, stride in zip(levels, self.strides):
                region = (slice(None),) + tuple(slice(a // k, (a + r) // k) for a, r, k in zip(starts, self.roi, stride))
                skips.append(torch.from_numpy(np.array(array[region])).float())
            index_map = torch.from_numpy(label[crop].astype(np.int64))
            target = torch.nn.functional.one_hot(index_map[0], self.channels + 1).movedim(-1, 0)[1:].float()
            samples.append({SKIPS: skips, LABEL: target, TASK_MASK: task_mask})
        return samples
