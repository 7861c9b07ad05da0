"""Adapter files: only the trained tensors, tied to the exact base checkpoint they were trained on."""

from __future__ import annotations

from pathlib import Path

from fsseg.adapters.base import AdaptedModel, Composition, adapt_model, get_method
from fsseg.checkpoint import (load_torch_file, load_weights, model_from_checkpoint, read_checkpoint, save_checkpoint,
                              sha256_file)
from fsseg.config import from_dict, to_dict
from fsseg.data.transforms import Preprocessing
from fsseg.errors import DataError, FssegError
from fsseg.templates import Template

KIND = "adapter"
ADAPTER_KEYS = ("method", "options", "structures", "base_sha256", "preprocessing", "state_dict")


def save_adapter(path: str | Path, adapted: AdaptedModel, method: str, options, base_checkpoint: str | Path,
                 preprocessing: Preprocessing, extra: dict | None = None) -> Path:
    """Write the trained tensors of ``adapted`` with what is needed to rebuild it on its base checkpoint."""
    trainable, total = adapted.parameter_counts()
    return save_checkpoint(path, {
        "kind": KIND, "method": method, "options": to_dict(options), "structures": adapted.structures,
        "base_sha256": sha256_file(base_checkpoint), "preprocessing": preprocessing.to_dict(),
        "state_dict": adapted.trainable_state_dict(), "parameters": {"trainable": trainable, "total": total},
        **(extra or {}),
    })


def read_adapter(path: str | Path) -> dict:
    """An adapter file's contents; DataError when it is missing, damaged or not an adapter."""
    payload = load_torch_file(path, "adapter file")
    if not isinstance(payload, dict) or payload.get("kind") != KIND:
        raise DataError(f"{path}: not an fsseg adapter file")
    missing = [key for key in ADAPTER_KEYS if key not in payload]
    if missing:
        raise DataError(f"{path}: adapter file lacks {', '.join(missing)}")
    if not isinstance(payload["structures"], list) or not payload["structures"] \
            or not all(isinstance(s, str) for s in payload["structures"]):
        raise DataError(f"{path}: adapter file's 'structures' must be a non-empty list of names")
    return payload


def load_adapted_model(adapter_path: str | Path, checkpoint_path: str | Path) -> tuple[AdaptedModel, Preprocessing, dict]:
    """Rebuild an adapted model from its base checkpoint and adapter file.

    Raises:
        DataError: the adapter was trained on another checkpoint, or its tensors do not fit.
    """
    adapter = read_adapter(adapter_path)
    if adapter["base_sha256"] != sha256_file(checkpoint_path):
        raise DataError(f"{adapter_path}: was trained on another base checkpoint than {checkpoint_path} "
                        f"(sha256 {adapter['base_sha256'][:12]}...); use the checkpoint it was trained on")
    payload = read_checkpoint(checkpoint_path)
    base = model_from_checkpoint(payload, str(checkpoint_path))
    method = get_method(adapter["method"])
    options = from_dict(method.config_cls, adapter["options"], where=f"{adapter_path}: options")
    composition = from_dict(Composition, adapter.get("compose") or {}, where=f"{adapter_path}: compose")
    adapted = adapt_model(base, Template.from_dict(payload["template"]), adapter["structures"], adapter["method"], options,
                          composition)
    result = load_weights(adapted, adapter["state_dict"], str(adapter_path))
    trained = {name for name, p in adapted.named_parameters() if p.requires_grad}
    if result.unexpected_keys or trained - set(adapter["state_dict"]):
        raise DataError(f"{adapter_path}: tensors do not fit method '{adapter['method']}' on this checkpoint")
    try:
        preprocessing = Preprocessing.from_dict(adapter["preprocessing"])
    except (TypeError, AttributeError, FssegError) as error:
        raise DataError(f"{adapter_path}: adapter's preprocessing is malformed ({error})") from None
    return adapted, preprocessing, adapter
