"""The adaptation loop: k-shot supports -> adapted model -> test predictions scored in native space.

For each seed and shot count K, one support set is drawn (the same for every method). Each method adapts a
copy of the pretrained model: frozen-backbone methods train on features cached once per scan (shared by
every method, K and seed), the others on live crops. Every test case is then predicted on its own grid and
scored with the same code as ``fsseg-evaluate``. With the transductive size constraint, each test case gets
its own adaptation (the support-trained state, then TI steps on that query).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from fsseg.adapt.config import AdaptConfig, MethodSettings, method_settings_file, read_method_settings
from fsseg.adapt.results import (
    RUN_FILES,
    adapter_name,
    check_own_run_files,
    finished_runs,
    results_table,
    run_header,
    write_results,
    write_summary,
)
from fsseg.adapt.training import Support, check_voxel_stride, train
from fsseg.adapters import AdaptedModel, adapt_model, get_method
from fsseg.adapters.artifact import save_adapter
from fsseg.adapters.feature_cache import FeatureStore
from fsseg.cache import file_digest
from fsseg.checkpoint import load_model, sha256_file
from fsseg.config import from_dict, to_dict
from fsseg.data.annotations import check_case_grid, load_case_masks
from fsseg.data.datalist import Case, DataList, load_datalist
from fsseg.data.sampling import sample_support
from fsseg.data.scans import load_scan_image
from fsseg.data.transforms import IMAGE, LABEL, case_item, inference_transforms
from fsseg.errors import ConfigError, DataError, FssegError
from fsseg.files import atomic_path
from fsseg.inference import InferenceSettings, Predictor
from fsseg.inference.confidence import PRIORS, structure_confidences
from fsseg.inference.predictor import FrozenBackbone, Prediction
from fsseg.losses.size_prior import organ_size_prior
from fsseg.metrics import score_structure
from fsseg.outputs import check_outputs, prepare_output_dir
from fsseg.templates import Template, expand_structures, suggest_name
from fsseg.training.encoder_cache import EncodedScan, EncoderCache, pad_for_encoder, splits_at_encoder
from fsseg.training.runtime import resolve_device, seed_everything
from fsseg.viz import dice_vs_shots_png, overlay_png, pyplot

log = logging.getLogger("fsseg.adapt")


@dataclass
class Query:
    """A test case: its model-space data (for inversion), native ground truth and grid."""

    case: Case
    data: dict
    masks: dict[str, np.ndarray]
    reference: object
    spacing: tuple[float, ...]
    key: str


class Adaptation:
    """One adaptation run's data and frozen backbone, shared by every method, shot count and seed."""

    def __init__(self, config: AdaptConfig, out: Path, device: torch.device, progress: bool | None = None) -> None:
        self.config, self.out, self.device = config, out, device
        self.progress = progress  # inside each training run: a bar (True), a line an epoch (False) or nothing
        self.base, self.template, self.pre, _ = load_model(config.checkpoint)
        self.base = self.base.to(device).eval()
        self.checkpoint_sha = sha256_file(config.checkpoint)
        self.datalist = load_datalist(config.data_list, config.data_root)
        self.organs = expand_structures(config.organs)
        if self.base.head_trained:
            known = [o for o in self.organs if o in self.template]
            fresh = [o for o in self.organs if o not in self.template]
            log.info(
                f"heads: {', '.join(known) or 'none'} start from the checkpoint's '{self.template.name}' rows"
                + (f"; fresh head rows for {', '.join(fresh)} (not in the template)" if fresh else "")
            )
        else:
            log.info(
                f"heads: fresh rows for {', '.join(self.organs)} (the checkpoint's head was not trained: "
                "it was imported without one)"
            )
        if not self.base.decoder_trained:
            log.warning(
                "warning: the checkpoint's decoder was never trained (an encoder imported alone): methods "
                "that keep it frozen read features of initial decoder weights; train it first with "
                "fsseg-pretrain (model.init: this checkpoint, model.freeze: [encoder])"
            )
        self.targets = Template("targets", tuple(self.organs), tuple(range(1, len(self.organs) + 1)))
        self.pool, self.tests = self._pools(self.datalist)
        self.settings = {m: self._method_settings(m) for m in config.methods}
        self.inference = InferenceSettings(
            overlap=config.overlap, sw_batch_size=config.sw_batch_size, amp=config.amp, cpu_bf16=config.cpu_bf16
        )
        self.predictor = Predictor(self.base, self.organs, self.pre, device, self.inference)
        backbone = FrozenBackbone(self.base.features, self.base.feature_channels, self.base.head)
        cache = Path(config.cache_dir) if config.cache_dir else out
        # The overlap enters the key: stitched features blend windows, so other overlaps give other features.
        self.store = FeatureStore(
            cache / "features",
            json.dumps([self.checkpoint_sha, self.predictor.precision, config.overlap]),
            lambda image: self.predictor.stitched_features(image, backbone),
        )
        self.encoder_cache = (
            EncoderCache(cache / "encoder_features", self.base, json.dumps([self.checkpoint_sha, self.base.arch]))
            if splits_at_encoder(self.base)
            else None
        )
        self.support_transform = inference_transforms(self.pre, keys=(IMAGE, LABEL), template=self.targets)
        self._supports: dict[str, Support] = {}
        self._queries: dict[str, Query] = {}
        self._best: dict[str, float] = {}
        self.pictures = config.pictures and _pictures_available()

    def _pools(self, datalist: DataList) -> tuple[list[Case], list[Case]]:
        missing = [o for o in self.organs if o not in datalist.structures]
        if missing:
            raise DataError(
                f"{datalist.path}: no case annotates {', '.join(missing)}"
                f"{suggest_name(missing[0], datalist.structures)}; it annotates: {', '.join(datalist.structures)}"
            )
        tests, pool = datalist.cases_annotating(self.organs, "test"), datalist.cases_annotating(self.organs, "train")
        if not tests:
            self._without_tests(datalist)
        test_groups = {c.group for c in tests}
        leaking = [c.id for c in pool if c.group in test_groups]
        if leaking:
            log.info(f"left out of the support pool (same subject as a test case): {', '.join(leaking)}")
        pool = [c for c in pool if c.group not in test_groups]
        for case in tests + pool:  # at start-up, not after hours of training
            check_case_grid(case)
        too_many = [k for k in self.config.shots if k > len(pool)]
        if too_many:
            raise DataError(
                f"K={max(too_many)} shots asked for, but only {len(pool)} train case(s) of "
                f"{datalist.path.name} annotate {', '.join(self.organs)}"
            )
        return pool, tests

    def _without_tests(self, datalist: DataList) -> None:
        """A list without annotated test cases: the adapters are trained and saved, nothing is scored (a person
        labelling scans has none to spare). Refused where that leaves nothing to do or to adapt on."""
        organs = ", ".join(self.organs)
        if self.config.ti.enabled:
            raise DataError(f"{datalist.path}: no 'test' case annotates {organs}; the transductive step adapts on them")
        if not self.config.save_adapters:
            raise DataError(f"{datalist.path}: no 'test' case annotates {organs}, and save_adapters is false")
        log.info(f"no 'test' case annotates {organs}: the adapters are trained and saved, nothing is scored")

    def _method_settings(self, method: str) -> tuple[MethodSettings, object]:
        spec = get_method(method)
        path = method_settings_file(self.config.method_configs, method)
        settings = read_method_settings(path)
        log.info(f"{method}: settings from {path.resolve()}")
        options = from_dict(spec.config_cls, settings.options, where=f"{method}.options")
        if self.config.ti.enabled or settings.training.voxel_stride > 1:  # at start-up, not after hours
            probe = adapt_model(self.base, self.template, self.organs, method, options, settings.compose)
            if self.config.ti.enabled and not probe.backbone_frozen:
                raise ConfigError(
                    f"--ti needs a frozen backbone; method '{method}' trains a part of it (use lp or "
                    "adapter, without compose)"
                )
            check_voxel_stride(probe, settings.training, f"'{method}'")
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
            self._queries[case.id] = Query(
                case,
                self.predictor.preprocess(case.image),
                masks,
                load_scan_image(case.image),
                reference_volume.spacing,
                self._scan_key(case),
            )
        return self._queries[case.id]

    def keep_if_best(
        self, method: str, shots: int, seed: int, rows: list[dict], predictions: dict[str, dict[str, np.ndarray]]
    ) -> None:
        """Draw the test-case overlays of a method's best run so far (highest mean Dice) into pictures/<method>/."""
        if not rows:  # nothing scored
            return
        mean = float(np.mean([r["dice"] for r in rows]))
        if not self.pictures or mean <= self._best.get(method, -1.0):
            return
        self._best[method] = mean
        for row in rows:
            query = self._queries[row["case"]]
            organ = row["organ"]
            overlay_png(
                self.out / "pictures" / method / f"{row['case']}_{organ}.png",
                np.asanyarray(query.reference.dataobj),
                query.reference.affine,
                {organ: predictions[row["case"]][organ]},
                f"{row['case']}, {organ}: {method} K={shots} seed {seed}, Dice {row['dice']:.3f}",
                truth={organ: query.masks[organ]},
            )

    def _scan_key(self, case: Case) -> str:
        """Identifies a scan's model-space volume: its file content and the preprocessing."""
        return json.dumps([file_digest(case.image), self.pre.to_dict()])

    def features(self, item: Support | Query) -> np.ndarray:
        image = item.image if isinstance(item, Support) else item.data[IMAGE]
        return self.store.get(item.key, image, item.case.id)

    def encoded(self, item: Support) -> EncodedScan:
        """The support's encoder skips (computed over the whole padded scan on first use)."""
        encoded = self.encoder_cache.load(item.key)
        if encoded is None:
            image = pad_for_encoder(item.image.float(), self.encoder_cache.strides, self.pre.roi)
            encoded = self.encoder_cache.encode(item.key, image, name=item.case.id)
        return encoded


