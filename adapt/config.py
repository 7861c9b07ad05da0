"""The adaptation configuration: the run (configs/adapt/default.yaml) and each method's defaults
(configs/adapt/<method>.yaml, shipped with the package), validated into these dataclasses at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fsseg.adapters.base import Composition, get_method
from fsseg.config import from_dict, load_yaml, ranged, setting
from fsseg.errors import ConfigError
from fsseg.losses.size_prior import FORMS
from fsseg.resources import find_config
from fsseg.templates import expand_structures


@dataclass
class TrainingConfig:
    """How one method trains on the support set.

    An epoch is ``steps_per_epoch`` optimizer steps, each on ``crops_per_volume`` crops of one support volume
    (supports visited in shuffled rounds), so the schedule means the same number of steps whatever K is;
    ``steps_per_epoch: null`` makes an epoch one pass over the K supports (the reference code's epoch). Crops
    are ``crop_size`` voxels (default: the checkpoint's roi; frozen-backbone methods train on cached features and
    may use smaller crops, or read every ``voxel_stride``-th voxel of each crop when their head is per-voxel;
    methods that keep the encoder of an I3ResNet frozen, such as ``ft-last``, train the decoder on its cached skips).
    AdamW with a linear warm-up over ``warmup_epochs`` from ``warmup_start`` x lr, then a cosine decay that reaches 0
    after ``cosine_epochs`` (default: ``epochs``); on a GPU with autocast (bfloat16, else float16), on the CPU in
    float32 unless ``cpu_bf16``. Negative crops (``neg`` of ``pos + neg``) are centred on background inside the
    body (``neg_in_body``: above the HU window's floor) rather than anywhere, air and padding included. Image crops
    (methods that run the backbone) get a random intensity shift of up to ``intensity_shift`` with probability
    ``intensity_shift_prob``; cached features and skips have no image to shift. Training stops early when the moving
    average (over ``early_stop_window`` epochs) of the loss improved by less than ``early_stop_min_delta`` over the
    last ``early_stop_patience`` epochs, and never before ``early_stop_window + early_stop_patience`` epochs.

    The reference code (FSEFT): ``steps_per_epoch: null``, ``warmup_start: 1.0`` (its warm-up starts at lr),
    ``cosine_epochs: 200`` over at most 199 epochs, ``bce_weight: 0`` (Dice only), ``neg_in_body: true``,
    ``intensity_shift: 0.1`` with ``intensity_shift_prob: 0.2``.
    """

    lr: float = ranged(1e-2, "(0, inf)", help="AdamW's peak learning rate")
    weight_decay: float = ranged(0.0, help="AdamW's weight decay")
    epochs: int = ranged(100, "[1, inf)", help="most epochs (early stopping may end sooner)")
    steps_per_epoch: int | None = ranged(
        10, "[1, inf)", help="optimizer steps an epoch (null: one pass over the K supports)"
    )
    warmup_epochs: int = ranged(1, help="epochs of linear warm-up")
    warmup_start: float = ranged(0.0, "[0, 1]", help="the warm-up's first learning rate, as a fraction of lr")
    cosine_epochs: int | None = ranged(None, "[1, inf)", help="where the cosine decay reaches 0 (default: epochs)")
    crops_per_volume: int = ranged(6, "[1, inf)", help="crops of one support volume a step")
    crop_size: tuple[int, int, int] | None = ranged(None, "[1, inf)", help="crop size in voxels (default: the roi)")
    voxel_stride: int = ranged(1, "[1, inf)", help="read every n-th voxel of a crop (per-voxel heads only)")
    pos: float = ranged(1.0, help="weight of crops centred on the structure (pos of pos + neg)")
    neg: float = ranged(1.0, help="weight of crops centred on background")
    neg_in_body: bool = setting(True, help="centre background crops inside the body, not in air or padding")
    intensity_shift: float = ranged(0.0, help="largest random intensity shift of an image crop")
    intensity_shift_prob: float = ranged(0.0, "[0, 1]", help="probability of that shift for each image crop")
    dice_weight: float = ranged(1.0, help="weight of the Dice term")
    bce_weight: float = ranged(1.0, help="weight of the binary cross-entropy term (0: Dice only, the reference)")
    micro_batch: int | None = ranged(None, "[1, inf)", help="crops a forward pass (null: all crops of a step)")
    activation_checkpointing: bool = setting(False, help="recompute activations in the backward pass: less memory")
    cpu_bf16: bool = setting(False, help="bfloat16 autocast on the CPU (faster on CPUs with bf16 instructions)")
    early_stop_window: int = ranged(10, "[1, inf)", help="epochs the loss is averaged over for early stopping")
    early_stop_patience: int = ranged(20, "[1, inf)", help="epochs without improvement before stopping")
    early_stop_min_delta: float = ranged(1e-3, help="smallest improvement of the averaged loss that counts")

    def __post_init__(self) -> None:
        if self.voxel_stride < 1 or self.crops_per_volume < 1 or self.epochs < 1:
            raise ConfigError("training.voxel_stride, crops_per_volume and epochs must be at least 1")
        if self.pos + self.neg <= 0:
            raise ConfigError("training.pos and training.neg cannot both be 0: no crop could be drawn")
        if self.dice_weight + self.bce_weight <= 0:
            raise ConfigError("training.dice_weight and training.bce_weight cannot both be 0: nothing would train")
        if self.cosine_epochs is not None and self.cosine_epochs < self.epochs:
            raise ConfigError(
                f"training.cosine_epochs={self.cosine_epochs} must be at least epochs={self.epochs}: "
                "past its end the cosine would climb back up"
            )


@dataclass
class MethodSettings:
    """One configs/adapt/<method>.yaml: the method's own options, what becomes of the decoder and bottleneck
    (``compose``), and its training defaults."""

    options: dict = setting(default_factory=dict, help="the method's own options (fsseg-adapt --list-methods)")
    compose: Composition = field(default_factory=Composition)
    training: TrainingConfig = field(default_factory=TrainingConfig)


@dataclass
class TransductiveConfig:
    """The organ-size constraint on the query scan (frozen-backbone methods): L_SEG + lam * L_TI.

    TI steps join after ``warmup_epochs`` support-only epochs, one per epoch; the query's features are
    average-pooled by ``pool`` for the predicted size.
    """

    enabled: bool = setting(False, help="adapt each test case with the organ-size constraint on it")
    gamma: float = ranged(0.3, "[0, 1)", help="half-width of the size band around the prior, as a fraction of it")
    lam: float = ranged(0.1, help="weight of the size term")
    form: str = setting("relative", help="the hinge: relative (FSEFT v1) or absolute")
    warmup_epochs: int = ranged(50, help="support-only epochs before the size steps join")
    pool: int = ranged(2, "[1, inf)", help="average pooling of the query's features for the predicted size")

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ConfigError(f"ti.form '{self.form}' is not one of {', '.join(FORMS)}")


@dataclass
class AdaptConfig:
    """An adaptation run: every (method, shots, seed) on one data list's train/test splits.

    ``overlap``, ``sw_batch_size``, ``amp`` and ``cpu_bf16`` are the sliding-window settings of feature extraction
    and scoring (see :class:`fsseg.inference.InferenceSettings`); adapter files record them, and fsseg-predict
    uses them by default so that it delivers the masks scored here.

    ``cache_dir`` holds the frozen-backbone features and encoder skips (default: ``features/`` and
    ``encoder_features/`` under the run's output folder). Runs may share one, such as the parts of a sweep or runs
    of other methods on the same checkpoint and scans: an entry is keyed by the checkpoint's and the scan's content,
    the preprocessing and the sliding-window settings, and written atomically.
    """

    checkpoint: str = setting("demo_out/pretrain/checkpoint_latest.pt", help="the pretrained fsseg checkpoint")
    data_list: str = setting(
        "demo_out/data/phantom_target.json", help="data list: train cases are the support pool, test cases scored"
    )
    data_root: str | None = setting(None, help="base folder for relative paths of a list without a 'root'")
    organs: list[str] = setting(default_factory=lambda: ["gallbladder"], help="the target structures")
    shots: list[int] = ranged(interval="[1, inf)", default_factory=lambda: [1, 5], help="support-set sizes K")
    methods: list[str] = setting(default_factory=lambda: ["lp", "adapter"], help="adaptation methods, compared")
    seeds: int = ranged(3, "[1, inf)", help="support draws per K (seeds 0..N-1)")
    ti: TransductiveConfig = field(default_factory=TransductiveConfig)
    method_configs: str = setting("configs/adapt", help="folder of the methods' settings, <method>.yaml each")
    overlap: float = ranged(0.5, "[0, 1)", help="sliding-window overlap of feature extraction and scoring")
    sw_batch_size: int | None = ranged(None, "[1, inf)", help="windows a forward pass (default: by device and roi)")
    amp: bool = setting(True, help="float16 autocast on CUDA")
    cpu_bf16: bool = setting(False, help="bfloat16 autocast of the sliding window on the CPU")
    nsd_tolerance: float = ranged(2.0, "(0, inf)", help="normalised surface Dice tolerance in mm")
    save_adapters: bool = setting(True, help="write each run's adapter file under adapters/")
    pictures: bool = setting(True, help="draw the test cases and Dice against K (needs the viz extra)")
    cache_dir: str | None = setting(
        None, help="where frozen-backbone features and encoder skips are cached (default: under the run folder)"
    )

    def __post_init__(self) -> None:
        if self.seeds < 1 or not self.shots or min(self.shots) < 1:
            raise ConfigError("seeds and every shot count must be at least 1")
        if not self.organs or not self.methods:
            raise ConfigError("name at least one organ and one method")
        expand_structures(self.organs)  # a name that cannot name files is refused before --out is made
        for method in self.methods:
            get_method(method)
        for key in ("organs", "shots", "methods"):
            values = getattr(self, key)
            repeated = sorted({str(v) for v in values if values.count(v) > 1})
            if repeated:  # each (method, K, seed) run would be trained and counted more than once
                raise ConfigError(f"{key} lists {', '.join(repeated)} more than once")

    def jobs(self) -> list[tuple[int, int, str]]:
        """Every (seed, K, method) run, in the order they run; part I of a sweep in P parts takes every P-th from
        the I-th."""
        return [(seed, shots, method) for seed in range(self.seeds) for shots in self.shots for method in self.methods]


def method_settings_file(folder: str | Path, method: str) -> Path:
    """``<folder>/<method>.yaml``, ``configs/...`` folders falling back to the shipped ones.

    Raises:
        ConfigError: the file does not exist (a method never trains on silent built-in defaults).
    """
    path = find_config(folder) / f"{method}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"{path}: no settings for method '{method}' (method_configs is {folder}); add the file "
            f"or point method_configs at a folder that has it"
        )
    return path


def load_method_settings(folder: str | Path, method: str) -> MethodSettings:
    """The settings of ``method`` from :func:`method_settings_file`, validated."""
    return read_method_settings(method_settings_file(folder, method))


def read_method_settings(path: Path) -> MethodSettings:
    """One method's settings file, validated."""
    try:
        return from_dict(MethodSettings, load_yaml(path))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
