"""The pretraining loop: partial-label supervised training of a foundation model on several datasets.

Data lists -> cached preprocessing + random crops -> uniform-over-datasets sampling -> model -> task-masked
Dice + BCE -> AdamW with warm-up and cosine decay. Rank 0 writes checkpoints (atomically), TensorBoard
events, ``train.log`` and ``summary.json``. Every epoch re-seeds the sampler and the random transforms from
(seed, epoch, rank), so a run resumed from a checkpoint continues exactly as an uninterrupted one would.

A run can start from a checkpoint (``model.init``) with block groups frozen (``model.freeze``); with the encoder
frozen on a network that splits there, the crops are read from encoder features cached per scan
(:mod:`fsseg.pretrain.encoder_features`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from monai.data import DataLoader, Dataset, DistributedWeightedRandomSampler
from monai.optimizers import WarmupCosineSchedule
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from fsseg.checkpoint import (NonFiniteWeights, head_trained, load_weights, read_checkpoint, rng_state,
                              save_checkpoint, save_model_file, set_rng_state, sha256_file, versions)
from fsseg.config import to_dict
from fsseg.data.cache import cached_dataset, content_hash
from fsseg.data.datalist import load_datalist
from fsseg.data.io import atomic_path
from fsseg.data.transforms import IMAGE, LABEL, TASK_MASK, case_item, inference_transforms, train_transforms
from fsseg.errors import ConfigError
from fsseg.losses import PartialLabelLoss
from fsseg.models import SegmentationModel, check_roi, create_model
from fsseg.outputs import prepare_output_dir
from fsseg.templates import Template, load_template
from fsseg.training.encoder_cache import splits_at_encoder
from fsseg.training.freezing import freeze_groups, train_trainable_parts
from fsseg.training.runtime import MixedPrecision, Runtime, seed_everything
from fsseg.pretrain.config import PretrainConfig
from fsseg.pretrain.encoder_features import SKIPS, DecoderHead, EncoderFeatureDataset

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


def build_dataset(cfg: PretrainConfig, template: Template, out: Path,
                  frozen_encoder: SegmentationModel | None = None) -> tuple[Dataset, list[float], list[str]]:
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
        scans = cached_dataset(items, inference_transforms(cfg.preprocessing, (IMAGE, LABEL), template), cache_dir,
                               fingerprint)
        keys = [content_hash(fingerprint)(item).decode() for item in items]
        encoder_key = json.dumps([sha256_file(cfg.model.init) if cfg.model.init else f"seed {cfg.seed}",
                                  frozen_encoder.arch])
        aug = cfg.augmentation
        dataset = EncoderFeatureDataset(scans, keys, frozen_encoder, encoder_key, cache_dir / "encoder_features",
                                        cfg.preprocessing.roi, aug.crops_per_volume, aug.pos, aug.neg, len(template))
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
        raise ConfigError(f"model.init {init} holds model {payload['arch']}, the config asks for {model.arch}; set "
                          f"model.name (and model.kwargs) to the checkpoint's")
    # The roi is a window size (memory, context), not something the weights learnt: the rest must agree.
    made, given = (dict(p, roi=None) for p in (payload["preprocessing"], cfg.preprocessing.to_dict()))
    if made != given:
        raise ConfigError(f"model.init {init} was made for preprocessing {payload['preprocessing']}; set the "
                          f"config's preprocessing to it, any roi (it has {cfg.preprocessing.to_dict()})")
    state = dict(payload["state_dict"])
    if not head_trained(payload) or payload["template"] != template.to_dict():
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        log.info(f"model.init {init}: a fresh head for template '{template.name}'")
    load_weights(model, state, str(init))
    log.info(f"model.init: started from {init}")


def _check_resumable(payload: dict, model_arch: dict, template: Template, cfg: PretrainConfig, source: Path) -> None:
    missing = [key for key in RESUME_KEYS if key not in payload]
    if missing:
        raise ConfigError(f"{source}: cannot resume from it, it holds no training state ({', '.join(missing)}; "
                          f"kind '{payload.get('kind', 'unknown')}'); only fsseg-pretrain checkpoints resume")
    expected = {"arch": model_arch, "template": template.to_dict(), "preprocessing": cfg.preprocessing.to_dict()}
    for key, value in expected.items():
        if payload[key] != value:
            raise ConfigError(f"{source}: cannot resume, the checkpoint's {key} differs from the config's "
                              f"({payload[key]} vs {value}); use another --out to start a new run")


# The fewest optimizer steps of fsseg's own pretraining recipes (the phantom demo: 150); a run of fewer has
# hardly started to learn, which a user of a two-scan list would otherwise not be told.
MIN_STEPS = 100


def warn_if_short(steps: int, volumes: int, batch_size: int) -> None:
    """Warn when the whole schedule comes to fewer than ``MIN_STEPS`` optimizer steps."""
    if steps < MIN_STEPS:
        log.warning(f"warning: this schedule is {steps} optimizer steps in all ({volumes} volumes an epoch in batches "
                    f"of {batch_size}); fsseg's smallest recipe takes {MIN_STEPS}+. Raise optim.epochs or "
                    "sampling.volumes_per_epoch, or the model will have learned little")


def train(cfg: PretrainConfig, out: Path, runtime: Runtime, resume: str | None = None, progress: bool = True) -> dict:
    """Run (or resume) pretraining into ``out``; return the summary written to ``summary.json``."""
    paths = RunPaths(out)
    started = time.time()
    template = load_template(cfg.template)
    check_roi(cfg.model.name, cfg.preprocessing.roi)
    seed_everything(cfg.seed)
    model = create_model(cfg.model.name, num_classes=len(template), **cfg.model.kwargs).to(runtime.device)
    resume_path = _resume_path(resume, paths)
    payload = read_checkpoint(resume_path) if resume_path else None
    if payload is not None:
        _check_resumable(payload, model.arch, template, cfg, resume_path)

    if runtime.is_main:
        prepare_output_dir(out, "--out")
        _log_to_file(paths.log)
    if payload is not None:  # before the encoder cache encodes anything with these weights
        model.load_state_dict(payload["state_dict"])
    elif cfg.model.init:
        start_from(model, cfg, template)
    trainable = freeze_groups(model, cfg.model.freeze)
    cached = "encoder" in cfg.model.freeze and cfg.data.encoder_cache and splits_at_encoder(model)
    if cached and cfg.num_workers:
        raise ConfigError("num_workers must be 0 with cached encoder features (each step only reads crops of "
                          "memory-mapped files; workers would draw the same crops)")
    if cfg.model.freeze:
        log.info(f"frozen: {', '.join(cfg.model.freeze)}; {trainable:,} parameters train"
                 + ("; crops read the encoder's features, cached per scan" if cached else ""))
    runtime.barrier()  # the cache folder exists before other ranks use it
    dataset, weights, lines = build_dataset(cfg, template, out, model if cached else None)
    for line in lines:
        log.info(line)
    if cached:
        if runtime.is_main:
            for index in tqdm(range(len(dataset)), desc="encoder features", unit="scan", disable=not progress):
                dataset.prepare(index)
        runtime.barrier()

    volumes = cfg.sampling.volumes_per_epoch or len(weights)
    generator = torch.Generator()
    sampler = DistributedWeightedRandomSampler(
        dataset, weights, num_samples_per_rank=math.ceil(volumes / runtime.world_size), generator=generator,
        num_replicas=runtime.world_size, rank=runtime.rank, seed=cfg.seed,
    )
    loader = DataLoader(dataset, batch_size=cfg.optim.batch_size, sampler=sampler, num_workers=cfg.num_workers)
    steps_per_epoch = len(loader)
    warn_if_short(cfg.optim.epochs * steps_per_epoch, volumes, cfg.optim.batch_size)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=cfg.optim.warmup_epochs * steps_per_epoch,
                                     t_total=cfg.optim.epochs * steps_per_epoch)
    precision = MixedPrecision(runtime.device, enabled=cfg.amp)
    scaler = precision.scaler
    loss_fn = PartialLabelLoss(cfg.loss.dice_weight, cfg.loss.bce_weight, cfg.loss.smooth)

    start_epoch, step, best, history = 0, 0, math.inf, []
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if scheduler.t_total != cfg.optim.epochs * steps_per_epoch:
            # The saved state holds the old end, past which MONAI's cosine climbs back to the peak: move it, so the
            # learning rate decays from here to 0 at the new end, as if the run had been planned this long.
            scheduler.t_total = cfg.optim.epochs * steps_per_epoch
            log.info(f"optim.epochs is now {cfg.optim.epochs}: the cosine decay ends at step {scheduler.t_total}")
        if payload["scaler"] and scaler.is_enabled():  # empty when saved without float16 (CPU, bfloat16)
            scaler.load_state_dict(payload["scaler"])
        set_rng_state(payload["rng"])
        start_epoch, step, best, history = payload["epoch"], payload["step"], payload["best_loss"], payload["history"]
        log.info(f"resumed from {resume_path} after epoch {start_epoch} (step {step})")
    if runtime.is_main:  # only once the run is accepted: a refused --resume keeps the run's own config
        with atomic_path(paths.config) as tmp:
            tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if start_epoch >= cfg.optim.epochs:
        log.info(f"nothing to do: {start_epoch} epochs done, optim.epochs is {cfg.optim.epochs} (raise it to continue)")
    trained = DecoderHead(model) if cached else model
    network = DistributedDataParallel(trained) if runtime.distributed else trained
    writer = SummaryWriter(str(paths.tensorboard)) if runtime.is_main else None
    log.info(f"{cfg.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters on {runtime.device}"
             f" x{runtime.world_size}" + (f" (process group: {runtime.backend})" if runtime.distributed else "")
             + f"; {steps_per_epoch} steps per epoch")

    data_seconds = compute_seconds = 0.0
    for epoch in range(start_epoch, cfg.optim.epochs):
        epoch_seed = cfg.seed * 1_000_003 + epoch
        sampler.set_epoch(epoch)
        generator.manual_seed(epoch_seed * runtime.world_size + runtime.rank)
        random_state = (epoch_seed * runtime.world_size + runtime.rank) % 2**32
        (dataset if cached else dataset.transform).set_random_state(seed=random_state)
        torch.manual_seed(epoch_seed * runtime.world_size + runtime.rank)
        train_trainable_parts(network)
        totals = torch.zeros(2, dtype=torch.float64)  # loss sum, batches
        channel_sums = torch.zeros(len(template), dtype=torch.float64)
        channel_batches = torch.zeros(len(template), dtype=torch.float64)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", unit="step",
                   disable=not (progress and runtime.is_main), leave=False)
        tick = time.perf_counter()
        for batch in bar:
            loaded = time.perf_counter()
            inputs = [s.to(runtime.device) for s in batch[SKIPS]] if cached else batch[IMAGE].to(runtime.device)
            targets = batch[LABEL].to(runtime.device)
            masks = batch[TASK_MASK].to(runtime.device)
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                logits = network(inputs)
            result = loss_fn(logits, targets, masks)
            if not scaler.is_enabled() and not torch.isfinite(result.total):  # else the scaler skips the step
                raise NonFiniteWeights(f"non-finite loss at epoch {epoch + 1}, step {step + 1} (cases "
                                       f"{', '.join(map(str, batch['id']))}); stopped without saving, "
                                       f"{paths.latest} keeps the last finite state")
            scaler.scale(result.total).backward()
            if cfg.optim.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            precision.step(optimizer)
            scheduler.step()
            step += 1
            totals += torch.tensor([result.total.item(), 1.0], dtype=torch.float64)
            channel_sums += result.per_channel.cpu().double()
            channel_batches += result.annotated.cpu().double()
            done = time.perf_counter()
            data_seconds, compute_seconds = data_seconds + loaded - tick, compute_seconds + done - loaded
            tick = done
            bar.set_postfix(loss=f"{result.total.item():.4f}")
        totals, channel_sums, channel_batches = (runtime.all_reduce(t) for t in (totals, channel_sums, channel_batches))
        epoch_loss = float(totals[0] / totals[1].clamp(min=1))
        history.append(epoch_loss)
        if runtime.is_main:
            lr = scheduler.get_last_lr()[0]
            writer.add_scalar("loss/total", epoch_loss, epoch + 1)
            writer.add_scalar("lr", lr, epoch + 1)
            per_channel = channel_sums / channel_batches.clamp(min=1)
            for channel in torch.nonzero(channel_batches)[:, 0].tolist():
                writer.add_scalar(f"loss/{template.structures[channel]}", float(per_channel[channel]), epoch + 1)
            log.info(f"epoch {epoch + 1}/{cfg.optim.epochs}: loss {epoch_loss:.4f}, lr {lr:.3g}, step {step}")
            is_best = epoch_loss < best
            best = min(best, epoch_loss)
            checkpoint = {
                "kind": "pretrain", "arch": model.arch, "template": template.to_dict(),
                "preprocessing": cfg.preprocessing.to_dict(), "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch + 1, "step": step, "rng": rng_state(),
                "config": to_dict(cfg), "best_loss": best, "history": history,
            }
            save_checkpoint(paths.latest, checkpoint)
            if is_best:
                save_checkpoint(paths.best, checkpoint)
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.optim.epochs:
                save_checkpoint(paths.periodic(epoch + 1), checkpoint)
        runtime.barrier()

    summary = {
        "versions": versions(), "device": str(runtime.device), "world_size": runtime.world_size,
        "model": model.arch, "parameters": sum(p.numel() for p in model.parameters()),
        "template": template.name, "epochs": cfg.optim.epochs, "steps": step, "steps_per_epoch": steps_per_epoch,
        "final_loss": history[-1] if history else None, "best_loss": best if history else None,
        "seconds": round(time.time() - started, 2),
        "seconds_data_wait": round(data_seconds, 3), "seconds_compute": round(compute_seconds, 3),
        "checkpoint": str(paths.latest), "loss_history": history,
    }
    if runtime.is_main:
        if writer is not None:
            writer.close()
        with atomic_path(paths.summary) as tmp:
            tmp.write_text(json.dumps(summary, indent=1) + "\n")
        if paths.latest.exists():
            save_model_file(paths.latest, paths.model)
        log.info(f"done: {paths.latest} (loss {summary['final_loss']}; {paths.model.name} without the training "
                 f"state, to share), summary in {paths.summary}")
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
