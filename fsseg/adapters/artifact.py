"""Adapter files: only the trained tensors, tied to the exact base checkpoint they were trained on.

An adapter file is a safetensors file: the tensors, and in its header everything else as JSON (under ``fsseg``),
so that reading one executes no code and other tools can read it. Adapter files of earlier fsseg versions
(torch.save archives, ``.pt``) still load, with ``weights_only``.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fsseg.adapters.base import AdaptedModel, Composition, adapt_model, get_method
from fsseg.adapters.peft_methods import upgrade_lora_state
from fsseg.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    check_finite_weights,
    load_torch_file,
    load_weights,
    model_from_checkpoint,
    read_checkpoint,
    sha256_file,
    versions,
)
from fsseg.config import check_interval, from_dict, to_dict
from fsseg.errors import DataError, FssegError
from fsseg.files import atomic_path, require_file
from fsseg.inference.predictor import RECORDED
from fsseg.models.registry import check_roi
from fsseg.preprocessing import Preprocessing
from fsseg.templates import Template

KIND = "adapter"
SUFFIX = ".safetensors"
METADATA_KEY = "fsseg"
ADAPTER_KEYS = ("method", "options", "structures", "base_sha256", "preprocessing", "state_dict")


def save_adapter(
    path: str | Path,
    adapted: AdaptedModel,
    method: str,
    options,
    base_checkpoint: str | Path,
    preprocessing: Preprocessing,
    extra: dict | None = None,
) -> Path:
    """Write the trained tensors of ``adapted`` (safetensors, atomically) with what is needed to rebuild it on its
    base checkpoint (JSON in the header)."""
    trainable, total = adapted.parameter_counts()
    return write_adapter_file(
        path,
        {
            "kind": KIND,
            "method": method,
            "options": to_dict(options),
            "structures": adapted.structures,
            "base_sha256": sha256_file(base_checkpoint),
            "preprocessing": preprocessing.to_dict(),
            "state_dict": adapted.trainable_state_dict(),
            "parameters": {"trainable": trainable, "total": total},
            **(extra or {}),
        },
    )


def write_adapter_file(path: str | Path, payload: dict) -> Path:
    """``payload['state_dict']`` as safetensors tensors, the rest (plus format and versions) as JSON metadata,
    written atomically; never non-finite weights."""
    tensors = payload["state_dict"]
    check_finite_weights(tensors, str(path))
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": versions(),
        **{key: value for key, value in payload.items() if key != "state_dict"},
    }
    with atomic_path(path) as tmp:
        save_file(
            {name: t.contiguous() for name, t in tensors.items()},
            str(tmp),
            metadata={METADATA_KEY: json.dumps(metadata)},
        )
    return Path(path)


def is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian; safetensors caps it at
    100 MB) and the header's '{' (a truncated file still does, and is reported as such when read)."""
    with open(path, "rb") as handle:
        start = handle.read(9)
    return len(start) == 9 and start[8:] == b"{" and 2 <= struct.unpack("<Q", start[:8])[0] <= 100_000_000


def read_adapter_file(path: str | Path) -> dict:
    """The metadata and ``state_dict`` of an adapter file (safetensors, or an earlier version's torch archive).

    Raises:
        DataError: the file is missing, truncated or corrupt, or a safetensors file without fsseg's metadata.
    """
    path = require_file(path, "adapter file")
    if zipfile.is_zipfile(path) or not is_safetensors(path):
        payload = load_torch_file(path, "adapter file")
        if not isinstance(payload, dict):
            raise DataError(f"{path}: not an adapter file (it holds a {type(payload).__name__})")
        return payload
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise DataError(f"{path}: cannot read adapter file: truncated or corrupt ({error})") from None
    try:
        payload = json.loads(metadata[METADATA_KEY])
    except (KeyError, ValueError):
        raise DataError(f"{path}: a safetensors file without fsseg's metadata, not an fsseg adapter file") from None
    if not isinstance(payload, dict):
        raise DataError(f"{path}: its fsseg metadata is not an object")
    return {**payload, "state_dict": tensors}


