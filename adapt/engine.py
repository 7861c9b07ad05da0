"""The adaptation loop: k-shot supports -> adapted model -> test predictions scored in native space.

For each seed and shot count K, one support set is drawn (the same for every method). Each method adapts a
copy of the pretrained model: frozen-backbone methods train on features cached once per scan (shared by
every method, K and seed), the others on live crops. Every test case is then predicted on its own grid and
scored with the same code as ``fsseg-evaluate``. With the transductive size constraint, each test case gets
its own adaptation (the support-trained state, then TI steps on that query).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from monai.optimizers import WarmupCosineSchedule
from tqdm import tqdm

from fsseg.adapters import AdaptedModel, adapt_model, get_method
from fsseg.adapters.artifact import save_adapter
from fsseg.adapters.feature_cache import FeatureStore
from fsseg.checkpoint import NonFiniteWeights, load_model, sha256_file
from fsseg.config import from_dict, to_dict
from fsseg.data.annotations import check_case_grid, load_case_masks
from fsseg.data.cache import file_digest
from fsseg.data.datalist import Case, DataList, load_datalist
from fsseg.data.io import atomic_path, load_nifti_image
from fsseg.data.sampling import CropSampler, sample_support
from fsseg.data.transforms import IMAGE, LABEL, case_item, inference_transforms
from fsseg.errors import ConfigError, DataError, FssegError
from fsseg.inference import InferenceSettings, Predictor
from fsseg.inference.predictor import FrozenBackbone
from fsseg.losses import PartialLabelLoss
from fsseg.losses.size_prior import organ_size_prior, size_constraint_loss
from fsseg.metrics import score_structure
from fsseg.templates import Template, expand_structures
from fsseg.training.runtime import MixedPrecision, enable_activation_checkpointing
from fsseg.viz import dice_vs_shots_png, overlay_png, pyplot
from adapt.config import (AdaptConfig, MethodSettings, TrainingConfig, TransductiveConfig, method_settings_file,
                          read_method_settings)

log = logging.getLogger("fsseg.adapt")
RESULT_FIELDS = ["organ", "method", "shots", "seed", "case", "dice", "nsd", "hd95", "transductive",
                 "trainable_params", "total_params", "train_seconds", "epochs", "support"]


@dataclass
class Support:
    """A support case in model space: image (1, X, Y, Z) and binary targets (K, X, Y, Z)."""

    case: Case
    image: torch.Tensor
    target: np.ndarray
    key: str


@dataclass
class Query:
    """A test case: its model-space data (for inversion), native ground truth and grid."""

    case: Case
    data: dict
    masks: dict[str, np.ndarray]
    reference: object
    spacing: tuple[float, ...]
    key: str


@dataclass
class TrainResult:
    """What :func:`train` did: the loss of each epoch and the optimizer/scheduler state to continue from."""

    losses: list[float]
    state: dict

    @property
    def epochs(self) -> int:
        return len(self.losses)


class EarlyStopper:
    """Stop when the moving average of the loss improved by less than ``min_delta`` over ``patience`` epochs."""

    def __init__(self, window: int, patience: int, min_delta: float) -> None:
        self.window, self.patience, self.min_delta = window, patience, min_delta
        self.losses: list[float] = []

    def should_stop(self, loss: float) -> bool:
        self.losses.append(loss)
        if len(self.losses) < self.window + self.patience:
            return False
        smooth = np.convolve(self.losses, np.ones(self.window) / self.window, mode="valid")
        return smooth[-self.patience - 1] - smooth[-1] < self.min_delta


class Adaptation:
    """One adaptation run's data and frozen backbone, shared by every method, shot count and seed."""

    def __init__(self, config: AdaptConfig, out: Path, device: torch.device) -> None:
        self.config, self.out, self.device = config, out, device
        self.base, self.template, self.pre, _ = load_model(config.checkpoint)
        self.base = self.base.to(device).eval()
        self.checkpoint_sha = sha256_file(config.checkpoint)
        self.datalist = load_datalist(config.data_list, config.data_root)
        self.organs = expand_structures(config.organs)
        if self.base.head_trained:
            known = [o for o in self.organs if o in self.template]
            fresh = [o for o in self.organs if o not in self.template]
            log.info(f"heads: {', '.join(known) or 'none'} start from the checkpoint's '{self.template.name}' rows"
                     + (f"; fresh head rows for {', '.join(fresh)} (not in the template)" if fresh else ""))
        else:
            log.info(f"heads: fresh rows for {', '.join(self.organs)} (the checkpoint's head was not trained: "
                     "it was imported without one)")
        self.targets = Template("targets", tuple(self.organs), tuple(range(1, len(self.organs) + 1)))
        self.pool, self.tests = self._pools(self.datalist)
        self.settings = {m: self._method_settings(m) for m in config.methods}
        self.inference = InferenceSettings(overlap=config.overlap, sw_batch_size=config.sw_batch_size, amp=config.amp,
                                           cpu_bf16=config.cpu_bf16)
        self.predictor = Predictor(self.base, self.organs, self.pre, device, self.inference)
        backbone = FrozenBackbone(self.base.features, self.base.feature_channels, self.base.head)
        self.store = FeatureStore(out / "features", json.dumps([self.checkpoint_sha, self.predictor.precision]),
                                  lambda image: self.predictor.stitched_features(image, backbone))
        self.support_transform = inference_transforms(self.pre, keys=(IMAGE, LABEL), template=self.targets)
        self._supports: dict[str, Support] = {}
        self._queries: dict[str, Query] = {}
        self._best: dict[str, float] = {}
        self.pictures = config.pictures and _pictures_available()

    def _pools(self, datalist: DataList) -> tuple[list[Case], list[Case]]:
        missing = [o for o in self.organs if o not in datalist.structures]
        if missing:
            raise DataError(f"{datalist.path}: no case annotates {', '.join(missing)}; it annotates: "
                            f"{', '.join(datalist.structures)}")
        tests, pool = datalist.cases_annotating(self.organs, "test"), datalist.cases_annotating(self.organs, "train")
        if not tests:
            raise DataError(f"{datalist.path}: no 'test' case annotates {', '.join(self.organs)}")
        test_groups = {c.group for c in tests}
        leaking = [c.id for c in pool if c.group in test_groups]
        if leaking:
            log.info(f"left out of the support pool (same subject as a test case): {', '.join(leaking)}")
        pool = [c for c in pool if c.group not in test_groups]
        for case in tests + pool:  # at start-up, not after hours of training
            check_case_grid(case)
        too_many = [k for k in self.config.shots if k > len(pool)]
        if too_many:
            raise DataError(f"K={max(too_many)} shots asked for, but only {len(pool)} train case(s) of "
                            f"{datalist.path.name} annotate {', '.join(self.organs)}")
        return pool, tests

    def _method_settings(self, method: str) -> tuple[MethodSettings, object]:
        spec = get_method(method)
        path = method_settings_file(self.config.method_configs, method)
        settings = read_method_settings(path)
        log.info(f"{method}: settings from {path.resolve()}")
        options = from_dict(spec.config_cls, settings.options, where=f"{method}.options")
        if self.config.ti.enabled and not spec.frozen_backbone:
            raise ConfigError(f"--ti needs a frozen backbone; method '{method}' trains it (use lp or adapter)")
        if settings.training.voxel_stride > 1:
            check_voxel_stride(adapt_model(self.base, self.template, self.organs, method, options),
                               settings.training, f"'{method}'")
        return settings, options

    def support(self, case: Case) -> Support:
        if case.id not in self._supports:
            data = self.support_transform(case_item(case, self.datalist.label_map))
            index = data[LABEL][0].numpy()
            target = np.stack([index == k + 1 for k in range(len(self.organs))]).astype(np.uint8)
            empty = [o for o, t in zip(self.organs, target) if not t.any()]
            if empty:
                raise DataError(f"support case '{case.id}': the {', '.join(empty)} mask is empty")
            self._supports[case.id] = Support(case, data[IMAGE].as_tensor(), target, self._scan_key(case))
        return self._supports[case.id]

    def query(self, case: Case) -> Query:
        if case.id not in self._queries:
            masks, reference_volume = load_case_masks(case, self.datalist.label_map, self.organs)
            self._queries[case.id] = Query(case, self.predictor.preprocess(case.image), masks,
                                           load_nifti_image(case.image), reference_volume.spacing, self._scan_key(case))
        return self._queries[case.id]

    def keep_if_best(self, method: str, shots: int, seed: int, rows: list[dict],
                     predictions: dict[str, dict[str, np.ndarray]]) -> None:
        """Draw the test-case overlays of a method's best run so far (highest mean Dice) into pictures/<method>/."""
        mean = float(np.mean([r["dice"] for r in rows]))
        if not self.pictures or mean <= self._best.get(method, -1.0):
            return
        self._best[method] = mean
        for row in rows:
            query = self._queries[row["case"]]
            masks = {"ground truth": query.masks[row["organ"]], "prediction": predictions[row["case"]][row["organ"]]}
            overlay_png(self.out / "pictures" / method / f"{row['case']}_{row['organ']}.png",
                        np.asanyarray(query.reference.dataobj), query.reference.affine, masks,
                        f"{row['case']}, {row['organ']}: {method} K={shots} seed {seed}, Dice {row['dice']:.3f}")

    def _scan_key(self, case: Case) -> str:
        """Identifies a scan's model-space volume: its file content and the preprocessing."""
        return json.dumps([file_digest(case.image), self.pre.to_dict()])

    def features(self, item: Support | Query) -> np.ndarray:
        image = item.image if isinstance(item, Support) else item.data[IMAGE]
        return self.store.get(item.key, image, item.case.id)


