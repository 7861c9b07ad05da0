"""Pretraining a decoder on a frozen encoder's features, computed once per scan.

With ``model.freeze: [encoder]`` on a network that splits at its encoder (the I3ResNet), each training scan's
encoder features are computed once over the whole padded scan (:mod:`fsseg.training.encoder_cache`); every step
then crops them at positions aligned to the encoder's strides, and only the decoder and head run. The price: no
augmentation but the crop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fsseg.data.sampling import CropSampler
from fsseg.data.transforms import IMAGE, LABEL, TASK_MASK
from fsseg.models import SegmentationModel
from fsseg.training.encoder_cache import EncodedScan, EncoderCache, pad_for_encoder

log = logging.getLogger("fsseg.pretrain")
SKIPS = "skips"


class DecoderHead(nn.Module):
    """The trained part of a model with a frozen encoder: encoder features (a list of crops) -> logits."""

    def __init__(self, model: SegmentationModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        return self.model.head(self.model.backbone.decode(skips))


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

    def __init__(
        self,
        scans: torch.utils.data.Dataset,
        keys: Sequence[str],
        model: SegmentationModel,
        encoder_key: str,
        folder: Path,
        roi: Sequence[int],
        crops: int,
        pos: float,
        neg: float,
        channels: int,
    ) -> None:
        self.scans, self.keys = scans, list(keys)
        self.cache = EncoderCache(folder, model, encoder_key)
        self.roi, self.crops, self.pos, self.neg, self.channels = tuple(roi), crops, pos, neg, channels
        self.rng = np.random.RandomState(0)
        self._cases: dict[int, tuple[EncodedScan, np.ndarray, torch.Tensor, CropSampler]] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def set_random_state(self, seed: int) -> None:
        self.rng = np.random.RandomState(seed)

    def prepare(self, index: int) -> EncodedScan:
        """Scan ``index``'s encoder features, computed unless they are cached."""
        encoded = self.cache.load(self.keys[index])
        if encoded is not None:
            return encoded
        data = self.scans[index]
        strides = self.cache.strides
        image = pad_for_encoder(torch.as_tensor(data[IMAGE]).as_subclass(torch.Tensor).float(), strides, self.roi)
        label = pad_for_encoder(torch.as_tensor(data[LABEL]).as_subclass(torch.Tensor), strides, self.roi)
        return self.cache.encode(
            self.keys[index],
            image,
            {"label": label.to(torch.uint8)},
            {"task_mask": torch.as_tensor(data[TASK_MASK]).tolist(), "id": data["id"]},
            name=f"scan {index + 1}/{len(self)}",
        )

    def _case(self, index: int):
        if index not in self._cases:
            encoded = self.prepare(index)
            label = np.asarray(encoded.extras["label"])
            task_mask = torch.tensor(encoded.meta["task_mask"])
            body = np.asarray(encoded.levels[0], dtype=np.float32)
            sampler = CropSampler(label > 0, self.roi, self.pos, self.neg, body=body, align=self.cache.strides[-1])
            self._cases[index] = (encoded, label, task_mask, sampler)
        return self._cases[index]

    def __getitem__(self, index: int) -> list[dict]:
        encoded, label, task_mask, sampler = self._case(index)
        samples = []
        for crop in sampler.slices(self.crops, self.rng):
            skips = encoded.crop([s.start for s in crop[1:]], self.roi)
            index_map = torch.from_numpy(label[crop].astype(np.int64))
            target = torch.nn.functional.one_hot(index_map[0], self.channels + 1).movedim(-1, 0)[1:].float()
            samples.append({SKIPS: skips, LABEL: target, TASK_MASK: task_mask, "id": encoded.meta["id"]})
        return samples
