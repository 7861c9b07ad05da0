"""``fsseg-import-checkpoint --format nnunet``: an nnU-Net v2 results folder as an fsseg checkpoint.

A results folder (``Dataset003_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres``, TotalSegmentator's included) holds
``plans.json``, ``dataset.json`` and ``fold_N/checkpoint_final.pth``. From them:

* the network, built by dynamic-network-architectures from the configuration's ``architecture`` (or, in plans
  written before nnU-Net 2.4, from ``UNet_class_name`` and its sizes), loaded strictly;
* the head: nnU-Net's softmax over background + K classes becomes K per-structure logits, class minus
  background, so the label map (each voxel's most probable structure whose probability passes 0.5) is nnU-Net's
  argmax; a structure's probability is then P(k) / (P(k) + P(background));
* the preprocessing: nnU-Net does not reorient, it reads the arrays as SimpleITK stores them (z, y, x), so the
  orientation is the training images' (``--orientation``, RAS for TotalSegmentator) in that axis order; the
  spacing and patch size of the configuration; CT normalisation (clip to the 0.5 and 99.5 percentiles of the
  training foreground, then z-score) as fsseg's window plus the backbone's input scaling.

Not reproduced: nnU-Net's third-order resampling (fsseg resamples linearly) and its test-time mirroring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fsseg.checkpoint import load_torch_file, sha256_file
from fsseg.errors import ConfigError, DataError
from fsseg.models import create_model
from fsseg.preprocessing import Preprocessing
from fsseg.templates import Template, canonical_name

CHECKPOINT = "checkpoint_final.pth"
CT_NORMALIZATION = "CTNormalization"
# Plans written before nnU-Net 2.4 name the network and its sizes; these are the layers nnU-Net then used.
LEGACY_LAYERS = {
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
    "conv_bias": True,
}
LEGACY_CLASSES = {
    "PlainConvUNet": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "ResidualEncoderUNet": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
}
# nnU-Net's training log holds numpy scalars: data, not code, so they may be unpickled (under numpy 1's module
# name too, which numpy 2 renamed).
_MULTIARRAY = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # type: ignore[attr-defined]
NUMPY_SCALARS = [
    (_MULTIARRAY.scalar, "numpy.core.multiarray.scalar"),
    _MULTIARRAY.scalar,
    np.dtype,
    type(np.dtype(np.float64)),
    type(np.dtype(np.float32)),
    type(np.dtype(np.int64)),
]


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: not found; an nnU-Net results folder holds plans.json, dataset.json and fold_N/")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: malformed JSON at line {error.lineno}: {error.msg}") from None


def configuration(plans: dict, name: str, where: Path, chain: tuple[str, ...] = ()) -> dict:
    """The named configuration of ``plans``, with what it inherits.

    Raises:
        DataError: no such configuration, one that is not an object, or an inheritance cycle.
    """
    configurations = plans.get("configurations") if isinstance(plans, dict) else None
    if not isinstance(configurations, dict):
        raise DataError(f"{where}: plans.json has no 'configurations' object")
    if name in chain:
        raise DataError(f"{where}: configurations inherit in a cycle: {' -> '.join((*chain, name))}")
    if name not in configurations:
        raise DataError(f"{where}: plans.json has no configuration '{name}' (it has {', '.join(configurations)})")
    if not isinstance(configurations[name], dict):
        raise DataError(f"{where}: configuration '{name}' is not an object")
    config = dict(configurations[name])
    parent = config.pop("inherits_from", None)
    return {**configuration(plans, parent, where, (*chain, name)), **config} if parent else config


def architecture(config: dict, where: Path) -> tuple[str, dict, list[str]]:
    """(network class, keyword arguments, the arguments that name classes) of a configuration.

    Raises:
        DataError: the configuration names no network fsseg can build, or describes it with missing keys or values
            of the wrong type.
    """
    try:
        return _architecture(config, where)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise DataError(
            f"{where}: the configuration's network is described with missing or malformed values "
            f"({type(error).__name__}: {error})"
        ) from None


def _architecture(config: dict, where: Path) -> tuple[str, dict, list[str]]:
    if "architecture" in config:
        spec = config["architecture"]
        return spec["network_class_name"], dict(spec["arch_kwargs"]), list(spec.get("_kw_requires_import", []))
    if "UNet_class_name" not in config:
        raise DataError(f"{where}: the configuration names no network (neither 'architecture' nor 'UNet_class_name')")
    name = config["UNet_class_name"]
    if name not in LEGACY_CLASSES:
        raise DataError(f"{where}: network '{name}' is not one fsseg can build (only {', '.join(LEGACY_CLASSES)})")
    stages = len(config["conv_kernel_sizes"])
    kwargs = {
        "n_stages": stages,
        "kernel_sizes": config["conv_kernel_sizes"],
        "strides": config["pool_op_kernel_sizes"],
        "features_per_stage": [
            min(config["UNet_base_num_features"] * 2**i, config["unet_max_num_features"]) for i in range(stages)
        ],
        "n_conv_per_stage": config["n_conv_per_stage_encoder"],
        "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"],
        **LEGACY_LAYERS,
    }
    return LEGACY_CLASSES[name], kwargs, ["conv_op", "norm_op", "dropout_op", "nonlin"]


def structures(dataset: dict, where: Path) -> list[str]:
    """The structure names of classes 1..K, in class order.

    Raises:
        DataError: region-based labels, an ignore label, or ids that are not 0..K.
    """
    labels = dataset.get("labels", {})
    if any(not isinstance(value, int) for value in labels.values()):
        raise DataError(
            f"{where}: region-based labels (a class made of several ids) have no per-structure head "
            "fsseg can map; only plain label ids are imported"
        )
    if "ignore" in labels:
        raise DataError(f"{where}: an 'ignore' label is not supported")
    ids = sorted(labels.values())
    if ids != list(range(len(ids))) or not ids:
        raise DataError(f"{where}: label ids must be 0..K with 0 the background, got {ids}")
    names = [canonical_name(name) for name, _ in sorted(labels.items(), key=lambda item: item[1])][1:]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # two heads for one structure: its masks and scores would take one of them silently
        raise DataError(f"{where}: labels name {', '.join(repeated)} under more than one id (aliases included)")
    return names


def preprocessing(
    plans: dict, config: dict, dataset: dict, orientation: str, where: Path
) -> tuple[Preprocessing, float, float]:
    """fsseg's preprocessing for a configuration, with the backbone's input scale and shift."""
    channels = dataset.get("channel_names", dataset.get("modality", {}))
    if len(channels) != 1:
        raise DataError(f"{where}: the model takes {len(channels)} input channels; fsseg segments single-channel CT")
    schemes = config.get("normalization_schemes", [])
    if schemes != [CT_NORMALIZATION]:
        raise DataError(f"{where}: normalisation {schemes} is not nnU-Net's CT normalisation; fsseg imports CT models")
    stats = plans["foreground_intensity_properties_per_channel"]["0"]
    low, high = float(stats["percentile_00_5"]), float(stats["percentile_99_5"])
    mean, std = float(stats["mean"]), max(float(stats["std"]), 1e-8)
    transpose = plans.get("transpose_forward", [0, 1, 2])
    stored = Preprocessing(orientation=orientation).orientation[::-1]  # SimpleITK's array axes: z, y, x
    pre = Preprocessing(
        orientation="".join(stored[axis] for axis in transpose),
        spacing=tuple(config["spacing"]),
        hu_window=(low, high),
        roi=tuple(config["patch_size"]),
        crop_foreground=False,
    )
    return pre, (high - low) / std, (low - mean) / std


def read_weights(path: Path, unsafe: bool) -> dict[str, torch.Tensor]:
    """The network weights of an nnU-Net checkpoint, without the prefixes of DDP and torch.compile."""
    with torch.serialization.safe_globals(NUMPY_SCALARS):
        payload = load_torch_file(
            path, "nnU-Net checkpoint", unsafe, "" if unsafe else "; if you trust the file's source, add --unsafe-load"
        )
    weights = payload.get("network_weights") if isinstance(payload, dict) else None
    if not isinstance(weights, dict):
        raise DataError(f"{path}: no 'network_weights' in it; not an nnU-Net v2 checkpoint")
    return {key.removeprefix("module.").removeprefix("_orig_mod."): value for key, value in weights.items()}


def results_configuration(folder: Path) -> str:
    """The configuration a results folder was trained with: its name is Trainer__Plans__Configuration."""
    parts = folder.resolve().name.split("__")
    if len(parts) != 3:
        raise DataError(
            f"{folder}: not an nnU-Net results folder (its name should be Trainer__Plans__Configuration, "
            "like nnUNetTrainer__nnUNetPlans__3d_fullres)"
        )
    return parts[2]


def import_nnunet(
    folder: str | Path,
    fold: str = "0",
    checkpoint: str = CHECKPOINT,
    orientation: str = "RAS",
    unsafe: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """The fsseg checkpoint payload of an nnU-Net results folder.

    Raises:
        DataError: a file is missing or malformed, the model is not a single-channel CT model with plain labels,
            or its weights do not fit the network its plans describe (naming the first tensor).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; --format nnunet takes an nnU-Net results folder")
    plans, dataset = read_json(folder / "plans.json"), read_json(folder / "dataset.json")
    name = results_configuration(folder)
    config = configuration(plans, name, folder / "plans.json")
    network_class, arch_kwargs, requires_import = architecture(config, folder / "plans.json")
    names = structures(dataset, folder / "dataset.json")
    try:
        pre, scale, shift = preprocessing(plans, config, dataset, orientation, folder)
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"{folder}: plans.json lacks what the preprocessing needs ({error})") from None
    weights_file = _weights_file(folder, fold, checkpoint)
    weights = read_weights(weights_file, unsafe)
    template = Template(
        name=f"nnunet-{folder.parent.name}", structures=tuple(names), ids=tuple(range(1, len(names) + 1))
    )
    settings = {"network_class": network_class, "arch_kwargs": arch_kwargs, "requires_import": requires_import}
    try:
        model = create_model("nnunet", num_classes=len(names), input_scale=scale, input_shift=shift, **settings)
    except ConfigError as error:
        raise DataError(f"{folder / 'plans.json'}: {error}") from None
    state = _fsseg_state(weights, model.state_dict(), weights_file, log)
    model.load_state_dict(state)
    _describe(template, name, fold, network_class, arch_kwargs, model.feature_channels, pre, orientation, log)
    return {
        "kind": "imported",
        "arch": model.arch,
        "template": template.to_dict(),
        "head_trained": True,
        "decoder_trained": True,
        "preprocessing": pre.to_dict(),
        "state_dict": model.state_dict(),
        "source": {
            "file": str(weights_file.resolve()),
            "sha256": sha256_file(weights_file),
            "format": "nnunet",
            "configuration": name,
            "fold": fold,
        },
    }


