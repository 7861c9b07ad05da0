"""One adaptation run's training: support crops -> the training core (:mod:`fsseg.training.loop`), on a schedule
that does not depend on K.

An epoch is ``training.steps_per_epoch`` optimizer steps (default 10), each on one support volume's crops, the
supports visited in seeded shuffled rounds that run on across epochs; so the learning-rate schedule (warm-up,
cosine) and the loss-plateau stop, both counted in epochs, mean the same number of steps at K=1 as at K=10.
``steps_per_epoch: null`` is the reference code's epoch: one pass over the K supports.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from monai.transforms import RandShiftIntensity

from fsseg.adapt.config import TrainingConfig, TransductiveConfig
from fsseg.adapters import AdaptedModel
from fsseg.data.datalist import Case
from fsseg.data.sampling import CropSampler
from fsseg.errors import ConfigError
from fsseg.losses import PartialLabelLoss
from fsseg.losses.size_prior import size_constraint_loss
from fsseg.preprocessing import Preprocessing
from fsseg.training.encoder_cache import EncodedScan, pad_for_encoder
from fsseg.training.loop import EpochStats, MicroBatch, Schedule, Step, Trainer, TrainingProgress, fit
from fsseg.training.runtime import MixedPrecision, enable_activation_checkpointing

log = logging.getLogger("fsseg.adapt")


@dataclass
class Support:
    """A support case in model space: image (1, X, Y, Z) and binary targets (K, X, Y, Z)."""

    case: Case
    image: torch.Tensor
    target: np.ndarray
    key: str


class Source(Protocol):
    """What the loop needs of the run: the device, the preprocessing (its roi), and a support's cached features
    and cached encoder skips."""

    device: torch.device
    pre: Preprocessing

    def features(self, item: Support) -> np.ndarray: ...

    def encoded(self, item: Support) -> EncodedScan: ...


# What a method trains on: crops of the backbone's cached features (frozen backbone), of the encoder's cached
# skips (frozen encoder of a network that splits there: the decoder runs), or of the image (the whole network).
INPUTS = ("features", "encoder", "image")


def training_inputs(adapted: AdaptedModel) -> str:
    """The cheapest of :data:`INPUTS` that trains ``adapted`` exactly."""
    if adapted.backbone_frozen:
        return "features"
    return "encoder" if adapted.encoder_frozen else "image"


@dataclass
class TrainResult:
    """What :func:`train` did: the support loss of every epoch so far, whether the plateau stop fired, and the
    state to continue from (optimizer, scheduler, crop RNG, the supports still due in the current round)."""

    losses: list[float]
    stopped: bool
    state: dict = field(repr=False)

    @property
    def epochs(self) -> int:
        return len(self.losses)


class EarlyStopper:
    """Stop when the moving average of the loss improved by less than ``min_delta`` over ``patience`` epochs;
    never before ``window + patience`` epochs."""

    def __init__(self, window: int, patience: int, min_delta: float, losses: list[float] | None = None) -> None:
        self.window, self.patience, self.min_delta = window, patience, min_delta
        self.losses: list[float] = list(losses or [])

    @property
    def minimum(self) -> int:
        return self.window + self.patience

    def should_stop(self, loss: float) -> bool:
        self.losses.append(loss)
        if len(self.losses) < self.minimum:
            return False
        smooth = np.convolve(self.losses, np.ones(self.window) / self.window, mode="valid")
        return smooth[-self.patience - 1] - smooth[-1] < self.min_delta


def steps_per_epoch(training: TrainingConfig, supports: int) -> int:
    """Optimizer steps in one epoch: the configured count, or one pass over the supports."""
    return training.steps_per_epoch or supports


def visits(rng: np.random.RandomState, supports: int, count: int, pending: list[int]) -> list[int]:
    """The next ``count`` supports to step on: the rest of the current shuffled round, then new rounds."""
    order = list(pending)
    while len(order) < count:
        order += rng.permutation(supports).tolist()
    pending[:] = order[count:]
    return order[:count]


def check_voxel_stride(adapted: AdaptedModel, training: TrainingConfig, method: str = "this method") -> None:
    """Strided crops skip voxels, which only a head that looks at each voxel on its own can train on."""
    if training.voxel_stride > 1 and not adapted.per_voxel_head:
        raise ConfigError(
            f"training.voxel_stride={training.voxel_stride} needs a per-voxel head (1x1x1 "
            f"convolutions only, e.g. lp); {method}'s adapter looks at neighbouring voxels: "
            "use a smaller crop_size instead"
        )


def crop_batch(
    source: np.ndarray, crops: list[tuple[slice, ...]], layout: torch.memory_format, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The ``crops`` of a (C, X, Y, Z) array as one batch of ``dtype`` in ``layout``, each crop converted and laid
    out in one copy by torch (numpy's float16 conversion and a separate stack and layout change took 0.3 s of a
    0.4 s linear-probe step on SwinUNETR-48 features)."""
    blocks = []
    for index in crops:
        *lead, last = index
        # A strided crop reads the last axis whole (contiguous runs of the memory map) and subsamples it after.
        block = torch.from_numpy(np.array(source[(*lead, slice(last.start, last.stop))]))
        blocks.append(block[..., :: last.step or 1])
    batch = torch.empty((len(blocks), *blocks[0].shape), dtype=dtype, memory_format=layout)
    for out, block in zip(batch, blocks):
        out.copy_(block)
    return batch


