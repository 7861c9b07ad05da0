"""fsseg checkpoints: weights plus everything needed to use them alone.

A checkpoint is a ``torch.save``d dict with ``format: fsseg-checkpoint`` and: ``arch`` (registry name +
kwargs), ``template`` (structure names/ids of the head's channels), ``preprocessing`` (orientation, spacing,
HU window, roi), ``state_dict``, ``versions`` and, for resumable training, optimizer/scheduler/scaler states,
epoch/step and RNG states. It is written atomically: a crash never leaves a half-written file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import platform
import random
import re
import zipfile
from pathlib import Path

import monai
import numpy as np
import torch

import fsseg
from fsseg.errors import DataError, FssegError
from fsseg.files import atomic_path, require_file, write_failed
from fsseg.models import SegmentationModel, create_model
from fsseg.preprocessing import Preprocessing
from fsseg.templates import Template

FORMAT = "fsseg-checkpoint"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    """Versions of the software that wrote a checkpoint or a run, and the CPU instruction sets it ran on."""
    return {
        "fsseg": fsseg.__version__,
        "monai": monai.__version__,
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu": cpu_instruction_sets(),
    }


def cpu_instruction_sets() -> str:
    """The vector instruction sets torch's CPU kernels may use here, e.g. ``x86_64 AVX512 avx512_bf16 amx``.

    oneDNN picks its convolution kernels by what the CPU offers, and their sums differ: float32 between AVX2 and
    AVX-512, bfloat16 also between AMX and none. So two hosts can train different weights from one seed.
    ``ONEDNN_MAX_CPU_ISA`` caps the choice and is recorded when set.
    """
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
    found = [name for name, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()]
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return " ".join(
        [
            platform.machine(),
            torch.backends.cpu.get_cpu_capability(),
            *found,
            *([f"ONEDNN_MAX_CPU_ISA={cap}"] if cap else []),
        ]
    )


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, identifying the exact base checkpoint an adapter was trained on."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) random states, in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` recorded."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(
        (numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class NonFiniteWeights(DataError):
    """Training diverged: a tensor about to be saved holds NaN or infinite values."""


def check_finite_weights(state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`NonFiniteWeights` naming the first tensor of ``state_dict`` with NaN or infinite values."""
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteWeights(
                f"{what}: tensor {name} holds NaN or infinite values (training diverged; "
                "check the input scans, or lower the learning rate); nothing was saved"
            )


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` (plus format and versions) atomically to ``path``; never one with non-finite weights."""
    check_finite_weights(payload.get("state_dict", {}), str(path))
    with atomic_path(path) as tmp:
        save_torch_file({"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(), **payload}, tmp)
    return Path(path)


def save_torch_file(data: object, path: str | Path) -> None:
    """``torch.save``, its failures to write (a full disk ends in a RuntimeError of its zip writer) as one line."""
    try:
        torch.save(data, path)
    except (OSError, RuntimeError) as error:
        raise write_failed(path, error) from None


# What only resuming a training run needs: a checkpoint without it is the file to share or ship.
TRAINING_STATE = ("optimizer", "scheduler", "scaler", "rng", "history")


def save_model_file(source: str | Path, path: str | Path) -> Path:
    """Write ``source``'s model (weights, architecture, template, preprocessing, config) without its training state:
    a third of a training checkpoint's size for an AdamW run, and still a checkpoint every command reads."""
    payload = read_checkpoint(source)
    kept = {key: value for key, value in payload.items() if key not in TRAINING_STATE + ("format", "versions")}
    return save_checkpoint(path, {**kept, "kind": "model", "source_versions": payload.get("versions")})


def load_torch_file(path: str | Path, what: str = "checkpoint", unsafe: bool = False, hint: str = "") -> object:
    """``torch.load`` onto the CPU with one-line errors; only tensors and plain data unless ``unsafe``.

    ``hint`` is added only when a well-formed file was refused for holding other Python objects.

    Raises:
        DataError: the file is missing, unreadable, not a PyTorch file, truncated, or refused by ``weights_only``.
    """
    path = require_file(path, what)
    if not zipfile.is_zipfile(path) and not unsafe:
        with open(path, "rb") as handle:
            magic = handle.read(2)
        kind = "it holds gzip data, a NIfTI perhaps" if magic == b"\x1f\x8b" else "torch.save writes zip archives"
        raise DataError(f"{path}: cannot read {what}: truncated, or not a PyTorch file ({kind})")
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except pickle.UnpicklingError as error:
        refused = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(error), re.IGNORECASE)
        if refused and re.search(r"whose module \S+ is blocked", str(error)):  # os, subprocess, builtins.exec ...
            raise DataError(
                f"{path}: {what} holds code, a call to {refused.group(1)}, that unpickling would run; "
                "it is never loaded"
            ) from None
        if refused:
            raise DataError(
                f"{path}: {what} holds a Python object of type {refused.group(1)} besides tensors; "
                f"it is not loaded because unpickling it could run code{hint}"
            ) from None
        raise DataError(f"{path}: cannot read {what}, its data is damaged (UnpicklingError)") from None
    except Exception as error:  # torch raises many types for damaged zip/pickle data
        raise DataError(
            f"{path}: cannot read {what}, the file is truncated or corrupt ({type(error).__name__})"
        ) from None


def read_checkpoint(path: str | Path) -> dict:
    """Load an fsseg checkpoint onto the CPU.

    Raises:
        DataError: missing, truncated or corrupt file, or a file that is not an fsseg checkpoint.
    """
    payload = load_torch_file(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(f"{path}: not an fsseg checkpoint (published weights must be converted first)")
    missing = [key for key in ("arch", "template", "preprocessing", "state_dict") if key not in payload]
    if missing:
        raise DataError(f"{path}: checkpoint lacks {', '.join(missing)}")
    arch = payload["arch"]
    if not (isinstance(arch, dict) and isinstance(arch.get("name"), str) and isinstance(arch.get("kwargs"), dict)):
        raise DataError(f"{path}: checkpoint's 'arch' must be {{'name': ..., 'kwargs': {{...}}}}, got {arch!r:.80}")
    try:
        Template.from_dict(payload["template"])
        Preprocessing.from_dict(payload["preprocessing"])
    except (KeyError, TypeError, ValueError, AttributeError, FssegError) as error:
        raise DataError(
            f"{path}: checkpoint's template or preprocessing is malformed ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(payload["state_dict"], dict):
        raise DataError(f"{path}: checkpoint's 'state_dict' is not a mapping of tensors")
    return payload


def head_trained(payload: dict) -> bool:
    """False for a checkpoint whose head was not carried over from its source (imported backbones)."""
    return bool(payload.get("head_trained", True))


def decoder_trained(payload: dict) -> bool:
    """False for a checkpoint imported from an encoder published alone (its decoder is initialisation)."""
    return bool(payload.get("decoder_trained", True))


def load_weights(model: torch.nn.Module, state_dict: dict, source: str):
    """``load_state_dict(strict=False)`` after checking every tensor it loads against the model: its shape, its
    dtype (fsseg writes the model's own; another one, even of the same size, would be converted into other values)
    and finite values (NaN weights would give empty masks without an error).

    Raises:
        DataError: naming the first tensor that does not fit (e.g. a head for another template).
    """
    own = model.state_dict()
    for name, tensor in state_dict.items():
        if name not in own:
            continue
        if not isinstance(tensor, torch.Tensor) or tensor.shape != own[name].shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise DataError(f"{source}: tensor {name} has shape {shape}, the model expects {tuple(own[name].shape)}")
        if tensor.dtype != own[name].dtype:
            raise DataError(
                f"{source}: tensor {name} is {tensor.dtype}, the model expects {own[name].dtype}; the "
                "file is damaged or was not written by fsseg"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DataError(
                f"{source}: tensor {name} holds NaN or infinite values; the file is damaged or comes "
                "from a diverged run, and is not used"
            )
    return model.load_state_dict(state_dict, strict=False)


def model_from_checkpoint(payload: dict, source: str = "checkpoint") -> SegmentationModel:
    """Rebuild the model a checkpoint describes and load its weights strictly.

    Raises:
        DataError: the architecture is unknown or its tensors do not fit it (naming the first one).
    """
    template = Template.from_dict(payload["template"])
    model = create_model(payload["arch"]["name"], num_classes=len(template), **payload["arch"]["kwargs"])
    result = load_weights(model, payload["state_dict"], source)
    if result.missing_keys or result.unexpected_keys:
        raise DataError(
            f"{source}: weights do not fit architecture '{payload['arch']['name']}' "
            f"({len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected tensors, "
            f"e.g. {(result.missing_keys or result.unexpected_keys)[0]})"
        )
    model.head_trained = head_trained(payload)
    model.decoder_trained = decoder_trained(payload)
    return model


def load_model(path: str | Path) -> tuple[SegmentationModel, Template, Preprocessing, dict]:
    """A ready model from a checkpoint file, with its template and preprocessing."""
    payload = read_checkpoint(path)
    model = model_from_checkpoint(payload, str(path))
    return model, Template.from_dict(payload["template"]), Preprocessing.from_dict(payload["preprocessing"]), payload
