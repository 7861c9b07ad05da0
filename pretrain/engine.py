"""Pretraining: partial-label supervised training of a foundation model on several datasets.

Data lists -> cached preprocessing + random crops -> uniform-over-datasets sampling -> model -> task-masked
Dice + BCE -> AdamW with warm-up and cosine decay (the training core, :mod:`fsseg.training.loop`). Rank 0
writes checkpoints (atomically), TensorBoard events, ``train.log`` and ``summary.json``. Every epoch re-seeds the
sampler and the random transforms from (seed, epoch, rank), so a run resumed from a checkpoint continues exactly
as an uninterrupted one would.

A run can start from a checkpoint (``model.init``) with block groups frozen (``model.freeze``); with the encoder
frozen on a network that splits there, the crops are read from encoder features cached per scan
(:mod:`fsseg.pretrain.encoder_features`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml
from monai.data import DataLoader, Dataset, DistributedWeightedRandomSampler
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from fsseg.cache import cached_dataset, content_hash
from fsseg.checkpoint import (
    head_trained,
    load_weights,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    save_model_file,
    set_rng_state,
    sha256_file,
    versions,
)
from fsseg.config import to_dict
from fsseg.data.datalist import load_datalist
from fsseg.data.transforms import IMAGE, LABEL, TASK_MASK, case_item, inference_transforms, train_transforms
from fsseg.errors import ConfigError
from fsseg.files import atomic_path
from fsseg.losses import PartialLabelLoss
from fsseg.models import SegmentationModel, check_roi, create_model
from fsseg.outputs import check_run_file, prepare_output_dir
from fsseg.pretrain.config import PretrainConfig
from fsseg.pretrain.encoder_features import SKIPS, DecoderHead, EncoderFeatureDataset
from fsseg.templates import Template, load_template
from fsseg.training.encoder_cache import splits_at_encoder
from fsseg.training.freezing import freeze_groups, train_trainable_parts
from fsseg.training.loop import EpochStats, Fit, MicroBatch, Schedule, Step, Trainer, TrainingProgress, fit
from fsseg.training.runtime import MixedPrecision, Runtime, init_runtime, seed_everything, shutdown

log = logging.getLogger("fsseg.pretrain")
# What a checkpoint must hold to continue training from it.
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "rng", "epoch", "step", "best_loss", "history")


@dataclass(frozen=True)
class RunPaths:
    """The files of a run directory."""

    out: Path

    @property
    def config(self) -> Path:
        return self.out / "config.yaml"

    @property
    def latest(self) -> Path:
        return self.out / "checkpoint_latest.pt"

    @property
    def best(self) -> Path:
        return self.out / "checkpoint_best.pt"

    @property
    def model(self) -> Path:
        return self.out / "model.pt"

    def periodic(self, epoch: int) -> Path:
        return self.out / f"checkpoint_epoch{epoch:04d}.pt"

    @property
    def summary(self) -> Path:
        return self.out / "summary.json"

    @property
    def log(self) -> Path:
        return self.out / "train.log"

    @property
    def tensorboard(self) -> Path:
        return self.out / "tensorboard"


def build_dataset(
    cfg: PretrainConfig, template: Template, out: Path, frozen_encoder: SegmentationModel | None = None
) -> tuple[Dataset, list[float], list[str]]:
    """The training cases of every list, with their sampling weights and a line per dataset for the log; with
    ``frozen_encoder``, crops of its features cached per scan."""
    if not cfg.data.lists:
        raise ConfigError("no data lists: set data.lists in the config or pass --data-list")
    items, weights, lines = [], [], []
    for list_path in cfg.data.lists:
        datalist = load_datalist(list_path, cfg.data.data_root)
        cases = [c for c in datalist.split("train") if c.has_annotation]
        inside, outside = datalist.template_coverage(template)
        if not cases:
            raise ConfigError(f"{list_path}: no annotated 'train' cases")
        if not inside:
            raise ConfigError(f"{list_path}: annotates none of the structures of template '{template.name}'")
        items += [case_item(case, datalist.label_map) for case in cases]
        weights += [1.0 / len(cases) if cfg.sampling.uniform_datasets else 1.0] * len(cases)
        note = f"; not in the template: {', '.join(outside)}" if outside else ""
        lines.append(f"{datalist.name}: {len(cases)} train cases, annotates {', '.join(inside)}{note}")
    fingerprint = json.dumps([cfg.preprocessing.to_dict(), template.to_dict()], sort_keys=True)
    cache_dir = Path(cfg.data.cache_dir or out / "cache")
    if frozen_encoder is not None:
        scans = cached_dataset(
            items, inference_transforms(cfg.preprocessing, (IMAGE, LABEL), template), cache_dir, fingerprint
        )
        keys = [content_hash(fingerprint)(item).decode() for item in items]
        encoder_key = json.dumps(
            [sha256_file(cfg.model.init) if cfg.model.init else f"seed {cfg.seed}", frozen_encoder.arch]
        )
        aug = cfg.augmentation
        dataset = EncoderFeatureDataset(
            scans,
            keys,
            frozen_encoder,
            encoder_key,
            cache_dir / "encoder_features",
            cfg.preprocessing.roi,
            aug.crops_per_volume,
            aug.pos,
            aug.neg,
            len(template),
        )
        return dataset, weights, lines
    transform = train_transforms(cfg.preprocessing, template, cfg.augmentation)
    dataset = cached_dataset(items, transform, cache_dir, fingerprint) if cfg.data.cache else Dataset(items, transform)
    return dataset, weights, lines


def start_from(model: SegmentationModel, cfg: PretrainConfig, template: Template) -> None:
    """Load ``model.init``'s weights; its head only when trained for the same template (else it starts fresh).

    Raises:
        ConfigError: the checkpoint holds another model or was made for other preprocessing.
    """
    init = cfg.model.init
    payload = read_checkpoint(init)
    if payload["arch"] != model.arch:
        raise ConfigError(
            f"model.init {init} holds model {payload['arch']}, the config asks for {model.arch}; set "
            f"model.name (and model.kwargs) to the checkpoint's"
        )
    # The roi is a window size (memory, context), not something the weights learnt: the rest must agree.
    made, given = (dict(p, roi=None) for p in (payload["preprocessing"], cfg.preprocessing.to_dict()))
    if made != given:
        raise ConfigError(
            f"model.init {init} was made for preprocessing {payload['preprocessing']}; set the "
            f"config's preprocessing to it, any roi (it has {cfg.preprocessing.to_dict()})"
        )
    state = dict(payload["state_dict"])
    if not head_trained(payload) or payload["template"] != template.to_dict():
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        log.info(f"model.init {init}: a fresh head for template '{template.name}'")
    load_weights(model, state, str(init))
    log.info(f"model.init: started from {init}")


def _check_resumable(payload: dict, model_arch: dict, template: Template, cfg: PretrainConfig, source: Path) -> None:
    missing = [key for key in RESUME_KEYS if key not in payload]
    if missing:
        raise ConfigError(
            f"{source}: cannot resume from it, it holds no training state ({', '.join(missing)}; "
            f"kind '{payload.get('kind', 'unknown')}'); only fsseg-pretrain checkpoints resume"
        )
    expected = {"arch": model_arch, "template": template.to_dict(), "preprocessing": cfg.preprocessing.to_dict()}
    for key, value in expected.items():
        if payload[key] != value:
            raise ConfigError(
                f"{source}: cannot resume, the checkpoint's {key} differs from the config's "
                f"({payload[key]} vs {value}); use another --out to start a new run"
            )


# The fewest optimizer steps of fsseg's own pretraining recipes (the phantom demo: 150); a run of fewer has
# hardly started to learn, which a user of a two-scan list would otherwise not be told.
MIN_STEPS = 100


def warn_if_short(steps: int, volumes: int, batch_size: int) -> None:
    """Warn when the whole schedule comes to fewer than ``MIN_STEPS`` optimizer steps."""
    if steps < MIN_STEPS:
        log.warning(
            f"warning: this schedule is {steps} optimizer steps in all ({volumes} volumes an epoch in batches "
            f"of {batch_size}); fsseg's smallest recipe takes {MIN_STEPS}+. Raise optim.epochs or "
            "sampling.volumes_per_epoch, or the model will have learned little"
        )


class LoaderCrops:
    """The pretraining batches as the training core's :class:`~fsseg.training.loop.CropSource`: volumes drawn
    with their datasets' weights, each epoch's sampler and random transforms seeded from (seed, epoch, rank)."""

    def __init__(
        self,
        dataset: Dataset,
        weights: list[float],
        cfg: PretrainConfig,
        runtime: Runtime,
        cached: bool,
        network: torch.nn.Module,
    ) -> None:
        self.dataset, self.runtime, self.cached, self.network, self.seed = dataset, runtime, cached, network, cfg.seed
        self.volumes = cfg.sampling.volumes_per_epoch or len(weights)
        self.generator = torch.Generator()
        self.sampler = DistributedWeightedRandomSampler(
            dataset,
            weights,
            num_samples_per_rank=math.ceil(self.volumes / runtime.world_size),
            generator=self.generator,
            num_replicas=runtime.world_size,
            rank=runtime.rank,
            seed=cfg.seed,
        )
        self.loader = DataLoader(
            dataset, batch_size=cfg.optim.batch_size, sampler=self.sampler, num_workers=cfg.num_workers
        )
        self.steps_per_epoch = len(self.loader)

    def steps(self, epoch: int) -> Iterator[Step]:
        rank_seed = (self.seed * 1_000_003 + epoch) * self.runtime.world_size + self.runtime.rank
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(rank_seed)
        (self.dataset if self.cached else self.dataset.transform).set_random_state(seed=rank_seed % 2**32)
        torch.manual_seed(rank_seed)
        train_trainable_parts(self.network)
        device = self.runtime.device
        for batch in self.loader:
            inputs = [s.to(device) for s in batch[SKIPS]] if self.cached else batch[IMAGE].to(device)
            micro = MicroBatch(inputs, batch[LABEL].to(device), batch[TASK_MASK].to(device))
            yield Step([micro], f"cases {', '.join(map(str, batch['id']))}")


@dataclass
class RunState:
    """Where a run stands: epochs done, the loss of each, the best."""

    epoch: int = 0
    best: float = math.inf
    history: list[float] = field(default_factory=list)


@dataclass
class PretrainRun:
    """The parts of one pretraining run that the steps ending its epochs and the run share."""

    cfg: PretrainConfig
    paths: RunPaths
    runtime: Runtime
    model: SegmentationModel
    template: Template
    trainer: Trainer
    state: RunState


def prepare_model(
    cfg: PretrainConfig, paths: RunPaths, runtime: Runtime, template: Template, resume: str | None
) -> tuple[SegmentationModel, dict | None, bool]:
    """The model with its starting weights and frozen groups, the checkpoint it resumes from (or None), and
    whether its crops are cached encoder features."""
    check_roi(cfg.model.name, cfg.preprocessing.roi)
    seed_everything(cfg.seed)
    model = create_model(cfg.model.name, num_classes=len(template), **cfg.model.kwargs).to(runtime.device)
    resume_path = _resume_path(resume, paths)
    payload = read_checkpoint(resume_path) if resume_path else None
    if payload is not None:
        _check_resumable(payload, model.arch, template, cfg, resume_path)
    if runtime.is_main:
        prepare_output_dir(paths.out, "--out")
        _log_to_file(paths.log)
    if payload is not None:  # before the encoder cache encodes anything with these weights
        model.load_state_dict(payload["state_dict"])
        log.info(f"resumed from {resume_path} after epoch {payload['epoch']} (step {payload['step']})")
    elif cfg.model.init:
        start_from(model, cfg, template)
    trainable = freeze_groups(model, cfg.model.freeze)
    cached = bool("encoder" in cfg.model.freeze and cfg.data.encoder_cache and splits_at_encoder(model))
    if cached and cfg.num_workers:
        raise ConfigError(
            "num_workers must be 0 with cached encoder features (each step only reads crops of "
            "memory-mapped files; workers would draw the same crops)"
        )
    if cfg.model.freeze:
        log.info(
            f"frozen: {', '.join(cfg.model.freeze)}; {trainable:,} parameters train"
            + ("; crops read the encoder's features, cached per scan" if cached else "")
        )
    return model, payload, cached


def prepare_crops(
    cfg: PretrainConfig,
    paths: RunPaths,
    runtime: Runtime,
    template: Template,
    model: SegmentationModel,
    cached: bool,
    progress: bool,
) -> LoaderCrops:
    """The run's crop source; with ``cached``, the encoder's features of every scan computed first (rank 0)."""
    runtime.barrier()  # the cache folder exists before other ranks use it
    dataset, weights, lines = build_dataset(cfg, template, paths.out, model if cached else None)
    for line in lines:
        log.info(line)
    if cached:
        if runtime.is_main:
            for index in tqdm(range(len(dataset)), desc="encoder features", unit="scan", disable=not progress):
                dataset.prepare(index)
        runtime.barrier()
    trained = DecoderHead(model) if cached else model
    network = DistributedDataParallel(trained) if runtime.distributed else trained
    return LoaderCrops(dataset, weights, cfg, runtime, cached, network)


def make_trainer(
    cfg: PretrainConfig,
    paths: RunPaths,
    runtime: Runtime,
    model: SegmentationModel,
    crops: LoaderCrops,
    payload: dict | None,
) -> tuple[Trainer, RunState]:
    """AdamW with warm-up and cosine decay over the run's steps, continued from ``payload`` when it resumes."""
    per_epoch = crops.steps_per_epoch
    warn_if_short(cfg.optim.epochs * per_epoch, crops.volumes, cfg.optim.batch_size)
    schedule = Schedule(
        cfg.optim.lr,
        cfg.optim.weight_decay,
        cfg.optim.warmup_epochs * per_epoch,
        cfg.optim.epochs * per_epoch,
        grad_clip=cfg.optim.grad_clip,
    )
    loss_fn = PartialLabelLoss(cfg.loss.dice_weight, cfg.loss.bce_weight, cfg.loss.smooth)
    trainer = Trainer(
        model.parameters(),
        crops.network,
        loss_fn,
        schedule,
        MixedPrecision(runtime.device, cfg.amp),
        f"stopped without saving, {paths.latest} keeps the last finite state",
    )
    state = RunState()
    if payload is not None:
        if payload["scheduler"].get("t_total") != schedule.total_steps:
            log.info(f"optim.epochs is now {cfg.optim.epochs}: the cosine decay ends at step {schedule.total_steps}")
        trainer.load_state_dict(payload)
        set_rng_state(payload["rng"])
        state = RunState(payload["epoch"], payload["best_loss"], payload["history"])
    return trainer, state


