"""The pretraining configuration: one YAML file, validated into these dataclasses at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from fsseg.config import ranged
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

    name: str = "swinunetr"
    kwargs: dict = field(default_factory=dict)
    init: str | None = None
    freeze: list[str] = field(default_factory=list)

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

    lists: list[str] = field(default_factory=list)
    data_root: str | None = None
    cache: bool = True
    cache_dir: str | None = None  # default: <out>/cache
    # With model.freeze: [encoder] on a model that splits at its encoder (i3resnet), compute the encoder's
    # features once per scan and train on crops of them (no augmentation but the crop); false: run it every step.
    encoder_cache: bool = True


@dataclass
class SamplingConfig:
    """Which volumes an epoch visits.

    ``uniform_datasets`` draws a dataset uniformly, then one of its cases, so a small dataset is not drowned
    by a large one. ``volumes_per_epoch`` defaults to the number of training cases.
    """

    uniform_datasets: bool = True
    volumes_per_epoch: int | None = ranged(None, "[1, inf)")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, stepped every iteration."""

    lr: float = ranged(1e-4, "(0, inf)")
    weight_decay: float = ranged(1e-5)
    warmup_epochs: int = ranged(10)
    epochs: int = ranged(100, "[1, inf)")
    batch_size: int = ranged(2, "[1, inf)")
    grad_clip: float | None = ranged(12.0, "(0, inf)")


@dataclass
class LossConfig:
    """Weights of the partial-label loss terms (``bce_weight: 0`` is FSEFT's Dice-only loss)."""

    dice_weight: float = ranged(1.0)
    bce_weight: float = ranged(1.0)
    smooth: float = ranged(1.0, "(0, inf)")

    def __post_init__(self) -> None:
        if self.dice_weight + self.bce_weight <= 0:
            raise ConfigError("loss.dice_weight and loss.bce_weight cannot both be 0: nothing would train")


@dataclass
class PretrainConfig:
    """Everything a pretraining run depends on; the resolved copy is written to ``<out>/config.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    template: str = "fseft29"
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    augmentation: Augmentation = field(default_factory=Augmentation)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    amp: bool = True
    checkpoint_every: int = ranged(10, "[1, inf)")
    seed: int = ranged(0, "[0, 4294967295]")
    num_workers: int = ranged(0)

    def __post_init__(self) -> None:
        if self.optim.epochs < 1 or self.optim.batch_size < 1 or self.checkpoint_every < 1:
            raise ConfigError("optim.epochs, optim.batch_size and checkpoint_every must be at least 1")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.optim.lr}")
        if self.augmentation.crops_per_volume < 1:
            raise ConfigError("augmentation.crops_per_volume must be at least 1")