def train(adapted: AdaptedModel, supports: list[Support], run: Adaptation, training: TrainingConfig, seed: int,
          epochs: tuple[int, int] | None = None, ti: tuple[TransductiveConfig, torch.Tensor, list[float]] | None = None,
          optimizer_state: dict | None = None, use_feature_cache: bool | None = None) -> TrainResult:
    """Train ``adapted`` on the supports for epochs ``[start, stop)`` (default: all, with early stopping).

    Frozen-backbone methods read crops of cached features unless ``use_feature_cache`` is False (the
    reference code's way: the backbone runs on every full image crop; ``crop_size`` and ``voxel_stride``
    apply to cached features only). With ``ti`` = (settings, pooled query
    features, target proportions), each epoch ends with one step on lam * L_TI of the query.
    """
    cached = adapted.backbone_frozen if use_feature_cache is None else use_feature_cache
    if cached and not adapted.backbone_frozen:
        raise ValueError("cached features need a frozen backbone")
    stride = training.voxel_stride if cached else 1
    if stride > 1:
        check_voxel_stride(adapted, training)
    device = run.device
    crop = training.crop_size if (cached and training.crop_size) else run.pre.roi
    sources = [run.features(s) if cached else s.image.numpy() for s in supports]
    samplers = [CropSampler(s.target, crop, training.pos, training.neg, stride) for s in supports]
    params = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=training.warmup_epochs * len(supports),
                                     t_total=training.epochs * len(supports))
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state["optimizer"])
        scheduler.load_state_dict(optimizer_state["scheduler"])
    loss_fn = PartialLabelLoss(training.dice_weight, training.bce_weight)
    precision = MixedPrecision(device, cpu_bf16=training.cpu_bf16)
    # Convolutions over cached features run 1.2x faster channels-last on the CPU; inference stays contiguous.
    layout = torch.channels_last_3d if cached else torch.contiguous_format
    for part in (adapted.trunk, adapted.head):
        part.to(memory_format=layout)
    micro = training.micro_batch or training.crops_per_volume
    if training.activation_checkpointing and not cached and not enable_activation_checkpointing(adapted):
        log.warning("training.activation_checkpointing: this network offers none; training without it")
    stopper = EarlyStopper(training.early_stop_window, training.early_stop_patience, training.early_stop_min_delta)
    rng = np.random.RandomState(seed)
    start, stop = epochs or (0, training.epochs)
    history: list[float] = []
    for epoch in range(start, stop):
        adapted.set_train_mode()
        losses = []
        for i in rng.permutation(len(supports)):
            slices = samplers[i].slices(training.crops_per_volume, rng)
            optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            # One optimizer step per support volume; its crops go through in micro-batches whose gradients add
            # up to the whole batch's (the loss is a mean over crops).
            for first in range(0, len(slices), micro):
                part = slices[first : first + micro]
                x = torch.stack([torch.from_numpy(np.asarray(sources[i][s], dtype=np.float32)) for s in part])
                y = torch.stack([torch.from_numpy(supports[i].target[s].astype(np.float32)) for s in part])
                x, y = x.to(device, memory_format=layout), y.to(device)
                with precision.autocast():
                    logits = adapted.head_forward(x) if cached else adapted(x)
                share = loss_fn(logits.float(), y, torch.ones(y.shape[:2], device=device)).total
                share = share * len(part) / len(slices)
                if not torch.isfinite(share):
                    raise NonFiniteWeights(f"non-finite loss in epoch {epoch + 1} on support '{supports[i].case.id}'; "
                                           "nothing of this run was saved")
                precision.scaler.scale(share).backward()
                loss += share.item()
            precision.step(optimizer)
            scheduler.step()
            losses.append(loss)
        if ti is not None:
            settings, pooled, proportions = ti
            predicted = torch.sigmoid(adapted.head_forward(pooled)).mean(dim=(0, 2, 3, 4))
            penalty = torch.stack([size_constraint_loss(predicted[k], s, settings.gamma, settings.form)
                                   for k, s in enumerate(proportions)]).mean()
            if penalty.item() > 0:
                optimizer.zero_grad(set_to_none=True)
                precision.scaler.scale(settings.lam * penalty).backward()
                precision.step(optimizer)
        history.append(float(np.mean(losses)))
        if epochs is None and stopper.should_stop(history[-1]):
            log.info(f"early stop after epoch {epoch + 1}: loss plateau at {history[-1]:.4f}")
            break
    for part in (adapted.trunk, adapted.head):
        part.to(memory_format=torch.contiguous_format)
    adapted.eval()
    return TrainResult(history, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})


