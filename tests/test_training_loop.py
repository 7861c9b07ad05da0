"""The training core both stages hand their model, crops and loss to (fsseg.training.loop)."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import write_method_configs
from fsseg.checkpoint import NonFiniteWeights
from fsseg.losses import PartialLabelLoss
from fsseg.training.loop import MicroBatch, Schedule, Step, Trainer, TrainingProgress, fit
from fsseg.training.runtime import MixedPrecision


class Crops:
    """Two steps an epoch of one 4^3 crop, its target the left half."""

    steps_per_epoch = 2

    def __init__(self, poison_at: int | None = None) -> None:
        self.poison_at, self.seen = poison_at, 0

    def steps(self, epoch: int):
        for _ in range(self.steps_per_epoch):
            self.seen += 1
            x = torch.ones(1, 1, 4, 4, 4)
            if self.seen == self.poison_at:
                x[..., 0] = float("nan")
            y = torch.zeros(1, 1, 4, 4, 4)
            y[..., :2] = 1
            yield Step([MicroBatch(x, y, torch.ones(1, 1))], f"crop {self.seen}")


def trainer_for(head: torch.nn.Module, grad_clip: float | None = None) -> Trainer:
    return Trainer(
        head.parameters(),
        head,
        PartialLabelLoss(),
        Schedule(0.1, 0.0, 1, 10, grad_clip=grad_clip),
        MixedPrecision(torch.device("cpu")),
        "nothing was saved",
    )


def quiet(epochs: range) -> TrainingProgress:
    return TrainingProgress("test", epochs, 2, bar=False, lines=False, log=logging.getLogger("test"))


def test_a_non_finite_loss_stops_the_run_and_names_the_step():
    head = torch.nn.Conv3d(1, 1, 1)
    with pytest.raises(NonFiniteWeights, match=r"epoch 2, step 3 \(crop 3\); nothing was saved"):
        fit(trainer_for(head), Crops(poison_at=3), range(3), lambda stats: False, quiet(range(3)))
    assert all(torch.isfinite(p).all() for p in head.parameters())  # the poisoned step was not taken


def test_the_loss_falls_and_end_epoch_can_stop_the_run():
    head = torch.nn.Conv3d(1, 1, 1)
    ran = fit(trainer_for(head), Crops(), range(10), lambda stats: stats.epoch == 6, quiet(range(10)))
    assert ran.stopped and [s.epoch for s in ran.epochs] == [1, 2, 3, 4, 5, 6]
    assert ran.epochs[-1].loss < ran.epochs[0].loss and ran.epochs[-1].step == 12


def test_gradient_clipping_bounds_the_gradient_norm():
    head = torch.nn.Conv3d(1, 1, 1)
    trainer = trainer_for(head, grad_clip=1e-3)
    trainer.step(next(Crops().steps(0)), 1)
    assert torch.sqrt(sum((p.grad**2).sum() for p in head.parameters())) <= 1e-3 * (1 + 1e-5)


def test_a_resumed_trainer_continues_the_schedule_to_its_new_end():
    head = torch.nn.Conv3d(1, 1, 1)
    first = trainer_for(head)
    fit(first, Crops(), range(2), lambda stats: False, quiet(range(2)))
    longer = Trainer(
        head.parameters(), head, PartialLabelLoss(), Schedule(0.1, 0.0, 1, 40), MixedPrecision(torch.device("cpu")), ""
    )
    longer.load_state_dict(first.state_dict())
    assert longer.step_count == 4 and longer.scheduler.t_total == 40
    # the cosine at step 4 of 40 (the 10-step schedule was at 0.75 of the peak there)
    assert longer.scheduler.lr_lambda(4) > 0.98


def test_fsseg_adapt_without_a_bar_logs_every_epoch_of_every_run(
    phantom_dir, tiny_checkpoint, tmp_path, capsys, feature_cache
):
    from fsseg.adapt.cli import main

    configs = write_method_configs(tmp_path / "configs", epochs=3)
    assert (
        main(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--data-list",
                str(phantom_dir / "phantom_target.json"),
                "--out",
                str(tmp_path / "run"),
                "--set",
                f"method_configs={configs}",
                "--set",
                f"cache_dir={feature_cache}",
                "--set",
                "pictures=false",
                "--organ",
                "liver",
                "--shots",
                "1",
                "--seeds",
                "1",
                "--method",
                "lp",
                "--no-progress",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().err.splitlines()
    for epoch in (1, 2, 3):
        assert any(f"lp K=1 seed 0 epoch {epoch}/3: loss" in line and "s left" in line for line in lines), epoch
