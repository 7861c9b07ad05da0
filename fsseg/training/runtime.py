"""Where a run executes: device choice, AMP, and torchrun's distributed environment."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from fsseg.errors import ConfigError
from fsseg.vocabulary import DEVICES


@dataclass(frozen=True)
class Runtime:
    """Device and process group of this process (world size 1 and no group without torchrun)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""  # of the process group; empty outside one

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """In a process group (started by torchrun, even with one process: the collectives run as with many)."""
        return bool(self.backend)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every process, reduced on this process's device (NCCL reduces CUDA tensors only)."""
        if not self.distributed:
            return tensor
        on_device = tensor.to(self.device)
        dist.all_reduce(on_device)
        return on_device.to(tensor.device)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


class MixedPrecision:
    """Autocast for training on a GPU: bfloat16 where the device supports it, else float16 with a GradScaler.

    On the CPU it does nothing unless ``cpu_bf16`` (bfloat16 autocast: faster convolutions on CPUs with bf16
    instructions, slightly different results); ``enabled=False`` turns it off everywhere.
    """

    def __init__(self, device: torch.device, enabled: bool = True, cpu_bf16: bool = False) -> None:
        self.device = device
        self.dtype = None
        if enabled and device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif enabled and cpu_bf16:
            self.dtype = torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """An optimizer step through the scaler (skipped by it when float16 gradients overflowed)."""
        self.scaler.step(optimizer)
        self.scaler.update()


def enable_activation_checkpointing(model: torch.nn.Module) -> bool:
    """Recompute activations in the backward pass where the network supports it (MONAI's Swin blocks have a
    ``use_checkpoint`` switch); returns whether any block does."""
    switched = False
    for module in model.modules():
        if hasattr(module, "use_checkpoint"):
            setattr(module, "use_checkpoint", True)  # noqa: B010 (an attribute torch's Module type does not declare)
            switched = True
    return switched


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; asking for CUDA without a GPU is an error."""
    if name not in DEVICES:
        raise ConfigError(
            f"unknown device '{name}'; expected one of {', '.join(DEVICES)} (choose the GPU with CUDA_VISIBLE_DEVICES)"
        )
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but no CUDA GPU is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_runtime(device: str = "auto") -> Runtime:
    """Join torchrun's process group when started by torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), also
    with one process, so that ``torchrun --nproc_per_node=1`` runs the collectives of a multi-GPU job.

    The rendezvous address comes from torchrun (``MASTER_ADDR``/``MASTER_PORT``); nothing here picks a port.
    On CUDA the group reduces CUDA tensors with NCCL and CPU tensors with gloo (NCCL alone cannot reduce a CPU
    tensor); gloo only on the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    backend = ""
    if world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        backend = "cpu:gloo,cuda:nccl" if resolved.type == "cuda" else "gloo"
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
    return Runtime(device=resolved, rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices); cuDNN keeps its fast non-deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