def check_voxel_stride(adapted: AdaptedModel, training: TrainingConfig, method: str = "this method") -> None:
    """Strided crops skip voxels, which only a head that looks at each voxel on its own can train on."""
    if training.voxel_stride > 1 and not adapted.per_voxel_head:
        raise ConfigError(f"training.voxel_stride={training.voxel_stride} needs a per-voxel head (1x1x1 "
                          f"convolutions only, e.g. lp); {method}'s adapter looks at neighbouring voxels: "
                          "use a smaller crop_size instead")


@torch.no_grad()
def predict_query(adapted: AdaptedModel, query: Query, run: Adaptation) -> dict[str, np.ndarray]:
    """Binary masks of the targets on the query's native grid, computed as fsseg-predict does with the adapter
    file (frozen backbones: the heads over the cached stitched features, which are fsseg-predict's first pass)."""
    adapted.eval()
    if adapted.backbone_frozen:
        features = torch.from_numpy(np.array(run.features(query)))
        probabilities = run.predictor.head_probabilities(features, adapted.head_forward)
    else:
        probabilities = run.predictor.model_space_probabilities(query.data, adapted)
    return run.predictor.finish(query.data, probabilities, query.reference).masks()


def size_targets(supports: list[Support], query: Query) -> list[float]:
    """Each organ's expected size as a proportion of the query's (foreground-cropped) volume."""
    voxels = float(np.prod(query.data[IMAGE].shape[1:]))
    return [organ_size_prior([s.target[k] for s in supports]) / voxels for k in range(len(supports[0].target))]