class SupportCrops:
    """The supports' crops as the training core's :class:`~fsseg.training.loop.CropSource`: each step one support
    volume's crops in micro-batches, the supports visited in seeded shuffled rounds that run on across epochs."""

    def __init__(
        self,
        adapted: AdaptedModel,
        supports: list[Support],
        run: Source,
        training: TrainingConfig,
        seed: int,
        inputs: str,
        precision: MixedPrecision,
    ) -> None:
        self.adapted, self.supports, self.training, self.inputs = adapted, supports, training, inputs
        self.device = run.device
        cached = inputs == "features"
        self.crop = training.crop_size if (cached and training.crop_size) else run.pre.roi
        self.targets = [s.target for s in supports]
        bodies = [s.image.numpy() if training.neg_in_body else None for s in supports]
        align = None
        if inputs == "encoder":
            self.sources = [run.encoded(s) for s in supports]
            align = self.sources[0].strides[-1]
            self.targets = [
                pad_for_encoder(torch.from_numpy(t), self.sources[0].strides, self.crop).numpy() for t in self.targets
            ]
            bodies = [np.asarray(e.levels[0], dtype=np.float32) if training.neg_in_body else None for e in self.sources]
        else:
            self.sources = [run.features(s) if cached else s.image.numpy() for s in supports]
        stride = training.voxel_stride if cached else 1
        self.samplers = [
            CropSampler(t, self.crop, training.pos, training.neg, stride, body=b, align=align)
            for t, b in zip(self.targets, bodies)
        ]
        self.steps_per_epoch = steps_per_epoch(training, len(supports))
        self.rng, self.pending = np.random.RandomState(seed), []
        self.shift = RandShiftIntensity(training.intensity_shift, prob=training.intensity_shift_prob)
        self.shift.set_random_state(state=self.rng)  # one random stream for crops and shifts, continued on resume
        # Convolutions over cached features run 1.2x faster channels-last on the CPU; inference stays contiguous.
        self.layout = torch.channels_last_3d if cached else torch.contiguous_format
        # Cached features go in at the autocast precision: the convolutions would cast them to it anyway.
        self.dtype = (precision.dtype or torch.float32) if cached else torch.float32
        self.micro = training.micro_batch or training.crops_per_volume

    def forward(self, inputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Logits of a micro-batch: the head on cached features, the decoder on encoder skips, else the network."""
        if self.inputs == "encoder":
            return self.adapted.decode_forward(inputs)
        return self.adapted.head_forward(inputs) if self.inputs == "features" else self.adapted(inputs)

    def steps(self, epoch: int) -> Iterator[Step]:
        self.adapted.set_train_mode()
        for i in visits(self.rng, len(self.supports), self.steps_per_epoch, self.pending):
            slices = self.samplers[i].slices(self.training.crops_per_volume, self.rng)
            yield Step(self.micro_batches(i, slices), f"support '{self.supports[i].case.id}'")

    def micro_batches(self, i: int, slices: list[tuple[slice, ...]]) -> Iterator[MicroBatch]:
        """Support ``i``'s crops at ``slices``, ``micro`` at a time: their gradients add up to the whole batch's
        (the loss is a mean over crops)."""
        for first in range(0, len(slices), self.micro):
            part = slices[first : first + self.micro]
            y = torch.stack([torch.from_numpy(self.targets[i][s].astype(np.float32)) for s in part]).to(self.device)
            if self.inputs == "encoder":
                crop_skips = [self.sources[i].crop([s.start for s in c[1:]], self.crop) for c in part]
                inputs = [torch.stack(level).to(self.device) for level in zip(*crop_skips)]
            else:
                x = crop_batch(self.sources[i], part, self.layout, self.dtype)
                if self.inputs == "image" and self.training.intensity_shift_prob:
                    x = torch.stack([torch.as_tensor(self.shift(volume)) for volume in x])
                inputs = x.to(self.device)
            yield MicroBatch(inputs, y, torch.ones(y.shape[:2], device=self.device), (len(part), len(slices)))

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state(), "pending": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
        self.pending = list(state["pending"])


def prepare_inputs(adapted: AdaptedModel, inputs: str, training: TrainingConfig) -> None:
    """Check that ``inputs`` (one of :data:`INPUTS`) trains ``adapted`` exactly, say which settings do not apply to
    it, and switch on activation checkpointing where the settings ask for it."""
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {INPUTS}, got '{inputs}'")
    if (inputs == "features" and not adapted.backbone_frozen) or (inputs == "encoder" and not adapted.encoder_frozen):
        raise ValueError(f"cached {inputs} inputs need the {'backbone' if inputs == 'features' else 'encoder'} frozen")
    if inputs == "features" and training.voxel_stride > 1:
        check_voxel_stride(adapted, training)
    if inputs != "image" and training.intensity_shift and training.intensity_shift_prob:
        log.info(
            f"training.intensity_shift: not applied, this method trains on cached {inputs} features (no image to shift)"
        )
    if training.activation_checkpointing and inputs == "image" and not enable_activation_checkpointing(adapted):
        log.warning("training.activation_checkpointing: this network offers none; training without it")


@contextlib.contextmanager
def laid_out(adapted: AdaptedModel, layout: torch.memory_format) -> Iterator[None]:
    """The trained parts in ``layout`` while training, contiguous again afterwards (inference)."""
    for part in (adapted.trunk, adapted.head):
        part.to(memory_format=layout)
    try:
        yield
    finally:
        for part in (adapted.trunk, adapted.head):
            part.to(memory_format=torch.contiguous_format)


def make_trainer(
    adapted: AdaptedModel, source: SupportCrops, training: TrainingConfig, precision: MixedPrecision
) -> Trainer:
    """The training core over ``adapted``'s trainable parameters, on a schedule counted in epochs of the source."""
    per_epoch = source.steps_per_epoch
    schedule = Schedule(
        training.lr,
        training.weight_decay,
        training.warmup_epochs * per_epoch,
        (training.cosine_epochs or training.epochs) * per_epoch,
        training.warmup_start,
    )
    loss = PartialLabelLoss(training.dice_weight, training.bce_weight)
    return Trainer(adapted.parameters(), source.forward, loss, schedule, precision, "nothing of this run was saved")


def train(
    adapted: AdaptedModel,
    supports: list[Support],
    run: Source,
    training: TrainingConfig,
    seed: int,
    until: int | None = None,
    ti: tuple[TransductiveConfig, torch.Tensor, list[float]] | None = None,
    resume: TrainResult | None = None,
    inputs: str | None = None,
    name: str = "adapt",
    progress: bool | None = None,
) -> TrainResult:
    """Train ``adapted`` on the supports up to epoch ``until`` (default ``training.epochs``) or the plateau stop.

    ``inputs`` (one of :data:`INPUTS`; default :func:`training_inputs`) says what the crops are cut from:
    ``image`` is the reference code's way for every method (the network runs on every image crop of the roi);
    ``crop_size`` and ``voxel_stride`` apply to cached features only, and encoder-skip crops start at multiples
    of the encoder's deepest stride. ``resume`` continues an earlier call's run where it ended (schedule, crop
    RNG, plateau stop), on a copy of the model it trained. With ``ti`` = (settings, pooled query features,
    target proportions), each epoch ends with one step on lam * L_TI of the query; the plateau stop watches the
    support loss alone, as without ``ti``. ``progress``: a bar named ``name`` (True), a log line an epoch (False)
    or nothing (None).
    """
    inputs = inputs or training_inputs(adapted)
    prepare_inputs(adapted, inputs, training)
    precision = MixedPrecision(run.device, cpu_bf16=training.cpu_bf16)
    source = SupportCrops(adapted, supports, run, training, seed, inputs, precision)
    per_epoch = source.steps_per_epoch
    trainer = make_trainer(adapted, source, training, precision)
    stopper = EarlyStopper(
        training.early_stop_window,
        training.early_stop_patience,
        training.early_stop_min_delta,
        resume.losses if resume else None,
    )
    if resume:
        trainer.load_state_dict(resume.state)
        source.load_state_dict(resume.state)

    def end_epoch(stats: EpochStats) -> bool:
        if ti is not None:
            transductive_step(adapted, trainer, *ti)
        if stopper.should_stop(stats.loss):
            log.info(
                f"{name}: early stop after epoch {stats.epoch} ({stats.epoch * per_epoch} steps): loss plateau "
                f"at {stopper.losses[-1]:.4f}"
            )
            return True
        return False

    epochs = range(len(stopper.losses), training.epochs if until is None else until)
    stopped = bool(resume and resume.stopped)
    if not stopped:
        report = TrainingProgress(name, epochs, per_epoch, bar=bool(progress), lines=progress is False, log=log)
        with laid_out(adapted, source.layout):
            stopped = fit(trainer, source, epochs, end_epoch, report).stopped
    adapted.eval()
    return TrainResult(stopper.losses, stopped, trainer.state_dict() | source.state_dict())


def transductive_step(
    adapted: AdaptedModel,
    trainer: Trainer,
    settings: TransductiveConfig,
    pooled: torch.Tensor,
    proportions: list[float],
) -> None:
    """One step on lam * L_TI: the predicted soft size of each structure on the (pooled) query features against
    its expected proportion; no step when every size lies inside its band."""
    predicted = torch.sigmoid(adapted.head_forward(pooled)).mean(dim=(0, 2, 3, 4))
    penalty = torch.stack(
        [size_constraint_loss(predicted[k], s, settings.gamma, settings.form) for k, s in enumerate(proportions)]
    ).mean()
    if penalty.item() > 0:
        trainer.extra_step(settings.lam * penalty)
