"""Pretraining end to end on phantoms and real CT, with tiny networks."""

import json
import re
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO, SAMPLE_CT, source_lists
from fsseg.checkpoint import load_model, read_checkpoint
from fsseg.pretrain.cli import main

TINY = str(REPO / "configs" / "pretrain" / "tiny.yaml")
FAST = ["preprocessing.spacing=[4.0, 4.0, 4.0]", "preprocessing.roi=[32, 32, 32]", "optim.warmup_epochs=1"]


def args(out, lists, epochs, *extra):
    command = ["--config", TINY, "--out", str(out), "--data-list", *lists, "--no-progress"]
    for override in FAST + [f"optim.epochs={epochs}", *extra]:
        command += ["--set", override]
    return command


def test_tiny_pretraining_loss_falls_and_checkpoint_is_complete(phantom_dir, tmp_path):
    out = tmp_path / "run"
    assert main(args(out, source_lists(phantom_dir), 20, "optim.lr=1e-2", "optim.batch_size=1")) == 0
    summary = json.loads((out / "summary.json").read_text())
    history = summary["loss_history"]
    assert len(history) == 20 and np.mean(history[-3:]) < 0.88 * np.mean(history[:2])
    assert summary["steps"] == 20 * summary["steps_per_epoch"]
    for name in (
        "config.yaml",
        "checkpoint_latest.pt",
        "checkpoint_best.pt",
        "checkpoint_epoch0010.pt",
        "checkpoint_epoch0020.pt",
        "train.log",
    ):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").iterdir())
    payload = read_checkpoint(out / "checkpoint_latest.pt")
    for key in (
        "arch",
        "template",
        "preprocessing",
        "state_dict",
        "optimizer",
        "scheduler",
        "scaler",
        "epoch",
        "step",
        "rng",
        "config",
        "versions",
    ):
        assert key in payload, key
    assert payload["arch"]["name"] == "unet_tiny" and payload["template"]["name"] == "fseft29"
    assert payload["preprocessing"]["spacing"] == [4.0, 4.0, 4.0] and payload["epoch"] == 20
    assert set(payload["versions"]) >= {"fsseg", "monai", "torch"}
    model, template, pre, _ = load_model(out / "checkpoint_latest.pt")
    assert pre.roi == (32, 32, 32) and len(template) == 29
    # model.pt: the same model without the training state, the file to share
    shared = read_checkpoint(out / "model.pt")
    assert not set(shared) & {"optimizer", "scheduler", "scaler", "rng", "history"}
    assert all(torch.equal(shared["state_dict"][k], v) for k, v in payload["state_dict"].items())
    assert (out / "model.pt").stat().st_size < 0.5 * (out / "checkpoint_latest.pt").stat().st_size
    log = (out / "train.log").read_text()
    assert "phantom_source_b: 2 train cases, annotates liver, kidney_right, kidney_left, stomach, aorta" in log


def test_killed_run_resumes_to_the_same_weights(phantom_dir, tmp_path):
    lists = source_lists(phantom_dir)
    epochs = 6
    assert main(args(tmp_path / "straight", lists, epochs)) == 0

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "pretrain", *args(killed, lists, epochs)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        latest = killed / "checkpoint_latest.pt"
        if latest.exists() and torch.load(latest, weights_only=True)["epoch"] >= 2:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = torch.load(killed / "checkpoint_latest.pt", weights_only=True)["epoch"]
    assert 2 <= interrupted_at < epochs, "the run was not interrupted mid-way"

    assert main(args(killed, lists, epochs) + ["--resume", "auto"]) == 0
    straight = torch.load(tmp_path / "straight" / "checkpoint_latest.pt", weights_only=True)
    resumed = torch.load(killed / "checkpoint_latest.pt", weights_only=True)
    assert resumed["step"] == straight["step"]
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert resumed["history"] == straight["history"]

    # Epochs may be raised on resume; the run continues from where it stopped.
    assert main(args(killed, lists, epochs + 1) + ["--resume", "auto"]) == 0
    assert torch.load(killed / "checkpoint_latest.pt", weights_only=True)["epoch"] == epochs + 1


def logged_lr(out) -> list[float]:
    """The learning rate at the end of every epoch, as train.log records it (resumed runs append)."""
    by_epoch = {}
    for line in (out / "train.log").read_text().splitlines():
        found = re.search(r"epoch (\d+)/\d+: loss .*, lr ([0-9.e+-]+),", line)
        if found:
            by_epoch[int(found.group(1))] = float(found.group(2))
    return [by_epoch[e] for e in sorted(by_epoch)]