@torch.no_grad()
def predict_query(adapted: AdaptedModel, query: Query, run: Adaptation) -> Prediction:
    """The targets' prediction on the query's native grid, computed as fsseg-predict does with the adapter file
    (frozen backbones: the heads over the cached stitched features, which are fsseg-predict's first pass)."""
    adapted.eval()
    if adapted.backbone_frozen:
        features = torch.from_numpy(np.array(run.features(query)))
        probabilities = run.predictor.head_probabilities(features, adapted.head_forward)
    else:
        probabilities = run.predictor.model_space_probabilities(query.data, adapted)
    return run.predictor.finish(query.data, probabilities, query.reference)


def support_size_priors(supports: list[Support]) -> list[float]:
    """Each target's organ-size prior in model voxels from the supports' masks: the transductive constraint's
    prior, and (in ml, :func:`priors_ml`) what the confidence of a predicted mask compares its volume with."""
    return [organ_size_prior([s.target[k] for s in supports]) for k in range(len(supports[0].target))]


def priors_ml(run: Adaptation, job: Job) -> dict[str, float]:
    """The job's organ-size priors in ml, by target."""
    voxel_ml = float(np.prod(run.pre.spacing)) / 1000.0
    return {organ: size * voxel_ml for organ, size in zip(run.organs, job.size_priors)}