def run_adaptation(config: AdaptConfig, out: Path, device: torch.device, progress: bool = True,
                   resume: bool = False) -> dict:
    """Every (method, K, seed); writes results.json, results.csv and adapter files under ``out``.

    With ``resume``, the runs that ``out/results.json`` already holds for the same inputs and method settings
    are kept instead of being run again.
    """
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    run = Adaptation(config, out, device)
    log.info(f"{run.datalist.name}: {len(run.pool)} support candidates, {len(run.tests)} test cases, "
             f"targets {', '.join(run.organs)}")
    finished = finished_runs(out / "results.json", run) if resume else {}
    with atomic_path(out / "config.yaml") as tmp:  # only once the run is accepted: a refused --continue keeps it
        tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    rows: list[dict] = []
    jobs = tqdm(total=config.seeds * len(config.shots) * len(config.methods), desc="adapt", unit="run",
                disable=not progress, file=sys.stderr)
    for seed in range(config.seeds):
        for shots in config.shots:
            support_cases = sample_support(run.pool, shots, seed, ", ".join(run.organs))
            supports = [run.support(c) for c in support_cases]
            log.info(f"seed {seed}, K={shots}: support {', '.join(c.id for c in support_cases)}")
            for method in config.methods:
                jobs.set_postfix(method=method, K=shots, seed=seed)
                kept = finished.pop((method, shots, seed), None)
                rows += kept or adapt_one(run, method, shots, seed, supports)
                _write_results(out, rows, config, run, time.time() - started)
                jobs.update()
    jobs.close()
    if finished:
        log.warning(f"results.json no longer lists earlier runs that were not asked for this time: "
                    f"{', '.join(f'{m} K={k} seed {s}' for m, k, s in finished)}")
    if run.pictures and len(config.shots) > 1:
        for organ, methods in results_table(rows, config).items():
            name = "dice_vs_shots.png" if len(run.organs) == 1 else f"dice_vs_shots_{organ}.png"
            dice_vs_shots_png(out / name, methods, f"{organ}: Dice vs shots (mean ± std over {config.seeds} seeds)")
    table = results_table(rows, config)
    summary = {"table": table, "rows": len(rows), "seconds": round(time.time() - started, 1)}
    trainable = {r["method"]: (r["trainable_params"], r["total_params"]) for r in rows}
    print(format_table(table, config, trainable))
    return summary


