"""Preprocessing as MONAI dictionary transforms, in one place.

Two pipelines share one deterministic core (load -> template labels -> orientation -> spacing -> HU window
-> foreground crop -> pad to roi):

* :func:`inference_transforms`: the core alone; invertible with ``monai.transforms.Invertd`` so
  predictions map back onto the input grid.
* :func:`train_transforms`: the core, then positive/negative crops of ``roi`` and light intensity
  augmentation, then one binary channel per template structure.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.networks.utils import one_hot
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    LoadImage,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from monai.utils import SpaceKeys

from fsseg.config import ranged
from fsseg.data.datalist import Case
from fsseg.data.io import check_finite, hu_problem, load_nifti_image, same_geometry
from fsseg.data.labels import LabelMap, structure_masks, task_mask, to_template_index
from fsseg.data.scans import load_volume
from fsseg.errors import ConfigError, DataError
from fsseg.files import is_nifti
from fsseg.preprocessing import Preprocessing
from fsseg.templates import Template

IMAGE, LABEL, TASK_MASK = "image", "label", "task_mask"
log = logging.getLogger("fsseg.data")
# LoadImage builds MONAI's GPU DICOM reader whenever pydicom is installed (highdicom brings it), which then warns,
# in a log line and a warning, that nvImageCodec is absent; fsseg never uses that reader (it reads NIfTI with
# LoadImage and DICOM series through SimpleITK).
_GPU_DICOM_READER_LOG = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
_GPU_DICOM_READER_LOG.setLevel(logging.ERROR)


@dataclass(frozen=True)
class Augmentation:
    """Random parts of the training pipeline."""

    crops_per_volume: int = ranged(2, "[1, inf)", help="roi-sized crops drawn from each volume a step")
    pos: float = ranged(1.0, help="weight of crops centred on a labelled structure (pos of pos + neg)")
    neg: float = ranged(1.0, help="weight of crops centred on background")
    intensity_shift: float = ranged(0.1, help="largest random shift of the windowed intensities")
    intensity_shift_prob: float = ranged(0.2, "[0, 1]", help="probability of that shift for each crop")

    def __post_init__(self) -> None:
        if self.pos + self.neg <= 0:
            raise ConfigError("augmentation.pos and augmentation.neg cannot both be 0: no crop could be drawn")


def case_item(case: Case, label_map: LabelMap | None = None) -> dict:
    """The dictionary a MONAI dataset consumes for ``case``."""
    item: dict = {"id": case.id, "dataset": case.dataset, IMAGE: str(case.image)}
    if case.label is not None:
        item[LABEL] = str(case.label)
        item["label_map"] = label_map.to_dict() if label_map is not None else {}
    elif case.labels:
        item["labels"] = {name: str(path) for name, path in case.labels.items()}
    return item


class LoadVolumed(MapTransform):
    """MONAI ``LoadImage`` (channel first, float32) that rejects, in one line, files that are not 3D, unreadable,
    on an implausible grid or with non-finite voxels, and warns when the image does not look like CT in HU.

    A scan of another format (a DICOM CT series folder, NRRD, MetaImage: :mod:`fsseg.data.scans`) is read into the
    MetaTensor a NIfTI file of the same grid gives: RAS affine, channel first."""

    def __init__(self, keys: Sequence[str], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        with warnings.catch_warnings():  # see _GPU_DICOM_READER_LOG
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            self._load = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=np.float32)

    def load(self, path: str) -> MetaTensor:
        if not is_nifti(path):  # a DICOM series, NRRD, MetaImage: read by its format (fsseg.data.scans)
            volume = load_volume(path, np.float32)
            affine = torch.as_tensor(volume.affine, dtype=torch.float64)
            meta = {
                "filename_or_obj": str(path),
                "original_affine": affine.clone(),
                "space": SpaceKeys.RAS,
                "spatial_shape": np.asarray(volume.array.shape),
                "original_channel_dim": "no_channel",
            }
            return MetaTensor(torch.from_numpy(volume.array)[None], affine=affine, meta=meta)
        load_nifti_image(path)
        try:
            volume = self._load(path)
        except Exception as error:  # truncated gzip, bad header: report the file, not the stack
            raise DataError(f"{path}: file is truncated or corrupt ({type(error).__name__}: {error})") from None
        if volume.ndim == 5:  # (1, x, y, z, 1): a 4D file with one volume
            volume = volume[..., 0]
        check_finite(volume, path)
        return volume

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], str):
                path, d[key] = d[key], self.load(d[key])
                problem = hu_problem(d[key], path) if key == IMAGE else None
                if problem:
                    log.warning(f"warning: {problem}")
        return d


class TemplateLabelsd(MapTransform):
    """Turn a case's annotation into a template index map (``label``) and its task mask (``task_mask``).

    Reads the multi-label file (``label`` + ``label_map``) or the per-structure masks (``labels``), checks they
    lie on the image's grid, splits joint left/right ids at the midline, and writes ``label`` as a
    (1, X, Y, Z) map with 0 for background and ``c + 1`` for template channel ``c``.
    """

    def __init__(self, template: Template, loader: LoadVolumed) -> None:
        super().__init__([LABEL], allow_missing_keys=True)
        self.template = template
        self.loader = loader

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        image = d[IMAGE]
        if LABEL in d and isinstance(d[LABEL], str):
            label_map = LabelMap.parse(d.pop("label_map"), source=d[LABEL])
            volume = self._load_on_grid(d[LABEL], image)
            array = volume[0].numpy()
            label_map.check_ids(array, d[LABEL])
            masks = structure_masks(array, label_map, volume.affine.numpy(), image[0].numpy())
        elif "labels" in d:
            masks, volume = {}, None
            for name, path in d.pop("labels").items():
                volume = self._load_on_grid(path, image)
                masks[name] = volume[0].numpy() > 0
        else:
            return d
        if volume is None:  # an empty set of per-structure masks: no annotation
            return d
        index = to_template_index(masks, self.template, tuple(image.shape[1:]))
        meta = {k: v for k, v in volume.meta.items() if k != "affine"}
        d[LABEL] = MetaTensor(torch.from_numpy(index.astype(np.float32))[None], affine=volume.affine, meta=meta)
        d[TASK_MASK] = torch.from_numpy(task_mask(list(masks), self.template))
        return d

    def _load_on_grid(self, path: str, image: MetaTensor) -> MetaTensor:
        volume = self.loader.load(path)
        mismatch = same_geometry(volume.shape[1:], volume.affine.numpy(), image.shape[1:], image.affine.numpy())
        if mismatch:
            raise DataError(f"{path}: does not match its image {image.meta.get('filename_or_obj')}: {mismatch}")
        return volume


class RequireTissued(MapTransform):
    """Refuse an image with no voxel above the HU window's lower bound (all air, or no CT at all): the
    foreground crop would leave nothing to segment or to sample crops from."""

    def __init__(self) -> None:
        super().__init__([IMAGE])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        image = data[IMAGE]
        if not bool((image > 0).any()):
            raise DataError(
                f"{image.meta.get('filename_or_obj', 'image')}: no voxel lies above the HU window's "
                "lower bound (an all-air or blank scan); nothing to segment"
            )
        return dict(data)


class TemplateOneHotd(MapTransform):
    """(1, X, Y, Z) template index map -> (C, X, Y, Z) float binary channels, background dropped."""

    def __init__(self, num_channels: int) -> None:
        super().__init__([LABEL])
        self.num_channels = num_channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        d[LABEL] = one_hot(d[LABEL][None].long(), self.num_channels + 1, dim=1)[0, 1:].float()
        return d


CORE_TRANSFORMS = {
    cls.__name__: cls
    for cls in (
        LoadVolumed, Orientationd, Spacingd, ScaleIntensityRanged, RequireTissued, CropForegroundd, SpatialPadd
    )
}  # fmt: skip


def core_description(pre: Preprocessing, keys: Sequence[str], loaded: Sequence[str] | None = None) -> list:
    """The deterministic preprocessing of ``keys`` (image first; ``loaded``: those read from files, by default all)
    as (transform name, arguments) pairs: the one description that :func:`inference_transforms` builds and that
    :mod:`fsseg.export_bundle` writes into a bundle's config, names resolved in :data:`CORE_TRANSFORMS`."""
    keys = list(keys)
    modes = ["bilinear" if key == IMAGE else "nearest" for key in keys]
    optional = {"keys": keys, "allow_missing_keys": True}
    low, high = pre.hu_window
    steps: list[tuple[str, dict]] = [
        ("LoadVolumed", {"keys": list(loaded or keys), "allow_missing_keys": True}),
        ("Orientationd", {**optional, "axcodes": pre.orientation, "labels": None}),
        ("Spacingd", {**optional, "pixdim": list(pre.spacing), "mode": modes, "dtype": np.float32}),
        (
            "ScaleIntensityRanged",
            {"keys": IMAGE, "a_min": low, "a_max": high, "b_min": 0.0, "b_max": 1.0, "clip": True},
        ),
        ("RequireTissued", {}),
    ]
    if pre.crop_foreground:
        crop = {"source_key": IMAGE, "allow_smaller": True, "start_coord_key": None, "end_coord_key": None}
        steps.append(("CropForegroundd", {**optional, **crop}))
    steps.append(("SpatialPadd", {**optional, "spatial_size": list(pre.roi)}))
    return steps


