"""``fsseg-export-bundle``: a checkpoint (and adapters) as a MONAI bundle that segments a folder of NIfTI scans
with the masks fsseg-predict writes.

The bundle (``configs/metadata.json``, ``configs/inference.json``, ``models/model.pt``) runs with
``python -m monai.bundle run --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE --dataset_dir SCANS``.
Its preprocessing is MONAI's transforms with the checkpoint's settings, its postprocessing MONAI's ``Invertd`` and
``SaveImaged``; the network, the sliding window and the label map are fsseg's (:mod:`fsseg.bundle`), so fsseg must be
installed where the bundle runs (the metadata says which version).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import monai
import numpy as np
import torch

from fsseg import __version__
from fsseg.adapters import AdaptedModel
from fsseg.adapters.peft_methods import METHODS as PEFT_METHODS
from fsseg.adapters.peft_methods import merge_into_backbone
from fsseg.bundle import BundleNetwork
from fsseg.checkpoint import read_checkpoint, save_torch_file, sha256_file
from fsseg.data.transforms import CORE_TRANSFORMS, IMAGE, core_description
from fsseg.errors import DataError
from fsseg.files import new_mode, remove_leftovers
from fsseg.inference.predict import Model, build_model, inference_settings
from fsseg.inference.predictor import InferenceSettings
from fsseg.models import SegmentationModel
from fsseg.outputs import check_outputs
from fsseg.preprocessing import Preprocessing
from fsseg.vocabulary import BUNDLE_MASK_POSTFIX


def preprocessing_transforms(pre: Preprocessing) -> list[dict]:
    """fsseg's inference preprocessing as the transforms of a bundle config, written from the description
    fsseg-predict builds its pipeline from (fsseg's own loader and tissue check included: fsseg runs the bundle)."""
    return [
        {"_target_": _target(name), **_json_arguments(arguments)} for name, arguments in core_description(pre, [IMAGE])
    ]


def _target(name: str) -> str:
    """A transform's ``_target_``: MONAI's by its name, fsseg's by its module path."""
    module = CORE_TRANSFORMS[name].__module__
    return name if module.startswith("monai.") else f"{module}.{name}"


def _json_arguments(arguments: dict) -> dict:
    """Arguments as a bundle config writes them: numpy dtypes as ``$numpy.<name>`` expressions."""
    return {key: f"$numpy.{value.__name__}" if isinstance(value, type) else value for key, value in arguments.items()}


def postprocessing_transforms(settings: InferenceSettings) -> list[dict]:
    """Back to the scan's grid, thresholded into a label map, written as NIfTI next to the others."""
    return [
        {
            "_target_": "Invertd",
            "keys": "pred",
            "transform": "@preprocessing",
            "orig_keys": "image",
            "nearest_interp": False,
            "to_tensor": True,
        },
        {
            "_target_": "fsseg.bundle.LabelMapd",
            "keys": "pred",
            "threshold": settings.threshold,
            "largest_component": settings.largest_component,
        },
        {
            "_target_": "SaveImaged",
            "keys": "pred",
            "output_dir": "@output_dir",
            "output_postfix": BUNDLE_MASK_POSTFIX,
            "output_dtype": "$numpy.uint8",
            "resample": False,
            "separate_folder": False,
            "print_log": False,
        },
    ]


def inference_config(model: Model, network: dict, settings: InferenceSettings) -> dict:
    """``configs/inference.json``: segment every NIfTI scan of ``dataset_dir`` into ``output_dir``."""
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "input",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "datalist": "$[{'image': f} for f in sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*')))]",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "fsseg.bundle.BundleNetwork", **network},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing_transforms(model.preprocessing)},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            "_target_": "fsseg.bundle.BundleInferer",
            "preprocessing": model.preprocessing.to_dict(),
            "sw_batch_size": settings.sw_batch_size,
            **settings.record(),
        },
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing_transforms(settings)},
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$os.path.join(@bundle_root, 'models', 'model.pt')",
                "load_dict": {"model": "@network"},
                "strict": True,
                "map_location": "@device",
            }
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "run": ["$@evaluator.run()"],
    }