def end_of_epoch(
    run: PretrainRun, writer: SummaryWriter | None, report: TrainingProgress
) -> Callable[[EpochStats], bool]:
    """What ends each epoch: the loss over all ranks, TensorBoard and the log, and (rank 0) the checkpoints."""
    runtime, state = run.runtime, run.state

    def end_epoch(stats: EpochStats) -> bool:
        channels = torch.zeros(len(run.template), dtype=torch.float64)
        sums = stats.per_channel if stats.per_channel is not None else channels
        batches = stats.annotated if stats.annotated is not None else channels
        totals = torch.tensor([stats.loss_sum, stats.steps], dtype=torch.float64)
        totals, sums, batches = (runtime.all_reduce(t) for t in (totals, sums, batches))
        state.epoch, loss = stats.epoch, float(totals[0] / totals[1].clamp(min=1))
        state.history.append(loss)
        if runtime.is_main and writer is not None:
            lr = run.trainer.scheduler.get_last_lr()[0]
            writer.add_scalar("loss/total", loss, stats.epoch)
            writer.add_scalar("lr", lr, stats.epoch)
            per_channel = sums / batches.clamp(min=1)
            for channel in torch.nonzero(batches)[:, 0].tolist():
                writer.add_scalar(f"loss/{run.template.structures[channel]}", float(per_channel[channel]), stats.epoch)
            log.info(
                f"epoch {stats.epoch}/{run.cfg.optim.epochs}: loss {loss:.4f}, lr {lr:.3g}, step {stats.step}, "
                f"{report.seconds_left():.0f} s left"
            )
            save_epoch(run, loss)
        runtime.barrier()
        return False

    return end_epoch