def size_targets(job: Job, query: Query) -> list[float]:
    """Each organ's expected size as a proportion of the query's (foreground-cropped) volume."""
    voxels = float(np.prod(query.data[IMAGE].shape[1:]))
    return [size / voxels for size in job.size_priors]


def run_adaptation(
    config: AdaptConfig,
    out: Path,
    device: torch.device,
    progress: bool = True,
    resume: bool = False,
    part: tuple[int, int] = (0, 1),
) -> dict:
    """Every (method, K, seed), or part ``part`` = (I, P) of them; writes results.json, results.csv and adapter
    files under ``out``.

    With ``resume``, the runs that ``out/results.json`` already holds for the same inputs and method settings
    are kept instead of being run again. Each run is seeded from its own identity, so the parts of a sweep,
    merged (``fsseg-adapt --merge``), equal one run of the whole.
    """
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    run = Adaptation(config, out, device, progress)
    log.info(
        f"{run.datalist.name}: {len(run.pool)} support candidates, {len(run.tests)} test cases, "
        f"targets {', '.join(run.organs)}"
    )
    finished = finished_runs(out / "results.json", run) if resume else {}
    with atomic_path(out / "config.yaml") as tmp:  # only once the run is accepted: a refused --continue keeps it
        tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    rows: list[dict] = []
    mine = config.jobs()[part[0] :: part[1]]
    if part[1] > 1:
        log.info(f"part {part[0]} of parts 0..{part[1] - 1}: {len(mine)} of the sweep's {len(config.jobs())} runs")
    jobs = tqdm(total=len(mine), desc="adapt", unit="run", disable=not progress, file=sys.stderr)
    header = run_header(run)
    drawn, supports = None, []
    for seed, shots, method in mine:
        if drawn != (seed, shots):  # the runs of one (seed, K) come one after another
            support_cases = sample_support(run.pool, shots, seed, ", ".join(run.organs))
            drawn, supports = (seed, shots), [run.support(c) for c in support_cases]
            log.info(f"seed {seed}, K={shots}: support {', '.join(c.id for c in support_cases)}")
        jobs.set_postfix(method=method, K=shots, seed=seed)
        kept = finished.pop((method, shots, seed), None)
        rows += kept or adapt_one(run, method, shots, seed, supports)
        write_results(out, rows, config, header, time.time() - started, part)
        jobs.update()
    jobs.close()
    if finished:
        log.warning(
            f"results.json no longer lists earlier runs that were not asked for this time: "
            f"{', '.join(f'{m} K={k} seed {s}' for m, k, s in finished)}"
        )
    if run.pictures and len(config.shots) > 1:
        for organ, methods in results_table(rows, config).items():
            name = "dice_vs_shots.png" if len(run.organs) == 1 else f"dice_vs_shots_{organ}.png"
            dice_vs_shots_png(out / name, methods, f"{organ}: Dice vs shots (mean ± std over {config.seeds} seeds)")
    table = results_table(rows, config)
    summary = {"table": table, "rows": len(rows), "seconds": round(time.time() - started, 1)}
    print(write_summary(out, table, config, rows), end="")
    return summary