def metadata(model: Model, checkpoint: str, adapters: Sequence[str]) -> dict:
    """``configs/metadata.json``: versions, what goes in and what comes out."""
    labels = {"0": "background", **{str(i + 1): name for i, name in enumerate(model.structures)}}
    return {
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by fsseg-export-bundle {__version__}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"fsseg": __version__},
        "name": f"fsseg {', '.join(model.structures)}",
        "task": f"CT segmentation of {', '.join(model.structures)}",
        "description": "An fsseg checkpoint" + (" with its adapters" if adapters else "") + " as a MONAI bundle; "
        "its masks are fsseg-predict's.",
        "authors": "fsseg",
        "copyright": "",
        "data_source": "",
        "data_type": "nifti",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": list(model.preprocessing.roi),
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 1,
                    "spatial_shape": list(model.preprocessing.roi),
                    "dtype": "uint8",
                    "value_range": [0, len(model.structures)],
                    "is_patch_data": False,
                    "channel_def": labels,
                }
            },
        },
        "fsseg": {
            "checkpoint": {"file": str(Path(checkpoint).resolve()), "sha256": sha256_file(checkpoint)},
            "adapters": [{"file": str(Path(a).resolve()), "sha256": sha256_file(a)} for a in adapters],
            "preprocessing": model.preprocessing.to_dict(),
            "python": platform.python_version(),
        },
    }


def bundle_adapters(model: Model) -> tuple[list[dict], list[torch.nn.Module]]:
    """Each adapter as the bundle rebuilds it, and the model whose weights it loads. A LoRA, DoRA or IA3 is merged
    into a copy of its backbone: the bundle then holds a plain network (a fine-tuned one, ``ft``) that runs without
    PEFT and without the adapter layers' extra computation."""
    described, models = [], []
    for info, adapted in zip(model.adapters, model.models):
        spec = {key: info.get(key) for key in ("method", "options", "compose", "structures")}
        if info.get("method") in PEFT_METHODS:
            adapted = copy.deepcopy(adapted)
            merge_into_backbone(cast(AdaptedModel, adapted).base.backbone)
            spec.update(method="ft", options={}, compose={})
        described.append(spec)
        models.append(adapted)
    return described, models


def base_model(model: Model) -> SegmentationModel:
    """The checkpoint's model: the one model, or the base the adapters were trained on."""
    first = model.models[0]
    return cast(AdaptedModel, first).base if model.adapters else cast(SegmentationModel, first)


def export_bundle(
    model: Model, checkpoint: str, adapters: Sequence[str], settings: InferenceSettings, out: Path
) -> Path:
    """Write ``model`` (built by fsseg-predict's :func:`build_model` from ``checkpoint`` and ``adapters``) as a
    bundle into ``out``, a new folder filled under a temporary name and then renamed."""
    described, models = bundle_adapters(model) if model.adapters else ([], list(model.models))
    network = {
        "arch": base_model(model).arch,
        "template": read_checkpoint(checkpoint)["template"],
        "channels": model.channels,
        "structures": model.structures,
        "adapters": described,
    }
    bundle = BundleNetwork(**network)
    for rebuilt, loaded in zip(bundle.models, models):
        rebuilt.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)  # a killed export's staging folder
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
    os.chmod(staging, new_mode(0o777))  # mkdtemp makes it private; the bundle gets a new folder's permissions
    try:
        (staging / "configs").mkdir()
        (staging / "models").mkdir()
        save_torch_file(bundle.state_dict(), staging / "models" / "model.pt")
        (staging / "configs" / "inference.json").write_text(
            json.dumps(inference_config(model, network, settings), indent=1) + "\n"
        )
        (staging / "configs" / "metadata.json").write_text(
            json.dumps(metadata(model, checkpoint, adapters), indent=1) + "\n"
        )
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    adapters: Sequence[str | Path] = (),
    organs: Sequence[str] | None = None,
    inference: Mapping[str, Any] | None = None,
) -> Path:
    """Export ``checkpoint`` with ``adapters`` (their structures, or ``organs`` of them) as a MONAI bundle in the new
    folder ``out``. ``inference`` holds sliding-window settings (overlap, sw_batch_size, amp, cpu_bf16,
    largest_component); those not given come from the adapters' record, then the defaults.

    Raises:
        DataError: ``out`` exists or would hold an input; a checkpoint or adapter cannot be read.
    """
    out = Path(out)
    if out.exists():
        raise DataError(f"{out}: already exists; give a new folder for the bundle")
    files = [str(path) for path in adapters]
    check_outputs([out], [checkpoint, *files], option="--out")
    model = build_model(str(checkpoint), files, organs, torch.device("cpu"))
    return export_bundle(model, str(checkpoint), files, inference_settings(inference or {}, model.recorded), out)
