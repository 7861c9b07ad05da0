"""Small pretrain -> adapt -> predict -> evaluate runs on phantoms whose outputs are fixed in
``tests/regression_outputs.json``: a refactoring that claims to change no behaviour must leave them as they are.

What is fixed: the loss of every epoch (both pretraining paths: image crops and cached encoder features), a
checksum of the trained weights, every adaptation run's epochs, Dice and adapter weights' checksum (each kind of
training input: cached features, cached encoder skips, image crops; with and without the transductive step), the
predicted label maps' voxel counts and the evaluation's Dice. After a change that is meant to alter the outputs,
rewrite the file with ``FSSEG_UPDATE_REGRESSION=1 pytest tests/test_regression_outputs.py`` and say why in the
commit.

The tolerances are the measured reach of float rounding, not guesses: summing in another order (2 threads
instead of 1) moved a loss by 2e-4 relative, a weight checksum by 0.14 %, a Dice by 0.002 and a mask by 0.15 % of
its voxels after three epochs, while a changed random stream moves a Dice by 0.006 and the losses by far more.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO, source_lists, write_method_configs

EXPECTED = Path(__file__).with_name("regression_outputs.json")
TINY = str(REPO / "configs" / "pretrain" / "tiny.yaml")
PRETRAIN_SETTINGS = [
    "preprocessing.spacing=[4.0, 4.0, 4.0]",
    "preprocessing.roi=[32, 32, 32]",
    "optim.warmup_epochs=1",
    "optim.lr=1e-2",
    "optim.batch_size=1",
    "seed=3",
]
# One method of each kind of training input: cached features (lp, adapter), encoder skips (ft-last), image (ft).
METHODS = ["lp", "adapter", "ft-last", "ft"]


def pretrain(out: Path, lists: list[str], epochs: int, *extra: str) -> dict:
    from fsseg.pretrain.cli import main

    command = ["--config", TINY, "--out", str(out), "--data-list", *lists, "--no-progress"]
    for setting in [*PRETRAIN_SETTINGS, f"optim.epochs={epochs}", *extra]:
        command += ["--set", setting]
    assert main(command) == 0
    summary = json.loads((out / "summary.json").read_text())
    state = torch.load(out / "model.pt", map_location="cpu", weights_only=False)["state_dict"]
    return {"losses": summary["loss_history"], "weights_abs_sum": weights_abs_sum(state)}


def adapt(checkpoint: Path, data_list: Path, out: Path, configs: Path, *extra: str) -> dict:
    from fsseg.adapt.cli import main
    from fsseg.adapters.artifact import read_adapter_file

    assert (
        main(
            [
                "--checkpoint",
                str(checkpoint),
                "--data-list",
                str(data_list),
                "--out",
                str(out),
                "--set",
                f"method_configs={configs}",
                "--set",
                "overlap=0.25",
                "--set",
                "pictures=false",
                "--no-progress",
                "--organ",
                "liver",
                "--shots",
                "1",
                "--seeds",
                "1",
                *extra,
            ]
        )
        == 0
    )
    with open(out / "results.csv") as handle:
        rows = [
            {key: row[key] for key in ("method", "shots", "seed", "case", "epochs")} | {"dice": float(row["dice"])}
            for row in csv.DictReader(handle)
        ]
    return {
        "rows": rows,
        "adapters_abs_sum": {
            path.name: weights_abs_sum(read_adapter_file(path)["state_dict"]) for path in sorted(out.glob("adapters/*"))
        },
    }


def weights_abs_sum(state: dict) -> float:
    return sum(float(v.double().abs().sum()) for v in state.values() if v.is_floating_point())


def label_voxels(folder: Path) -> dict:
    """Each predicted label map's count of each label."""
    found = {}
    for path in sorted(folder.glob("*.nii.gz")):
        ids, counts = np.unique(np.asarray(nib.load(path).dataobj), return_counts=True)
        found[path.name] = {str(i): int(c) for i, c in zip(ids, counts)}
    return found