def save_epoch(run: PretrainRun, loss: float) -> None:
    """The latest checkpoint, the best when ``loss`` is the lowest so far, and every ``checkpoint_every``-th."""
    cfg, paths, state = run.cfg, run.paths, run.state
    is_best = loss < state.best
    state.best = min(state.best, loss)
    checkpoint = {
        "kind": "pretrain",
        "arch": run.model.arch,
        "template": run.template.to_dict(),
        "preprocessing": cfg.preprocessing.to_dict(),
        "state_dict": run.model.state_dict(),
        **run.trainer.state_dict(),
        "epoch": state.epoch,
        "rng": rng_state(),
        "config": to_dict(cfg),
        "best_loss": state.best,
        "history": state.history,
    }
    save_checkpoint(paths.latest, checkpoint)
    if is_best:
        save_checkpoint(paths.best, checkpoint)
    if state.epoch % cfg.checkpoint_every == 0 or state.epoch == cfg.optim.epochs:
        save_checkpoint(paths.periodic(state.epoch), checkpoint)


def run_pretraining(
    cfg: PretrainConfig, out: Path, runtime: Runtime, resume: str | None = None, progress: bool = True
) -> dict:
    """Run (or resume) pretraining into ``out``; return the summary written to ``summary.json``."""
    paths = RunPaths(out)
    started = time.time()
    template = load_template(cfg.template)
    model, payload, cached = prepare_model(cfg, paths, runtime, template, resume)
    crops = prepare_crops(cfg, paths, runtime, template, model, cached, progress)
    trainer, state = make_trainer(cfg, paths, runtime, model, crops, payload)
    if runtime.is_main:  # only once the run is accepted: a refused --resume keeps the run's own config
        with atomic_path(paths.config) as tmp:
            tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if state.epoch >= cfg.optim.epochs:
        log.info(f"nothing to do: {state.epoch} epochs done, optim.epochs is {cfg.optim.epochs} (raise it to continue)")
    writer = SummaryWriter(str(paths.tensorboard)) if runtime.is_main else None
    log.info(
        f"{cfg.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters on {runtime.device}"
        f" x{runtime.world_size}"
        + (f" (process group: {runtime.backend})" if runtime.distributed else "")
        + f"; {crops.steps_per_epoch} steps per epoch"
    )
    epochs = range(state.epoch, cfg.optim.epochs)
    report = TrainingProgress(
        "pretrain", epochs, crops.steps_per_epoch, bar=progress and runtime.is_main, lines=False, log=log
    )
    run = PretrainRun(cfg, paths, runtime, model, template, trainer, state)
    ran = fit(trainer, crops, epochs, end_of_epoch(run, writer, report), report)
    if writer is not None:
        writer.close()
    return finish(run, ran, crops.steps_per_epoch, started)