def _weights_file(folder: Path, fold: str, checkpoint: str) -> Path:
    """The fold's weights file, or a DataError naming the ones the folder holds."""
    weights_file = folder / f"fold_{fold}" / checkpoint
    if not weights_file.is_file():
        found = sorted(str(p.relative_to(folder)) for p in folder.glob("fold_*/*.pth"))
        raise DataError(
            f"{weights_file}: not found; this folder holds {', '.join(found) or 'no fold_N/*.pth'} "
            "(choose with --fold and --checkpoint-name)"
        )
    return weights_file


def _describe(
    template: Template,
    name: str,
    fold: str,
    network_class: str,
    arch_kwargs: dict,
    feature_channels: int,
    pre: Preprocessing,
    orientation: str,
    log: Callable[[str], None],
) -> None:
    """Say what was imported and what of nnU-Net's inference fsseg does not reproduce."""
    log(
        f"nnU-Net {template.name.removeprefix('nnunet-')}, configuration {name}, fold {fold}: "
        f"{network_class.rsplit('.', 1)[-1]}, {arch_kwargs['n_stages']} stages, {feature_channels} feature "
        f"channels; {len(template)} structures: {', '.join(template.structures)}"
    )
    log(
        "head: nnU-Net's softmax over background + classes as per-structure logits (class minus background): the "
        "label map is nnU-Net's argmax; a structure's probability is P(k) / (P(k) + P(background))"
    )
    log(
        f"preprocessing: orientation {pre.orientation} (training images in {orientation}, read as SimpleITK "
        f"stores them), spacing {'x'.join(f'{s:g}' for s in pre.spacing)} mm, windows {'x'.join(map(str, pre.roi))}, "
        f"CT normalisation: HU clipped to [{pre.hu_window[0]:g}, {pre.hu_window[1]:g}], then z-scored in the backbone; "
        "not reproduced: nnU-Net's third-order resampling (fsseg resamples linearly) and test-time mirroring"
    )


