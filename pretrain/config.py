"""The pretraining configuration: one YAML file, validated into these dataclasses at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from fsseg.config import ranged, setting
from fsseg.data.transforms import Augmentation
from fsseg.errors import ConfigError
from fsseg.models.base import BLOCK_GROUPS
from fsseg.preprocessing import Preprocessing


@dataclass
class ModelConfig:
    """A registered model (``fsseg.models.list_models()``) and keyword arguments for it.

    ``init``: an fsseg checkpoint to start from (e.g. an encoder imported with fsseg-import-checkpoint); its model
    and preprocessing must be the config's. ``freeze``: block groups that keep their weights (``[encoder]``
    trains the decoder and head of a published encoder).
    """

    name: str = setting("swinunetr", help="the registered backbone (fsseg-pretrain --list-models)")
    kwargs: dict = setting(default_factory=dict, help="keyword arguments of the backbone, e.g. {feature_size: 48}")
    init: str | None = setting(None, help="an fsseg checkpoint to start from, of the same model and preprocessing")
    freeze: list[str] = setting(default_factory=list, help="block groups that keep their weights, e.g. [encoder]")

    def __post_init__(self) -> None:
        unknown = [g for g in self.freeze if g not in BLOCK_GROUPS or g == "head"]
        if unknown:
            raise ConfigError(
                f"model.freeze: unknown block group(s) {', '.join(map(str, unknown))}; expected some "
                f"of {', '.join(g for g in BLOCK_GROUPS if g != 'head')}"
            )


@dataclass
class DataConfig:
    """Data lists of the partially labelled source datasets; their ``train`` cases are used."""

    lists: list[str] = setting(default_factory=list, help="the data lists to pretrain on (their train cases)")
    data_root: str | None = setting(None, help="base folder for relative paths of lists without a 'root'")
    cache: bool = setting(True, help="keep each preprocessed volume on disk, so later epochs only crop")
    cache_dir: str | None = setting(None, help="where the preprocessed volumes go (default: <out>/cache)")
    encoder_cache: bool = setting(
        True,
        help="with model.freeze: [encoder] on a network that splits at its encoder (i3resnet): encode each scan "
        "once and train on crops of its features (no augmentation but the crop); false: run the encoder each step",
    )


@dataclass
class SamplingConfig:
    """Which volumes an epoch visits.

    ``uniform_datasets`` draws a dataset uniformly, then one of its cases, so a small dataset is not drowned
    by a large one. ``volumes_per_epoch`` defaults to the number of training cases.
    """

    uniform_datasets: bool = setting(True, help="draw a data set uniformly, then one of its cases")
    volumes_per_epoch: int | None = ranged(
        None, "[1, inf)", help="volumes an epoch visits (default: the number of training cases)"
    )


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, stepped every iteration."""

    lr: float = ranged(1e-4, "(0, inf)", help="AdamW's peak learning rate")
    weight_decay: float = ranged(1e-5, help="AdamW's weight decay")
    warmup_epochs: int = ranged(10, help="epochs of linear warm-up before the cosine decay")
    epochs: int = ranged(100, "[1, inf)", help="training epochs (raise it to continue a finished run)")
    batch_size: int = ranged(2, "[1, inf)", help="volumes a step (each gives augmentation.crops_per_volume crops)")
    grad_clip: float | None = ranged(12.0, "(0, inf)", help="largest gradient norm (null: no clipping)")


@dataclass
class LossConfig:
    """Weights of the partial-label loss terms (``bce_weight: 0`` is FSEFT's Dice-only loss)."""

    dice_weight: float = ranged(1.0, help="weight of the Dice term")
    bce_weight: float = ranged(1.0, help="weight of the binary cross-entropy term")
    smooth: float = ranged(1.0, "(0, inf)", help="the Dice term's smoothing constant")

    def __post_init__(self) -> None:
        if self.dice_weight + self.bce_weight <= 0:
            raise ConfigError("loss.dice_weight and loss.bce_weight cannot both be 0: nothing would train")


@dataclass
class PretrainConfig:
    """Everything a pretraining run depends on; the resolved copy is written to ``<out>/config.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    template: str = setting("fseft29", help="the structures the head predicts, one sigmoid channel each")
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    augmentation: Augmentation = field(default_factory=Augmentation)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    amp: bool = setting(True, help="mixed precision on a GPU (bfloat16 where supported, else float16)")
    checkpoint_every: int = ranged(10, "[1, inf)", help="epochs between kept checkpoints")
    seed: int = ranged(0, "[0, 4294967295]", help="random seed of weights, crops and order")
    num_workers: int = ranged(0, help="data-loading worker processes")

    def __post_init__(self) -> None:
        if self.optim.epochs < 1 or self.optim.batch_size < 1 or self.checkpoint_every < 1:
            raise ConfigError("optim.epochs, optim.batch_size and checkpoint_every must be at least 1")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.optim.lr}")
        if self.augmentation.crops_per_volume < 1:
            raise ConfigError("augmentation.crops_per_volume must be at least 1")
