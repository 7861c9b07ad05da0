"""How well can any linear head find a structure in a checkpoint's frozen features?

The ceiling of the linear probe, apart from its training schedule: the features fsseg-adapt caches (sliding
window over each whole scan, model space) of ``--train`` cases of a data list's train split, standardised, and a
logistic regression on every voxel of them fitted to convergence (full batch, L-BFGS, foreground weighted by the
square root of the class ratio), scored by Dice at p = 0.5 on the features of the list's test cases. When this
stays low, no schedule, learning rate or crop sampling makes ``lp`` work: the features do not hold the structure.

    python bench/probe_bound.py --checkpoint demo_phantom_out/pretrain/checkpoint_latest.pt \\
        --data-list demo_phantom_out/data/phantom_target.json --organ gallbladder --label "make demo-phantom's model"
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice
from results_file import write_result

from fsseg.adapt.config import AdaptConfig
from fsseg.adapt.engine import Adaptation
from fsseg.config import load_config

REPO = Path(__file__).resolve().parents[1]
QUESTION = (
    "What is the best any linear head can do on a checkpoint's frozen features, whatever lp's schedule? "
    "Logistic regression fitted to convergence on every voxel of the supports' cached features, scored by "
    "Dice on the list's test cases."
)
COMMAND = "python bench/probe_bound.py --checkpoint CKPT --data-list LIST --organ NAME [--train 5] [--label TEXT]"
COLUMNS = {
    "checkpoint": "checkpoint",
    "organ": "structure",
    "feature_channels": "feature channels",
    "train_dice": "Dice on the supports",
    "test_dice_mean": "Dice on the test cases",
}


def voxels(run: Adaptation, case) -> tuple[torch.Tensor, torch.Tensor]:
    """(voxels, channels) features and (voxels,) binary target of one case in model space."""
    support = run.support(case)
    features = np.asarray(run.features(support), dtype=np.float32)
    return (
        torch.from_numpy(features.reshape(features.shape[0], -1).T),
        torch.from_numpy(support.target[0].reshape(-1).astype(np.float32)),
    )


def fit(x: torch.Tensor, y: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of a logistic regression on standardised ``x``."""
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")
    pos_weight = torch.tensor(float((1 - y.mean()) / y.mean()) ** 0.5)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y, pos_weight=pos_weight)
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def dice(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Dice of two flat binary voxel vectors (1 when both are empty)."""
    return float(compute_dice(prediction.view(1, 1, -1), target.view(1, 1, -1), ignore_empty=False)[0, 0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-list", required=True)
    parser.add_argument("--organ", required=True)
    parser.add_argument("--train", type=int, default=5, help="train cases the head is fitted on")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--label", help="what the checkpoint is, for the results (default: its path)")
    parser.add_argument("--out", default=str(REPO / "bench/results/probe_bound.json"))
    args = parser.parse_args()
    config = load_config(
        AdaptConfig,
        None,
        [
            f"checkpoint={args.checkpoint}",
            f"data_list={args.data_list}",
            f"organs=[{args.organ}]",
            "methods=[lp]",
            "pictures=false",
            f"method_configs={REPO / 'configs/adapt'}",
        ],
    )
    with tempfile.TemporaryDirectory() as work:
        run = Adaptation(config, Path(work), torch.device("cpu"))
        train = [voxels(run, case) for case in run.pool[: args.train]]
        tests = {case.id: voxels(run, case) for case in run.tests}
    x, y = torch.cat([t[0] for t in train]), torch.cat([t[1] for t in train])
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    weight, bias = fit(x, y, args.iterations)
    train_dice = dice((x @ weight + bias > 0).float(), y)
    scores = {case: dice((((f - mean) / std) @ weight + bias > 0).float(), t) for case, (f, t) in tests.items()}
    row = {
        "checkpoint": args.label or args.checkpoint,
        "organ": args.organ,
        "feature_channels": int(x.shape[1]),
        "train_cases": [c.id for c in run.pool[: args.train]],
        "train_dice": round(train_dice, 4),
        "test_dice": {k: round(v, 4) for k, v in scores.items()},
        "test_dice_mean": round(float(np.mean(list(scores.values()))), 4),
    }
    print(
        f"{args.organ}: best linear head on {x.shape[1]} feature channels of {len(train)} train case(s): "
        f"Dice {train_dice:.3f} on them, {row['test_dice_mean']:.3f} on {len(scores)} test case(s)"
    )
    out = write_result(
        "probe_bound",
        [row],
        QUESTION,
        COMMAND,
        COLUMNS,
        key=lambda r: (r["checkpoint"], r["organ"]),
        out=Path(args.out),
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
