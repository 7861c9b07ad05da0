"""A frozen encoder's features of whole scans, computed once and kept on disk, cropped where they line up.

For a network that splits at its encoder (``backbone.encode`` / ``backbone.decode`` / ``backbone.strides``: the
I3ResNet), training that leaves the encoder frozen (decoder pretraining, ``ft-last``) needs the encoder's
output only, never its gradient. So each scan is padded to a multiple of the encoder's deepest stride, encoded
once as a whole and its skips kept as float16 files (float32 beyond its range); a training crop then reads the
skips at positions aligned to that stride and only the decoder runs. The encoder is convolutional with batch norm
in eval mode, so a crop of the whole-scan skips is what it computes on that region with its full context (a crop
encoded alone would see zero padding at its borders instead).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import numpy as np
import torch
from monai.transforms import DivisiblePad, SpatialPad

from fsseg.cache import cache_key, discard_damaged
from fsseg.checkpoint import NonFiniteWeights
from fsseg.files import atomic_path
from fsseg.models import SegmentationModel

log = logging.getLogger("fsseg.features")
DONE = "done.json"


class SplitsAtEncoder(Protocol):
    """A backbone that offers its encoder's skips and a decoder over them (the I3ResNet U-Net)."""

    strides: Sequence[Sequence[int]]

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]: ...

    def decode(self, skips: list[torch.Tensor]) -> torch.Tensor: ...


def split_backbone(model: SegmentationModel) -> SplitsAtEncoder:
    """``model``'s backbone as one that splits at its encoder (check :func:`splits_at_encoder` first)."""
    return cast(SplitsAtEncoder, model.backbone)


def splits_at_encoder(model: SegmentationModel) -> bool:
    """Whether the network offers ``encode``/``decode`` around its encoder (what the cache needs)."""
    return all(hasattr(model.backbone, name) for name in ("encode", "decode", "strides"))


def pad_for_encoder(array: torch.Tensor, strides: Sequence[Sequence[int]], roi: Sequence[int]) -> torch.Tensor:
    """(C, X, Y, Z) zero-padded at the end to at least ``roi``, then to a multiple of the deepest stride, per axis
    (the roi is itself such a multiple)."""
    padded = SpatialPad(roi, method="end")(array)
    return DivisiblePad(strides[-1], method="end")(padded).as_subclass(torch.Tensor)


def _storable(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Floats as float16, unless that would overflow (activations beyond 65504): those stay float32."""
    if not tensor.is_floating_point():
        return tensor
    if not torch.isfinite(tensor).all():
        raise NonFiniteWeights(f"the encoder's {name} features are not finite: the encoder's weights are broken")
    if tensor.abs().max() > torch.finfo(torch.float16).max:
        log.info(f"encoder {name} features exceed the float16 range: kept as float32")
        return tensor.float()
    return tensor.to(torch.float16)


@dataclass
class EncodedScan:
    """One scan's cached skips (memory-mapped; level 0 is the padded image), the extra arrays stored with them
    and their metadata."""

    levels: list[np.ndarray]
    strides: tuple[tuple[int, ...], ...]
    extras: dict[str, np.ndarray]
    meta: dict

    def crop(self, starts: Sequence[int], size: Sequence[int]) -> list[torch.Tensor]:
        """The (C, x, y, z) float32 skips of the crop at ``starts`` (multiples of the deepest stride) of ``size``."""
        skips = []
        for array, stride in zip(self.levels, self.strides):
            region = (slice(None),) + tuple(slice(a // k, (a + r) // k) for a, r, k in zip(starts, size, stride))
            skips.append(torch.from_numpy(np.array(array[region])).float())
        return skips


class EncoderCache:
    """Folder of encoded scans, one sub-folder each, keyed by the encoder's weights and the scan's content.

    Args:
        folder: where the scans' folders go.
        model: the model whose (frozen) encoder runs; in eval mode while it encodes.
        encoder_key: identifies the encoder's weights (e.g. the checkpoint's sha256 and its architecture).
    """

    def __init__(self, folder: Path, model: SegmentationModel, encoder_key: str) -> None:
        self.folder, self.model, self.encoder_key = Path(folder), model, encoder_key
        self.strides = tuple(tuple(s) for s in split_backbone(model).strides)

    def _folder(self, scan_key: str) -> Path:
        return self.folder / cache_key(self.encoder_key, scan_key)

    def load(self, scan_key: str) -> EncodedScan | None:
        """The scan's cached skips, or None when they were never completed (a kill leaves no marker)."""
        folder = self._folder(scan_key)
        if not (folder / DONE).is_file():
            return None
        try:
            meta = json.loads((folder / DONE).read_text())
            if "extras" not in meta:  # written before the cache named its extra arrays: encode again
                return None
            levels = [np.load(folder / "image.npy", mmap_mode="r")]
            levels += [np.load(folder / f"level{level}.npy", mmap_mode="r") for level in range(1, len(self.strides))]
            extras = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in meta["extras"]}
        except (ValueError, OSError, EOFError) as error:  # a damaged or deleted file (json errors are ValueErrors)
            discard_damaged(folder / DONE, error, "encoder features")
            return None
        return EncodedScan(levels, self.strides, extras, meta)

    @torch.no_grad()
    def encode(
        self,
        scan_key: str,
        image: torch.Tensor,
        extras: dict[str, torch.Tensor] | None = None,
        meta: dict | None = None,
        name: str = "",
    ) -> EncodedScan:
        """Encode a padded (1, X, Y, Z) image (:func:`pad_for_encoder`) and store its skips with ``extras``
        (arrays on the same grid, e.g. its labels) and ``meta``; the marker file is written last."""
        folder = self._folder(scan_key)
        folder.mkdir(parents=True, exist_ok=True)
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        skips = [skip.cpu() for skip in split_backbone(self.model).encode(image[None].float().to(device))]
        self.model.train(was_training)
        arrays = {"image": image} | {f"level{level}": skip[0] for level, skip in enumerate(skips) if level > 0}
        arrays |= extras or {}
        for key, tensor in arrays.items():
            with atomic_path(folder / f"{key}.npy") as tmp:
                np.save(tmp, _storable(tensor, key).numpy())
        with atomic_path(folder / DONE) as tmp:
            tmp.write_text(json.dumps({"shape": list(image.shape[1:]), "extras": sorted(extras or {})} | (meta or {})))
        stored = sum((folder / f"level{level}.npy").stat().st_size for level in range(1, len(skips)))
        log.info(
            f"cached the encoder features of {name or folder.name} ({tuple(image.shape[1:])}): {stored / 2**20:.0f} MB"
        )
        encoded = self.load(scan_key)
        assert encoded is not None  # its marker was just written
        return encoded