def finish(run: PretrainRun, ran: Fit, steps_per_epoch: int, started: float) -> dict:
    """The run's summary (written by rank 0 to ``summary.json``, with ``model.pt``: the weights to share)."""
    cfg, paths, runtime, model, state = run.cfg, run.paths, run.runtime, run.model, run.state
    summary = {
        "versions": versions(),
        "device": str(runtime.device),
        "world_size": runtime.world_size,
        "model": model.arch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "template": run.template.name,
        "epochs": cfg.optim.epochs,
        "steps": run.trainer.step_count,
        "steps_per_epoch": steps_per_epoch,
        "final_loss": state.history[-1] if state.history else None,
        "best_loss": state.best if state.history else None,
        "seconds": round(time.time() - started, 2),
        "seconds_data_wait": round(sum(e.seconds_data for e in ran.epochs), 3),
        "seconds_compute": round(sum(e.seconds_compute for e in ran.epochs), 3),
        "checkpoint": str(paths.latest),
        "loss_history": state.history,
    }
    if runtime.is_main:
        with atomic_path(paths.summary) as tmp:
            tmp.write_text(json.dumps(summary, indent=1) + "\n")
        if paths.latest.exists():
            save_model_file(paths.latest, paths.model)
        log.info(
            f"done: {paths.latest} (loss {summary['final_loss']}; {paths.model.name} without the training "
            f"state, to share), summary in {paths.summary}"
        )
    return summary