def test_raising_epochs_on_resume_decays_the_learning_rate_to_the_new_end(phantom_dir, tmp_path):
    out = tmp_path / "run"
    lists = source_lists(phantom_dir)[:1]
    assert main(args(out, lists, 3, "optim.lr=1e-2")) == 0
    assert main(args(out, lists, 8, "optim.lr=1e-2") + ["--resume", "auto"]) == 0
    lr = logged_lr(out)
    assert len(lr) == 8 and lr[2] == 0.0  # the first run decayed to 0 at its end (epoch 3)
    resumed = lr[3:]  # the extension: one decay from below the peak down to 0 at the new end, never rising
    assert all(b <= a for a, b in zip(resumed, resumed[1:])), lr
    assert 0 < resumed[0] < 0.8e-2 and lr[-1] == 0.0


@pytest.mark.parametrize("processes", [2, 1])
def test_torchrun_gloo_ddp(phantom_dir, tmp_path, processes):
    # One process under torchrun joins a group too, so that a one-GPU machine runs a multi-GPU job's collectives.
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "pretrain",
        *args(out, source_lists(phantom_dir), 1),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == processes and summary["steps"] >= 1
    assert read_checkpoint(out / "checkpoint_latest.pt")["epoch"] == 1
    log = (out / "train.log").read_text()
    assert log.count("epoch 1/1") == 1 and f"x{processes} (process group: gloo)" in log  # rank 0 alone logs


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "optim.lrate=1"], "unknown config key(s) optim.lrate"),
        (["--set", "optim.epochs=many"], "optim.epochs: expected an integer"),
        (["--set", "model.name=resnet"], "unknown model 'resnet'"),
    ],
)
def test_bad_config_is_one_line_and_nonzero(phantom_dir, tmp_path, capsys, extra, message):
    assert main(args(tmp_path / "bad", source_lists(phantom_dir), 1) + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_missing_data_list_is_one_line(tmp_path, capsys):
    assert main(args(tmp_path / "bad", [str(tmp_path / "nowhere.json")], 1)) == 2
    assert "nowhere.json: data list not found" in capsys.readouterr().err


def test_existing_run_is_not_overwritten_without_resume(phantom_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(out, source_lists(phantom_dir), 1)) == 0
    assert main(args(out, source_lists(phantom_dir), 1)) == 2
    assert "already holds a run; use --resume auto" in capsys.readouterr().err


def partial_real_list(folder, case_id, keep):
    """A one-case dataset of real CT annotating only ``keep`` (TotalSegmentator ids); all other ids are background."""
    label = np.asanyarray(nib.load(str(SAMPLE_CT / "labels" / f"{case_id}.nii.gz")).dataobj)
    label_map = {str(i): "background" for i in np.unique(label).tolist() if i}
    label_map.update(keep)
    path = folder / f"{case_id}_{'_'.join(keep.values())}.json"
    path.write_text(
        json.dumps(
            {
                "name": path.stem,
                "root": str(SAMPLE_CT),
                "label_map": label_map,
                "cases": [{"id": case_id, "image": f"images/{case_id}.nii.gz", "label": f"labels/{case_id}.nii.gz"}],
            }
        )
    )
    return str(path)


def test_tiny_pretraining_on_real_ct_with_partial_labels(sample_ct, tmp_path):
    lists = [
        partial_real_list(tmp_path, "ts_example_ct_sm", {"5": "liver", "1": "spleen"}),
        partial_real_list(tmp_path, "ts_example_dicom", {"2": "kidney_right", "6": "stomach"}),
    ]
    out = tmp_path / "real"
    assert main(args(out, lists, 2)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert all(np.isfinite(summary["loss_history"]))
    log = (out / "train.log").read_text()
    assert "annotates spleen, liver" in log and "annotates kidney_right, stomach" in log


def test_a_schedule_of_few_steps_is_warned_of(tmp_path, capsys):
    one_scan = str(REPO / "data_lists" / "examples" / "sample_ct_liver_pretrain.json")
    assert main(args(tmp_path / "run", [one_scan], 2)) == 0  # one scan, batch 2: one step an epoch
    assert "this schedule is 2 optimizer steps in all (1 volumes an epoch in batches of 2)" in capsys.readouterr().err


def test_the_warning_starts_below_the_smallest_recipe(caplog):
    from fsseg.pretrain.engine import MIN_STEPS, warn_if_short

    warn_if_short(MIN_STEPS - 1, 8, 2)
    assert f"{MIN_STEPS - 1} optimizer steps" in caplog.text
    caplog.clear()
    warn_if_short(MIN_STEPS, 8, 2)
    assert "optimizer steps" not in caplog.text