def _core(pre: Preprocessing, keys: Sequence[str], template: Template | None) -> list:
    loaded = [IMAGE] + [k for k in keys if k != LABEL or template is None]
    steps: list = [CORE_TRANSFORMS[name](**arguments) for name, arguments in core_description(pre, keys, loaded)]
    if template is not None:  # the annotation, read into template channels on the image's grid
        steps.insert(1, TemplateLabelsd(template, steps[0]))
    return steps


def inference_transforms(
    pre: Preprocessing, keys: Sequence[str] = (IMAGE,), template: Template | None = None
) -> Compose:
    """Deterministic, invertible preprocessing of ``keys`` (image first; other keys are label maps).

    With ``template``, ``label`` is converted to a template index map (see :class:`TemplateLabelsd`);
    without it, label files keep their own ids.
    """
    return Compose(_core(pre, list(keys), template))


def train_transforms(pre: Preprocessing, template: Template, aug: Augmentation = Augmentation()) -> Compose:
    """Deterministic core + random ``roi`` crops (pos:neg) + intensity shift + template one-hot labels.

    Each call returns ``aug.crops_per_volume`` samples with ``image`` (1, *roi), ``label`` (C, *roi) and
    ``task_mask`` (C,).
    """
    keys = [IMAGE, LABEL]
    return Compose(
        _core(pre, keys, template)
        + [
            RandCropByPosNegLabeld(
                keys,
                label_key=LABEL,
                spatial_size=pre.roi,
                pos=aug.pos,
                neg=aug.neg,
                num_samples=aug.crops_per_volume,
                image_key=IMAGE,
                image_threshold=0,
            ),
            RandShiftIntensityd(IMAGE, offsets=aug.intensity_shift, prob=aug.intensity_shift_prob),
            TemplateOneHotd(len(template)),
            # Cached volumes come back as arrays: make every sample collate the same way.
            EnsureTyped([IMAGE, LABEL, TASK_MASK], data_type="tensor", track_meta=False),
        ]
    )
