"""The hostile-input suite (issue 44): inputs a hostile or careless user would give, each through the command a
user would run. Every case must end in one line naming the problem, a non-zero exit and no traceback, with every
file under the test's folder (inputs, the user's files, the output folder) byte for byte as before and no file
added: nothing outside the output folder touched, no partial output left.

A case builds its inputs under ``inp`` and names an output folder ``out``; both lie under the folder that is
checksummed. Ids that try to leave the output folder aim at an input, so that a write there would show.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from dicom_series import write_dicom_series
from test_make_list import nnunet_dataset
from test_nnunet import write_results_folder
from test_pretrain import args as pretrain_args

from conftest import SAMPLE_CT, ct_like, write_nifti
from fsseg.adapt.cli import main as adapt
from fsseg.adapters import adapt_model, get_method
from fsseg.adapters.artifact import read_adapter_file, save_adapter, write_adapter_file
from fsseg.checkpoint import read_checkpoint
from fsseg.cli.check_data import main as check_data
from fsseg.cli.evaluate import main as evaluate
from fsseg.cli.export_bundle import main as export_bundle
from fsseg.cli.import_checkpoint import main as import_checkpoint
from fsseg.cli.make_list import main as make_list
from fsseg.cli.phantom import main as phantom
from fsseg.cli.predict import main as predict
from fsseg.cli.sample_data import main as sample_data
from fsseg.inference.record import LABELS, LOCK, REPORT
from fsseg.models import create_model
from fsseg.preprocessing import Preprocessing
from fsseg.pretrain.cli import main as pretrain
from fsseg.templates import load_template

SPACING = np.diag([4.0, 4.0, 4.0, 1.0])
RECORD_FOLDER = "out"
Case = Callable[[Path, Path, Path], tuple[Callable, list[str], str]]
CASES: dict[str, Case] = {}


def hostile(name: str) -> Callable[[Case], Case]:
    """Register a case: a function of (inputs folder, output folder, checkpoint) -> (command, argv, message)."""

    def register(build: Case) -> Case:
        CASES[name] = build
        return build

    return register


RECORD = (REPORT, LABELS, LOCK)


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def scan(inp: Path, name: str = "a") -> Path:
    return write_nifti(inp / "scans" / f"{name}.nii.gz", ct_like(), SPACING)


def data_list(inp: Path, case_id: str, label_map: dict | None = None) -> Path:
    image = scan(inp)
    path = inp / "list.json"
    path.write_text(
        json.dumps(
            {
                "name": "x",
                "label_map": label_map or {"1": "liver"},
                "cases": [{"id": case_id, "image": str(image), "label": str(image), "split": "test"}],
            }
        )
    )
    return path


def predicting(inp: Path, out: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["-i", str(inp / "scans"), "-o", str(out), "-m", str(ckpt), *extra, "--no-progress"]


# --- names that would become paths outside the output folder -------------------------------------------------------


@hostile("case id climbing out of -o onto the input scan")
def _(inp, out, ckpt):
    return (
        predict,
        ["-i", str(data_list(inp, "../in/scans/a")), "-o", str(out), "-m", str(ckpt), "--preview", "--no-progress"],
        "cannot be part of a file name",
    )


@hostile("absolute case id naming the input scan")
def _(inp, out, ckpt):
    return (
        predict,
        ["-i", str(data_list(inp, str(inp / "scans" / "a"))), "-o", str(out), "-m", str(ckpt), "--no-progress"],
        "cannot be part of a file name",
    )


@hostile("case id reading a prediction from outside --pred")
def _(inp, out, ckpt):
    listed = data_list(inp, "../scans/a")
    (inp / "pred").mkdir()
    return (
        evaluate,
        ["--pred", str(inp / "pred"), "--data-list", str(listed), "-o", str(out), "--no-plot", "--no-progress"],
        "cannot be part of a file name",
    )


@hostile("structure name with a separator in --organ")
def _(inp, out, ckpt):
    return (
        adapt,
        [
            "--checkpoint",
            str(ckpt),
            "--data-list",
            str(data_list(inp, "a")),
            "--organ",
            "x/../../y",
            "--shots",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ],
        "structure name 'x/../../y'",
    )


@hostile("structure name with a separator in a label map")
def _(inp, out, ckpt):
    return check_data, [str(data_list(inp, "a", {"1": "../liver"})), "--no-progress"], "structure name '../liver'"


@hostile("two cases whose outputs share one file")
def _(inp, out, ckpt):
    for name in ("x", "x_probabilities"):
        scan(inp, name)
    return predict, predicting(inp, out, ckpt, "--save-probabilities"), "would both be written to"


# --- output folders holding files fsseg did not write ---------------------------------------------------------------


@hostile("the user's ground truth named like a mask in -o")
def _(inp, out, ckpt):
    scan(inp)
    write_nifti(out / "a.nii.gz", np.ones((24, 20, 16), np.uint8), SPACING)
    return predict, predicting(inp, out, ckpt), "fsseg-predict did not write it"


@hostile("another tool's predictions.json in -o")
def _(inp, out, ckpt):
    scan(inp)
    out.mkdir()
    (out / "predictions.json").write_text('{"model": "another tool"}')
    return predict, predicting(inp, out, ckpt), "predictions.json"


@hostile("the user's config.yaml in fsseg-adapt --out")
def _(inp, out, ckpt):
    out.mkdir()
    (out / "config.yaml").write_text("my: settings\n")
    return (
        adapt,
        [
            "--checkpoint",
            str(ckpt),
            "--data-list",
            str(data_list(inp, "a")),
            "--organ",
            "liver",
            "--shots",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ],
        "is not a file of fsseg-adapt",
    )


@hostile("the user's config.yaml in fsseg-pretrain --out")
def _(inp, out, ckpt):
    out.mkdir()
    (out / "config.yaml").write_text("my: settings\n")
    return pretrain, pretrain_args(out, [str(data_list(inp, "a"))], 1), "is not a file of fsseg-pretrain"


@hostile("the user's summary.json in fsseg-evaluate -o")
def _(inp, out, ckpt):
    write_nifti(inp / "masks" / "a.nii.gz", (ct_like() > 0).astype(np.uint8), SPACING)
    out.mkdir()
    (out / "summary.json").write_text('{"my": "summary"}')
    return (
        evaluate,
        [
            "--pred",
            str(inp / "masks"),
            "--gt",
            str(inp / "masks"),
            "--gt-label-map",
            str(write_json(inp / "map.json", {"1": "liver"})),
            "-o",
            str(out),
            "--no-plot",
            "--no-progress",
        ],
        "is not a file of fsseg-evaluate",
    )


@hostile("the user's list named like a phantom list")
def _(inp, out, ckpt):
    out.mkdir()
    (out / "phantom_target.json").write_text('{"name": "mine", "cases": []}')
    return phantom, ["--out", str(out), "--source-cases", "1", "--no-progress"], "is not a list of fsseg-phantom"


@hostile("another file where the sample data's README goes")
def _(inp, out, ckpt):
    (out / "ct").mkdir(parents=True)
    (out / "ct" / "README.md").write_text("my notes\n")
    return sample_data, ["--out", str(out)], "is not the sample's file"


@hostile("--force onto the nnU-Net plans the import reads")
def _(inp, out, ckpt):
    folder, _ = write_results_folder(inp)
    return import_checkpoint, [str(folder), "-o", str(folder / "plans.json"), "--force"], "would replace input"


@hostile("--force onto the dataset.json make-list reads")
def _(inp, out, ckpt):
    root = nnunet_dataset(inp / "Dataset001_X", SAMPLE_CT)
    return (
        make_list,
        ["nnunet", "--root", str(root), "-o", str(root / "dataset.json"), "--force"],
        "would replace input",
    )


@hostile("a bundle exported into a folder of the user's")
def _(inp, out, ckpt):
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    return export_bundle, ["-m", str(ckpt), "-o", str(out)], "already exists"


# --- DICOM that lies ---------------------------------------------------------------------------------------------


def series(inp: Path, **tweaks) -> Path:
    folder = inp / "scans" / "series"
    write_dicom_series(scan(inp / "nifti"), folder, **tweaks)
    return folder


def predicting_series(inp: Path, out: Path, ckpt: Path, folder: Path) -> list[str]:
    return ["-i", str(folder), "-o", str(out), "-m", str(ckpt), "--no-progress"]


@hostile("a slice whose position is NaN")
def _(inp, out, ckpt):
    folder = series(inp)
    path = sorted(folder.iterdir())[3]
    dataset = pydicom.dcmread(str(path))
    dataset[0x0020, 0x0032].value = "nan\\0\\0"
    dataset.save_as(str(path))
    return predict, predicting_series(inp, out, ckpt, folder), "hold a non-finite number"


@hostile("two acquisitions under one series UID")
def _(inp, out, ckpt):
    folder = inp / "scans" / "series"
    uid = write_dicom_series(scan(inp / "nifti"), folder)
    write_dicom_series(scan(inp / "nifti"), folder, series_uid=uid, shift_mm={i: 2.0 for i in range(16)})
    return predict, predicting_series(inp, out, ckpt, folder), "instance number 1 is given to"


@hostile("a damaged file among a series' slices")
def _(inp, out, ckpt):
    folder = series(inp)
    sorted(folder.iterdir())[-1].write_bytes(b"\0" * 64)
    return predict, predicting_series(inp, out, ckpt, folder), "not a readable DICOM file"


@hostile("a stray slice at a study folder's root")
def _(inp, out, ckpt):
    folder = series(inp)
    stray = sorted(folder.iterdir())[0]
    shutil.copyfile(stray, folder.parent / stray.name)
    return predict, predicting_series(inp, out, ckpt, folder.parent), "beside series folders"


# --- weights that lie --------------------------------------------------------------------------------------------


@hostile("NaN in a checkpoint's weights")
def _(inp, out, ckpt):
    scan(inp)
    payload = read_checkpoint(ckpt)
    name = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][name] = torch.full_like(payload["state_dict"][name], float("nan"))
    torch.save(payload, inp / "nan.pt")
    return predict, predicting(inp, out, inp / "nan.pt"), "holds NaN"


def lying_adapter(inp: Path, ckpt: Path, change: Callable[[dict], None]) -> Path:
    """An lp adapter of the checkpoint, its stored payload changed by ``change``."""
    base = create_model("unet_tiny", num_classes=len(load_template()))
    base.load_state_dict(read_checkpoint(ckpt)["state_dict"])
    adapted = adapt_model(base, load_template(), ["liver"], "lp")
    path = save_adapter(
        inp / "lp.safetensors",
        adapted,
        "lp",
        get_method("lp").config_cls(),
        ckpt,
        Preprocessing(spacing=(4.0, 4.0, 4.0), roi=(32, 32, 32)),
        {"inference": {"overlap": 0.25, "amp": True, "cpu_bf16": False}},
    )
    payload = read_adapter_file(path)
    change(payload)
    return write_adapter_file(path, payload)


@hostile("an adapter's tensors declared as another dtype of the same size")
def _(inp, out, ckpt):
    scan(inp)
    adapter = lying_adapter(
        inp, ckpt, lambda p: p.update(state_dict={k: v.view(torch.int32) for k, v in p["state_dict"].items()})
    )
    return predict, predicting(inp, out, ckpt, "--adapter", str(adapter)), "the model expects torch.float32"


@hostile("an adapter recording an impossible window")
def _(inp, out, ckpt):
    scan(inp)
    adapter = lying_adapter(inp, ckpt, lambda p: p["preprocessing"].update(roi=[30, 30, 30]))
    return predict, predicting(inp, out, ckpt, "--adapter", str(adapter)), "multiples of 16"


class RunsCode:
    def __reduce__(self):
        return os.system, ("echo this must never run",)


@hostile("a checkpoint whose pickle calls code")
def _(inp, out, ckpt):
    scan(inp)
    torch.save({"state_dict": {}, "x": RunsCode()}, inp / "code.pt")
    return predict, predicting(inp, out, inp / "code.pt"), "holds code, a call to posix.system"


# --- label maps that lie -----------------------------------------------------------------------------------------


@hostile("two names on one id in an nnU-Net dataset.json")
def _(inp, out, ckpt):
    root = nnunet_dataset(inp / "Dataset001_X", SAMPLE_CT, {"background": 0, "liver": 1, "spleen": 1})
    return make_list, ["nnunet", "--root", str(root), "-o", str(out / "list.json")], "spleen"


@hostile("a fractional id in an nnU-Net dataset.json")
def _(inp, out, ckpt):
    root = nnunet_dataset(inp / "Dataset001_X", SAMPLE_CT, {"background": 0, "liver": 1.5, "spleen": 2})
    return make_list, ["nnunet", "--root", str(root), "-o", str(out / "list.json")], "1.5"


@hostile("one structure under two ids in an nnU-Net import")
def _(inp, out, ckpt):
    folder, _ = write_results_folder(inp, labels={"background": 0, "gallbladder": 1, "gall": 2, "kidney_left": 3})
    return import_checkpoint, [str(folder), "-o", str(out / "model.pt")], "under more than one id"


# --- malformed files, huge and impossible headers ---------------------------------------------------------------


@hostile("nnU-Net plans that inherit in a cycle")
def _(inp, out, ckpt):
    folder, _ = write_results_folder(inp)
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["inherits_from"] = "3d_fullres"
    (folder / "plans.json").write_text(json.dumps(plans))
    return import_checkpoint, [str(folder), "-o", str(out / "model.pt")], "inherit in a cycle"


@hostile("a header claiming terabytes of voxels")
def _(inp, out, ckpt):
    header = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.diag([0.1, 0.1, 0.1, 1.0])).header
    header.set_data_shape((20000, 20000, 2000))
    (inp / "scans").mkdir()
    (inp / "scans" / "huge.nii").write_bytes(header.binaryblock + b"\0" * 68)
    return predict, predicting(inp, out, ckpt), "the header claims a 20000x20000x2000 grid"


@hostile("a rank-deficient affine")
def _(inp, out, ckpt):
    affine = SPACING.copy()
    affine[:3, 2] = affine[:3, 1]  # the third voxel axis runs along the second
    write_nifti(inp / "scans" / "flat.nii.gz", ct_like(), affine)
    return predict, predicting(inp, out, ckpt), "span no 3D grid"


@hostile("a malformed sweep part")
def _(inp, out, ckpt):
    part = inp / "part"
    part.mkdir()
    (part / "config.yaml").write_text("organs: [liver]\n")
    (part / "results.json").write_text("{}")
    return adapt, ["--merge", str(part), "--out", str(out)], str(part)


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def refused_touching_nothing(
    command: Callable, argv: list[str], message: str, watched: Path, capsys
) -> tuple[int, set[str]]:
    """Run a command that must refuse its input in one line, replacing or removing no file under ``watched``; its
    exit code and the files it added (the caller says which it may add)."""
    before = snapshot(watched)
    capsys.readouterr()
    code = command(argv)
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    after = snapshot(watched)
    assert {name: after.get(name) for name in before} == before
    return code, set(after) - set(before)


def record_statuses(out: Path) -> set[str]:
    return {case["status"] for case in json.loads((out / REPORT).read_text())["cases"].values()}


@pytest.mark.parametrize("name", list(CASES))
def test_a_hostile_input_is_one_line_and_touches_no_file(name, tmp_path, tiny_checkpoint, capsys):
    inp, out = tmp_path / "in", tmp_path / RECORD_FOLDER
    inp.mkdir()
    checkpoint = Path(shutil.copyfile(tiny_checkpoint, inp / "tiny.pt"))
    command, argv, message = CASES[name](inp, out, checkpoint)
    code, added = refused_touching_nothing(command, argv, message, tmp_path, capsys)
    if code == 1:  # a batch whose every case failed: its record lists them, and no case left a file
        assert added <= {f"{RECORD_FOLDER}/{name}" for name in RECORD} and record_statuses(out) == {"failed"}
    else:
        assert not added


def test_a_full_disk_is_one_line_and_touches_no_file(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / RECORD_FOLDER
    out.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(out)], capture_output=True)
    if mounted.returncode:
        pytest.skip("this machine does not let the tests mount a tmpfs")
    try:
        write_nifti(tmp_path / "in" / "scans" / "a.nii.gz", ct_like((64, 64, 48)), SPACING)
        write_nifti(tmp_path / "in" / "scans" / "b.nii.gz", ct_like((64, 64, 48)), SPACING)
        command = predicting(tmp_path / "in", out, tiny_checkpoint, "--save-probabilities")
        code, added = refused_touching_nothing(predict, command, "free on its disk", tmp_path, capsys)
        # the batch stopped at the first case, leaving no file of it: --continue resumes where it stopped
        assert code == 2 and added <= {f"{RECORD_FOLDER}/{name}" for name in RECORD}
        assert record_statuses(out) == {"pending"}
    finally:
        subprocess.run(["umount", "--lazy", str(out)], check=True)