def _fsseg_state(weights: dict, own: dict, source: Path, log: Callable[[str], None]) -> dict:
    """nnU-Net's weights in the fsseg model's keys: the network under ``backbone.net.``, the last segmentation
    layer as the head; deep-supervision layers left out. Strict: every tensor of the network must be there."""
    seg_layers = sorted({int(k.split(".")[2]) for k in weights if k.startswith("decoder.seg_layers.")})
    if not seg_layers:
        raise DataError(f"{source}: no segmentation layer (decoder.seg_layers.*) in the weights")
    last = f"decoder.seg_layers.{seg_layers[-1]}."
    weight, bias = weights[last + "weight"], weights[last + "bias"]
    state = {f"backbone.net.{k}": v for k, v in weights.items() if not k.startswith("decoder.seg_layers.")}
    state["head.weight"], state["head.bias"] = weight[1:] - weight[:1], bias[1:] - bias[:1]
    problems: dict[str, list[str]] = {
        "missing": [k for k in own if k not in state],
        "mismatched": [
            f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ],
        "unexpected": [k for k in state if k not in own],
    }
    loaded = len(own) - len(problems["missing"]) - len(problems["mismatched"])
    log(
        f"tensors: {loaded} loaded, {len(problems['missing'])} missing, {len(problems['unexpected'])} "
        f"unexpected, {len(problems['mismatched'])} of the wrong shape; {len(seg_layers) - 1} deep-supervision "
        "layer(s) left out"
    )
    for kind, keys in problems.items():
        if keys:
            first = keys[0].removeprefix("backbone.net.")
            raise DataError(
                f"{source}: {len(keys)} tensor(s) {kind.replace('mismatched', 'of the wrong shape')}"
                f" for the network plans.json describes, e.g. {first}"
            )
    return {key: state[key] for key in own}