def run_signature(run: Adaptation) -> dict:
    """What every result row depends on besides its method's settings (compared by ``--continue``)."""
    config = run.config
    return _plain({"checkpoint_sha256": run.checkpoint_sha, "data_list": str(Path(run.datalist.path).resolve()),
                   "organs": run.organs, "tests": [case.id for case in run.tests], "overlap": config.overlap,
                   "precision": run.predictor.precision,
                   "nsd_tolerance": config.nsd_tolerance, "ti": to_dict(config.ti)})


def method_signatures(run: Adaptation) -> dict:
    """Each method's options and training settings, as compared by ``--continue``."""
    return _plain({method: to_dict(settings) for method, (settings, _) in run.settings.items()})


def _plain(data: object) -> object:
    """As it reads back from JSON (tuples as lists), so that saved and current signatures compare equal."""
    return json.loads(json.dumps(data))


def finished_runs(path: Path, run: Adaptation) -> dict[tuple[str, int, int], list[dict]]:
    """The complete (method, K, seed) runs of an earlier ``results.json`` made with the same inputs and settings.

    Raises:
        ConfigError: the file is unreadable or comes from other inputs (checkpoint, data list, structures, ...).
    """
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"--continue: {path} cannot be read ({error}); remove it to start afresh") from None
    rows = document.get("rows") if isinstance(document, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"method", "shots", "seed"} <= set(r)
                                             for r in rows):
        raise ConfigError(f"--continue: {path} is not a results file of fsseg-adapt (no list of rows with "
                          "method, shots and seed); remove it to start afresh")
    if document.get("signature") != run_signature(run):
        raise ConfigError(f"--continue: {path} comes from another checkpoint, data list, target structures, TI or "
                          "scoring settings; choose another --out or drop --continue to start afresh")
    saved, current = document.get("method_settings"), method_signatures(run)
    saved = saved if isinstance(saved, dict) else {}
    groups: dict[tuple[str, int, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["shots"], row["seed"]), []).append(row)
    complete = len(run.tests) * len(run.organs)
    kept = {job: rows for job, rows in groups.items()
            if len(rows) == complete and job[0] in current and saved.get(job[0]) == current[job[0]]}
    changed = sorted({job[0] for job in groups if job[0] in current and saved.get(job[0]) != current[job[0]]})
    log.info(f"--continue: keeping {len(kept)} finished run(s) of {path}"
             + (f"; running again those of {', '.join(changed)} (settings changed)" if changed else ""))
    return kept