def _resume_path(resume: str | None, paths: RunPaths) -> Path | None:
    if not resume:
        if paths.latest.exists():
            raise ConfigError(f"{paths.out} already holds a run; use --resume auto to continue it or another --out")
        return None
    if resume == "auto":
        if paths.latest.exists():
            return paths.latest
        log.info(f"--resume auto: no checkpoint in {paths.out}, starting a new run")
        return None
    return Path(resume)


def _log_to_file(path: Path) -> None:
    """Copy the log to ``path``: one file per run, also when several runs share a process (notebooks, tests)."""
    for old in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        log.removeHandler(old)
        old.close()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def pretrain(
    config: PretrainConfig, out: str | Path, device: str = "auto", resume: str | None = None, progress: bool = True
) -> dict:
    """Pretrain into ``out`` on ``device`` (``auto``, ``cpu`` or ``cuda``; under torchrun, every process's GPU);
    ``resume`` is ``auto`` or a checkpoint to continue from. Returns the summary written to ``summary.json``.

    Raises:
        FssegError: a bad input, or an ``out`` whose config.yaml is not a pretraining run's.
    """
    # the run's config.yaml is replaced on every start: never one of another command or of the user
    check_run_file(Path(out) / "config.yaml", ("model", "optim", "data"), "fsseg-pretrain")
    runtime = init_runtime(device)
    try:
        return run_pretraining(config, Path(out), runtime, resume=resume, progress=progress)
    finally:
        shutdown(runtime)