def run_seed(organs: list[str], method: str, shots: int, seed: int) -> int:
    """The torch seed of one run, from its identity alone: fresh head rows, adapter and ``scratch`` weights do not
    depend on which runs came before it, in which order, or on ``--continue``."""
    key = json.dumps([list(organs), method, shots, seed]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


@dataclass
class Job:
    """One (method, K, seed) run: the model it trains, its settings and supports."""

    method: str
    shots: int
    seed: int
    supports: list[Support]
    adapted: AdaptedModel
    settings: MethodSettings
    options: Any
    trainable: int = 0  # parameters that train, of ``total``: counted once, before training
    total: int = 0
    size_priors: list[float] = field(default_factory=list)  # :func:`support_size_priors`, found once

    @property
    def name(self) -> str:
        return f"{self.method} K={self.shots} seed {self.seed}"

    @property
    def support_ids(self) -> str:
        return " ".join(s.case.id for s in self.supports)


def adapt_one(run: Adaptation, method: str, shots: int, seed: int, supports: list[Support]) -> list[dict]:
    """Adapt with one method to one support set and score it on the test cases: the run's result rows."""
    settings, options = run.settings[method]
    torch.manual_seed(run_seed(run.organs, method, shots, seed))
    adapted = adapt_model(run.base, run.template, run.organs, method, options, settings.compose).to(run.device)
    counts = adapted.parameter_counts()
    job = Job(method, shots, seed, supports, adapted, settings, options, *counts, support_size_priors(supports))
    rows, predictions = (adapt_transductive if run.config.ti.enabled else adapt_inductive)(run, job)
    run.keep_if_best(method, shots, seed, rows, predictions)
    return rows


def adapt_inductive(run: Adaptation, job: Job) -> tuple[list[dict], dict]:
    """Train once on the supports, save the adapter, score every test case."""
    began = time.time()
    ran = train(
        job.adapted, job.supports, run, job.settings.training, job.seed, name=job.name, progress=run.progress
    ).epochs
    seconds = time.time() - began
    if run.config.save_adapters:
        record = {
            "shots": job.shots,
            "seed": job.seed,
            "support": job.support_ids.split(),
            "inference": run.inference.record(),
            "compose": to_dict(job.settings.compose),
            PRIORS: {organ: round(ml, 3) for organ, ml in priors_ml(run, job).items()},
        }
        save_adapter(
            run.out / "adapters" / adapter_name(run.organs, job.method, job.shots, job.seed),
            job.adapted,
            job.method,
            job.options,
            run.config.checkpoint,
            run.pre,
            record,
        )
    rows, predictions = [], {}
    for case in run.tests:
        scored, predictions[case.id] = score_rows(run, job, job.adapted, run.query(case), seconds, ran, False)
        rows += scored
    log.info(
        f"{job.name}: {ran} epochs, {job.trainable:,} trainable of {job.total:,} parameters, "
        f"mean Dice {np.mean([r['dice'] for r in rows]):.3f}"
    )
    return rows, predictions


def adapt_transductive(run: Adaptation, job: Job) -> tuple[list[dict], dict]:
    """Train on the supports up to ``ti.warmup_epochs``, then, for each test case, on from there with the size
    constraint on that case; score each case with its own model."""
    ti, training = run.config.ti, job.settings.training
    began = time.time()
    warmed = train(
        job.adapted,
        job.supports,
        run,
        training,
        job.seed,
        until=min(ti.warmup_epochs, training.epochs),
        name=job.name,
        progress=run.progress,
    )
    warm_seconds = time.time() - began
    if warmed.stopped:
        log.warning(
            f"{job.name}: the support loss plateaued after {warmed.epochs} epochs, before "
            f"ti.warmup_epochs={ti.warmup_epochs}: no TI step was taken (the same stop as without --ti); "
            "lower ti.warmup_epochs to let TI act"
        )
    rows, predictions = [], {}
    for case in run.tests:
        query = run.query(case)
        pooled = torch.from_numpy(np.asarray(run.features(query), dtype=np.float32))[None]
        pooled = F.avg_pool3d(pooled, ti.pool).to(run.device) if ti.pool > 1 else pooled.to(run.device)
        own = copy.deepcopy(job.adapted)
        began_query = time.time()
        more = train(
            own,
            job.supports,
            run,
            training,
            job.seed,
            ti=(ti, pooled, size_targets(job, query)),
            resume=warmed,
            name=job.name,
            progress=run.progress,
        )
        seconds = warm_seconds + time.time() - began_query
        scored, predictions[case.id] = score_rows(run, job, own, query, seconds, more.epochs, True)
        rows += scored
    return rows, predictions


def score_rows(
    run: Adaptation, job: Job, model: AdaptedModel, query: Query, seconds: float, epochs: int, transductive: bool
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Result rows of one test case (one per target structure) and the predicted masks."""
    prediction = predict_query(model, query, run)
    predicted = prediction.masks()
    voxel_ml = float(np.prod(query.spacing)) / 1000.0
    volumes = {organ: float(mask.sum()) * voxel_ml for organ, mask in predicted.items()}
    confidences = structure_confidences(prediction.structures, prediction.uncertainty, volumes, priors_ml(run, job))
    rows = []
    for organ in run.organs:
        score = score_structure(predicted[organ], query.masks[organ], query.spacing, run.config.nsd_tolerance)
        rows.append(
            {
                "organ": organ,
                "method": job.method,
                "shots": job.shots,
                "seed": job.seed,
                "case": query.case.id,
                "dice": round(score.dice, 4),
                "nsd": round(score.nsd, 4),
                "hd95": round(score.hd95, 2),
                "confidence": round(confidences[organ].confidence, 4),
                "transductive": transductive,
                "trainable_params": job.trainable,
                "total_params": job.total,
                "train_seconds": round(seconds, 2),
                "epochs": epochs,
                "support": job.support_ids,
            }
        )
    return rows, predicted


def _pictures_available() -> bool:
    try:
        pyplot()
    except FssegError as error:
        log.warning(f"pictures skipped: {error}")
        return False
    return True


def adapt(
    config: AdaptConfig,
    out: str | Path,
    device: str = "auto",
    progress: bool = True,
    resume: bool = False,
    part: tuple[int, int] = (0, 1),
) -> dict:
    """Check that ``out`` replaces neither an input nor another command's files, then :func:`run_adaptation` there
    on ``device`` (``auto``, ``cpu`` or ``cuda``). Returns the run's summary: the method x K table of mean and
    std Dice per structure, the number of result rows and the seconds taken; every row is in ``out/results.json``.

    Raises:
        FssegError: a bad input, an ``out`` that is not fsseg-adapt's, or a ``resume`` that does not fit.
    """
    out = Path(out)
    check_outputs([out / name for name in RUN_FILES], [config.checkpoint, config.data_list], option="--out")
    check_own_run_files(out)
    prepare_output_dir(out, "--out")
    seed_everything(0)
    return run_adaptation(config, out, resolve_device(device), progress=progress, resume=resume, part=part)