def read_adapter(path: str | Path) -> dict:
    """An adapter file's contents; DataError when it is missing, damaged or not an adapter."""
    payload = read_adapter_file(path)
    if not isinstance(payload, dict) or payload.get("kind") != KIND:
        raise DataError(f"{path}: not an fsseg adapter file")
    missing = [key for key in ADAPTER_KEYS if key not in payload]
    if missing:
        raise DataError(f"{path}: adapter file lacks {', '.join(missing)}")
    if (
        not isinstance(payload["structures"], list)
        or not payload["structures"]
        or not all(isinstance(s, str) for s in payload["structures"])
    ):
        raise DataError(f"{path}: adapter file's 'structures' must be a non-empty list of names")
    check_inference_record(payload.get("inference"), path)
    return payload


def check_inference_record(record: object, path: str | Path) -> None:
    """The sliding-window settings an adapter was scored with, checked as fsseg-predict checks its options, so that
    an impossible value is refused at load and not in every case later."""
    if record is None:  # files of versions that kept no record
        return
    if not isinstance(record, dict) or not set(record) <= set(RECORDED):
        raise DataError(f"{path}: its recorded inference settings must be an object of {', '.join(RECORDED)}")
    overlap = record.get("overlap")
    if overlap is not None:
        if isinstance(overlap, bool) or not isinstance(overlap, (int, float)):
            raise DataError(f"{path}: its recorded overlap must be a number, got {overlap!r}")
        check_interval(overlap, "[0, 1)", f"{path}: its recorded overlap")
    flags = [name for name in RECORDED if name != "overlap" and not isinstance(record.get(name, False), bool)]
    if flags:
        raise DataError(f"{path}: its recorded {flags[0]} must be true or false, got {record[flags[0]]!r}")


def load_adapted_model(
    adapter_path: str | Path, checkpoint_path: str | Path
) -> tuple[AdaptedModel, Preprocessing, dict]:
    """Rebuild an adapted model from its base checkpoint and adapter file.

    Raises:
        DataError: the adapter was trained on another checkpoint, or its tensors do not fit.
    """
    adapter = read_adapter(adapter_path)
    if adapter["base_sha256"] != sha256_file(checkpoint_path):
        raise DataError(
            f"{adapter_path}: was trained on another base checkpoint than {checkpoint_path} "
            f"(sha256 {adapter['base_sha256'][:12]}...); use the checkpoint it was trained on"
        )
    payload = read_checkpoint(checkpoint_path)
    base = model_from_checkpoint(payload, str(checkpoint_path))
    method = get_method(adapter["method"])
    options: Any = from_dict(method.config_cls, adapter["options"], where=f"{adapter_path}: options")
    composition = from_dict(Composition, adapter.get("compose") or {}, where=f"{adapter_path}: compose")
    adapted = adapt_model(
        base, Template.from_dict(payload["template"]), adapter["structures"], adapter["method"], options, composition
    )
    state = upgrade_lora_state(adapter["state_dict"])  # a LoRA of fsseg 0.1 in PEFT's names
    result = load_weights(adapted, state, str(adapter_path))
    trained = {name for name, p in adapted.named_parameters() if p.requires_grad}
    if result.unexpected_keys or trained - set(state):
        raise DataError(f"{adapter_path}: tensors do not fit method '{adapter['method']}' on this checkpoint")
    try:
        preprocessing = Preprocessing.from_dict(adapter["preprocessing"])
        check_roi(payload["arch"]["name"], preprocessing.roi)
    except (TypeError, AttributeError, FssegError) as error:
        raise DataError(f"{adapter_path}: adapter's preprocessing is malformed ({error})") from None
    return adapted, preprocessing, adapter