def run_seed(organs: list[str], method: str, shots: int, seed: int) -> int:
    """The torch seed of one run, from its identity alone: fresh head rows, adapter and ``scratch`` weights do not
    depend on which runs came before it, in which order, or on ``--continue``."""
    key = json.dumps([list(organs), method, shots, seed]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


def adapt_one(run: Adaptation, method: str, shots: int, seed: int, supports: list[Support]) -> list[dict]:
    settings, options = run.settings[method]
    training = settings.training
    torch.manual_seed(run_seed(run.organs, method, shots, seed))
    adapted = adapt_model(run.base, run.template, run.organs, method, options).to(run.device)
    trainable, total = adapted.parameter_counts()
    began = time.time()
    ti = run.config.ti
    rows, predictions = [], {}
    support_ids = " ".join(s.case.id for s in supports)
    if ti.enabled:
        warm = min(ti.warmup_epochs, training.epochs)
        warmed = train(adapted, supports, run, training, seed, epochs=(0, warm))
        warm_seconds = time.time() - began
        for case in run.tests:
            query = run.query(case)
            pooled = torch.from_numpy(np.asarray(run.features(query), dtype=np.float32))[None]
            pooled = F.avg_pool3d(pooled, ti.pool).to(run.device) if ti.pool > 1 else pooled.to(run.device)
            own = copy.deepcopy(adapted)
            began_query = time.time()
            more = train(own, supports, run, training, seed, epochs=(warm, training.epochs),
                         ti=(ti, pooled, size_targets(supports, query)), optimizer_state=warmed.state)
            seconds = warm_seconds + time.time() - began_query
            scored, predictions[case.id] = score_rows(run, own, query, method, shots, seed, trainable, total, seconds,
                                                      warmed.epochs + more.epochs, support_ids, transductive=True)
            rows += scored
        run.keep_if_best(method, shots, seed, rows, predictions)
        return rows
    ran = train(adapted, supports, run, training, seed).epochs
    seconds = time.time() - began
    if run.config.save_adapters:
        name = f"{'+'.join(run.organs)}_{method}_k{shots}_s{seed}.pt"
        save_adapter(run.out / "adapters" / name, adapted, method, options, run.config.checkpoint, run.pre,
                     {"shots": shots, "seed": seed, "support": support_ids.split(),
                      "inference": run.inference.record()})
    for case in run.tests:
        scored, predictions[case.id] = score_rows(run, adapted, run.query(case), method, shots, seed, trainable, total,
                                                  seconds, ran, support_ids, transductive=False)
        rows += scored
    log.info(f"{method} K={shots} seed {seed}: {ran} epochs, {trainable:,} trainable of {total:,} parameters, "
             f"mean Dice {np.mean([r['dice'] for r in rows]):.3f}")
    run.keep_if_best(method, shots, seed, rows, predictions)
    return rows


def score_rows(run: Adaptation, adapted: AdaptedModel, query: Query, method: str, shots: int, seed: int,
               trainable: int, total: int, seconds: float, epochs: int, support: str,
               transductive: bool) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Result rows of one test case (one per target structure) and the predicted masks."""
    predicted = predict_query(adapted, query, run)
    rows = []
    for organ in run.organs:
        score = score_structure(predicted[organ], query.masks[organ], query.spacing, run.config.nsd_tolerance)
        rows.append({"organ": organ, "method": method, "shots": shots, "seed": seed, "case": query.case.id,
                     "dice": round(score.dice, 4), "nsd": round(score.nsd, 4), "hd95": round(score.hd95, 2),
                     "transductive": transductive, "trainable_params": trainable, "total_params": total,
                     "train_seconds": round(seconds, 2), "epochs": epochs, "support": support})
    return rows, predicted


def results_table(rows: list[dict], config: AdaptConfig) -> dict:
    """{organ: {method: {K: (mean, std) over seeds of the mean Dice over test cases}}}."""
    table: dict = {}
    for organ in dict.fromkeys(r["organ"] for r in rows):
        for method in config.methods:
            for shots in config.shots:
                per_seed = []
                for seed in range(config.seeds):
                    dice = [r["dice"] for r in rows if (r["organ"], r["method"], r["shots"], r["seed"]) ==
                            (organ, method, shots, seed)]
                    if dice:
                        per_seed.append(float(np.mean(dice)))
                if per_seed:
                    table.setdefault(organ, {}).setdefault(method, {})[shots] = (
                        float(np.mean(per_seed)), float(np.std(per_seed)))
    return table


def format_table(table: dict, config: AdaptConfig, parameters: dict[str, tuple[int, int]]) -> str:
    """Rows = method, columns = K (mean ± std over seeds), then trainable parameters and the ratio to all."""
    lines = []
    for organ, methods in table.items():
        lines.append(f"Dice on the test cases, {organ} (mean ± std over {config.seeds} seed(s)):")
        lines.append(f"{'method':<10}" + "".join(f"{'K=' + str(k):>16}" for k in config.shots)
                     + f"{'trainable':>14}{'fewer':>9}")
        for method, cells in methods.items():
            trainable, total = parameters[method]
            lines.append(f"{method:<10}" + "".join(
                f"{cells[k][0]:>9.3f} ± {cells[k][1]:.3f}" if k in cells else f"{'-':>16}" for k in config.shots)
                + f"{trainable:>14,}{total / trainable:>8.0f}x")
    return "\n".join(lines)


def _pictures_available() -> bool:
    try:
        pyplot()
    except FssegError as error:
        log.warning(f"pictures skipped: {error}")
        return False
    return True


def best_adapter(rows: list[dict], out: Path, organs: list[str]) -> dict | None:
    """The (method, K) with the highest mean Dice and its seed-0 adapter file, for the largest K run."""
    candidates = [r for r in rows if not r["transductive"]]
    if not candidates:
        return None
    shots = max(r["shots"] for r in candidates)
    means = {}
    for method in dict.fromkeys(r["method"] for r in candidates):
        dice = [r["dice"] for r in candidates if r["method"] == method and r["shots"] == shots]
        if dice:
            means[method] = float(np.mean(dice))
    method = max(means, key=means.get)
    path = out / "adapters" / f"{'+'.join(organs)}_{method}_k{shots}_s0.pt"
    return {"method": method, "shots": shots, "mean_dice": means[method], "adapter": str(path) if path.exists() else None}


def _write_results(out: Path, rows: list[dict], config: AdaptConfig, run: Adaptation, seconds: float) -> None:
    with atomic_path(out / "results.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    table = results_table(rows, config)
    document = {
        "best": best_adapter(rows, out, run.organs),
        "checkpoint": config.checkpoint, "checkpoint_sha256": run.checkpoint_sha, "data_list": config.data_list,
        "organs": run.organs, "evaluation_space": "native grid of each test case",
        "signature": run_signature(run), "method_settings": method_signatures(run),
        "table": {o: {m: {str(k): {"mean": v[0], "std": v[1]} for k, v in c.items()} for m, c in ms.items()}
                  for o, ms in table.items()},
        "rows": rows, "seconds": round(seconds, 1),
    }
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(document, indent=1) + "\n")