def run_everything(phantom_dir: Path, work: Path) -> dict:
    from fsseg.cli.evaluate import main as evaluate
    from fsseg.cli.predict import main as predict

    lists = source_lists(phantom_dir)
    outputs = {"pretrain": pretrain(work / "pretrain", lists, 3)}
    # From that checkpoint, the encoder frozen: crops of its cached features train the decoder.
    checkpoint = work / "pretrain" / "model.pt"
    outputs["pretrain_frozen_encoder"] = pretrain(
        work / "frozen", lists[:1], 2, f"model.init={checkpoint}", "model.freeze=[encoder]"
    )
    configs = write_method_configs(work / "configs", epochs=3)
    target = phantom_dir / "phantom_target.json"
    outputs["adapt"] = adapt(checkpoint, target, work / "adapt", configs, "--method", *METHODS)
    # The transductive step adapts to each test case (no adapter file): long enough for lp to find the liver.
    configs_ti = write_method_configs(work / "configs_ti", epochs=6, lr=0.1)
    outputs["adapt_transductive"] = adapt(
        checkpoint,
        target,
        work / "adapt_ti",
        configs_ti,
        "--method",
        "lp",
        "--set",
        "ti.enabled=true",
        "--set",
        "ti.warmup_epochs=1",
    )
    adapter = work / "adapt" / "adapters" / "liver_adapter_k1_s0.safetensors"
    assert (
        predict(
            [
                "-i",
                str(target),
                "-o",
                str(work / "predicted"),
                "-m",
                str(checkpoint),
                "--adapter",
                str(adapter),
                "--no-progress",
                "--overlap",
                "0.25",
            ]
        )
        == 0
    )
    outputs["predict"] = label_voxels(work / "predicted")
    assert (
        evaluate(
            [
                "--pred",
                str(work / "predicted"),
                "--data-list",
                str(target),
                "--structures",
                "liver",
                "-o",
                str(work / "scores"),
                "--no-plot",
                "--no-progress",
            ]
        )
        == 0
    )
    with open(work / "scores" / "per_case.csv") as handle:
        outputs["evaluate"] = [{"case": r["case"], "dice": float(r["dice"])} for r in csv.DictReader(handle)]
    return outputs


# Relative tolerance of each kind of number (see the module's docstring); Dice to an absolute 0.004.
RELATIVE = {float: 1e-3, int: 5e-3}


def assert_same(found, expected, where: str = "outputs") -> None:
    """``found`` equals ``expected`` within :data:`RELATIVE` (``dice``: absolute 0.004); strings exactly."""
    if isinstance(expected, dict):
        assert sorted(found) == sorted(expected), f"{where}: keys {sorted(found)} vs {sorted(expected)}"
        for key in expected:
            assert_same(found[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(found) == len(expected), f"{where}: {len(found)} items vs {len(expected)}"
        for index, (one, other) in enumerate(zip(found, expected)):
            assert_same(one, other, f"{where}[{index}]")
    elif where.endswith(".dice"):
        assert found == pytest.approx(expected, abs=0.004), f"{where}: {found} vs {expected}"
    elif type(expected) in RELATIVE:
        assert found == pytest.approx(expected, rel=RELATIVE[type(expected)]), f"{where}: {found} vs {expected}"
    else:
        assert found == expected, f"{where}: {found} vs {expected}"


@pytest.fixture
def one_thread():
    """One torch thread, whatever the machine or the pytest-xdist split: a reduction sums in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.long
def test_small_runs_give_the_fixed_outputs(phantom_dir, tmp_path, one_thread):
    outputs = json.loads(json.dumps(run_everything(phantom_dir, tmp_path)))  # as the file holds them
    if os.environ.get("FSSEG_UPDATE_REGRESSION"):
        EXPECTED.write_text(json.dumps(outputs, indent=1) + "\n")
    assert_same(outputs, json.loads(EXPECTED.read_text()))
