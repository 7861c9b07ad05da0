"""The training core of both stages: an optimizer over what trains, stepped on crops from a source.

Pretraining and adaptation differ only in what they hand it: the parameters that train and the forward pass
through them, a :class:`CropSource` (image crops, cached decoder features, cached encoder skips) and a loss.
The core owns the rest: AdamW with warm-up and cosine decay (:class:`Schedule`), mixed precision, gradient
clipping, micro-batches whose gradients add up to the step's, the non-finite guard, resumable state, and
progress (epochs, loss and time left; a bar, or a line an epoch).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from monai.optimizers import WarmupCosineSchedule
from tqdm import tqdm

from fsseg.checkpoint import NonFiniteWeights
from fsseg.losses import PartialLabelLoss
from fsseg.losses.partial import LossOutput
from fsseg.training.runtime import MixedPrecision


@dataclass(frozen=True)
class Schedule:
    """AdamW and its learning rate over a run, counted in optimizer steps."""

    lr: float
    weight_decay: float
    warmup_steps: int
    total_steps: int
    warmup_start: float = 0.0  # the warm-up's first learning rate, as a fraction of lr
    grad_clip: float | None = None  # the gradients' largest norm; None: no clipping


@dataclass
class MicroBatch:
    """Crops that go through the network together: inputs on the device, targets and task masks (batch, K)."""

    inputs: Any
    targets: torch.Tensor
    masks: torch.Tensor
    share: tuple[int, int] = (1, 1)  # its share of the step's loss: its crops, the step's crops


@dataclass
class Step:
    """One optimizer step: its micro-batches (made one at a time, so that one is in memory at once) and what it
    trains on, for messages."""

    micro_batches: Iterable[MicroBatch]
    label: str


class CropSource(Protocol):
    """What the core trains on: each epoch, a sequence of steps."""

    steps_per_epoch: int

    def steps(self, epoch: int) -> Iterator[Step]:
        """The steps of ``epoch`` (0-based): the source seeds its randomness and sets the train mode here."""
        ...


@dataclass
class EpochStats:
    """What an epoch did: the mean loss of its steps, and the sums behind the per-channel losses."""

    epoch: int  # 1-based
    step: int  # optimizer steps of the run so far
    loss_sum: float = 0.0
    steps: int = 0
    per_channel: torch.Tensor | None = None  # summed over the epoch's batches
    annotated: torch.Tensor | None = None  # batches that annotated each channel
    seconds_data: float = 0.0
    seconds_compute: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    def add(self, loss: float, outputs: list[LossOutput]) -> None:
        self.loss_sum += loss
        self.steps += 1
        for output in outputs:
            per_channel, annotated = output.per_channel.detach().cpu().double(), output.annotated.cpu().double()
            self.per_channel = per_channel if self.per_channel is None else self.per_channel + per_channel
            self.annotated = annotated if self.annotated is None else self.annotated + annotated


class Trainer:
    """The optimizer side of a run: ``forward`` maps a micro-batch's inputs to logits through the parameters that
    train; ``on_non_finite`` says what a non-finite loss leaves behind (it stops the run)."""

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        forward: Callable[[Any], torch.Tensor],
        loss_fn: PartialLabelLoss,
        schedule: Schedule,
        precision: MixedPrecision,
        on_non_finite: str,
    ) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        self.forward, self.loss_fn, self.schedule, self.precision = forward, loss_fn, schedule, precision
        self.on_non_finite = on_non_finite
        self.optimizer = torch.optim.AdamW(self.parameters, lr=schedule.lr, weight_decay=schedule.weight_decay)
        self.scheduler = WarmupCosineSchedule(
            self.optimizer,
            warmup_steps=schedule.warmup_steps,
            t_total=schedule.total_steps,
            warmup_multiplier=schedule.warmup_start,
        )
        self.step_count = 0

    def step(self, step: Step, epoch: int) -> tuple[float, list[LossOutput]]:
        """One optimizer step on ``step``'s micro-batches; returns its loss and each micro-batch's loss terms."""
        scaler = self.precision.scaler
        self.optimizer.zero_grad(set_to_none=True)
        loss, outputs = 0.0, []
        for micro in step.micro_batches:
            with self.precision.autocast():
                logits = self.forward(micro.inputs)
            output = self.loss_fn(logits.float(), micro.targets, micro.masks)
            share = output.total * micro.share[0] / micro.share[1]
            if not scaler.is_enabled() and not torch.isfinite(share):  # else the scaler skips the step
                raise NonFiniteWeights(
                    f"non-finite loss at epoch {epoch}, step {self.step_count + 1} ({step.label}); {self.on_non_finite}"
                )
            scaler.scale(share).backward()
            loss += share.item()
            outputs.append(output)
        if self.schedule.grad_clip:
            scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.schedule.grad_clip)
        self.precision.step(self.optimizer)
        self.scheduler.step()
        self.step_count += 1
        return loss, outputs

    def extra_step(self, loss: torch.Tensor) -> None:
        """An optimizer step on another objective (the transductive constraint), outside the schedule."""
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.scaler.scale(loss).backward()
        self.precision.step(self.optimizer)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict(),
            "step": self.step_count,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; the schedule's end is this trainer's (a run may have grown longer)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The saved state holds the old end, past which MONAI's cosine climbs back to the peak.
        self.scheduler.t_total = self.schedule.total_steps
        if state.get("scaler") and self.precision.scaler.is_enabled():  # empty when saved without float16
            self.precision.scaler.load_state_dict(state["scaler"])
        self.step_count = state.get("step", 0)


class TrainingProgress:
    """Epochs, loss and time left of a run: a bar over its steps, or (``bar=False``) with ``lines`` a log line an
    epoch."""

    def __init__(
        self, name: str, epochs: range, steps_per_epoch: int, bar: bool, lines: bool, log: logging.Logger
    ) -> None:
        self.name, self.last, self.lines, self.log = name, epochs.stop, lines, log
        self.total = len(epochs) * steps_per_epoch
        self.done = 0
        self.started = time.perf_counter()
        self.bar = tqdm(total=self.total, desc=name, unit="step", leave=False, disable=not bar)

    def step(self, epoch: int, loss: float) -> None:
        self.done += 1
        self.bar.set_description(f"{self.name} epoch {epoch}/{self.last}", refresh=False)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.bar.update()

    def seconds_left(self) -> float:
        elapsed = time.perf_counter() - self.started
        return elapsed / max(self.done, 1) * (self.total - self.done)

    def epoch(self, stats: EpochStats) -> None:
        if self.lines:
            self.log.info(
                f"{self.name} epoch {stats.epoch}/{self.last}: loss {stats.loss:.4f}, {self.seconds_left():.0f} s left"
            )

    def close(self) -> None:
        self.bar.close()


@dataclass
class Fit:
    """What :func:`fit` did: the stats of each epoch it ran, and whether ``end_epoch`` stopped it."""

    epochs: list[EpochStats] = field(default_factory=list)
    stopped: bool = False


def fit(
    trainer: Trainer,
    source: CropSource,
    epochs: range,
    end_epoch: Callable[[EpochStats], bool],
    progress: TrainingProgress,
) -> Fit:
    """Train over ``epochs`` (0-based) of ``source``; after each, ``end_epoch`` (checkpoints, logging, early
    stopping) returns whether to stop."""
    result = Fit()
    try:
        for epoch in epochs:
            stats = EpochStats(epoch + 1, trainer.step_count)
            tick = time.perf_counter()
            for step in source.steps(epoch):
                loaded = time.perf_counter()
                loss, outputs = trainer.step(step, epoch + 1)
                stats.add(loss, outputs)
                progress.step(epoch + 1, loss)
                done = time.perf_counter()
                stats.seconds_data += loaded - tick
                stats.seconds_compute += done - loaded
                tick = done
            stats.step = trainer.step_count
            result.epochs.append(stats)
            progress.epoch(stats)
            if end_epoch(stats):
                result.stopped = True
                break
    finally:
        progress.close()
    return result
