"""Weights that lie are refused at load in one line, never turned into wrong masks (issue 44, class 5): NaN in a
checkpoint's or an adapter's tensors, a tensor stored as another dtype of the same size, recorded settings that no
option would accept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ct_like, write_nifti
from fsseg.adapters import adapt_model, get_method
from fsseg.adapters.artifact import read_adapter_file, save_adapter, write_adapter_file
from fsseg.checkpoint import read_checkpoint
from fsseg.cli.predict import main as predict
from fsseg.models import create_model
from fsseg.preprocessing import Preprocessing
from fsseg.templates import load_template

PRE = Preprocessing(spacing=(4.0, 4.0, 4.0), roi=(32, 32, 32))


@pytest.fixture
def scans(tmp_path):
    write_nifti(tmp_path / "scans" / "a.nii.gz", ct_like(), np.diag([4.0, 4.0, 4.0, 1.0]))
    return tmp_path / "scans"


@pytest.fixture
def adapter(tiny_checkpoint, tmp_path):
    """An lp adapter file for the tiny checkpoint, scored with overlap 0.25."""
    payload = read_checkpoint(tiny_checkpoint)
    base = create_model("unet_tiny", num_classes=len(load_template()))
    base.load_state_dict(payload["state_dict"])
    adapted = adapt_model(base, load_template(), ["liver"], "lp")
    return save_adapter(
        tmp_path / "lp.safetensors",
        adapted,
        "lp",
        get_method("lp").config_cls(),
        tiny_checkpoint,
        PRE,
        {"inference": {"overlap": 0.25, "amp": True, "cpu_bf16": False}},
    )


def rewrite(path, tmp_path, change):
    """A copy of the adapter file with ``change(payload)`` applied."""
    payload = read_adapter_file(path)
    change(payload)
    return write_adapter_file(tmp_path / "changed.safetensors", payload)


def refused(capsys, scans, out, *args) -> str:
    assert predict(["-i", str(scans), "-o", str(out), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not (out / "a.nii.gz").exists()
    return err


def test_a_checkpoint_with_nan_weights_is_refused_not_turned_into_empty_masks(tiny_checkpoint, scans, tmp_path, capsys):
    payload = read_checkpoint(tiny_checkpoint)
    name = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][name] = torch.full_like(payload["state_dict"][name], float("nan"))
    path = tmp_path / "nan.pt"
    torch.save(payload, path)  # as a damaged file would be: save_checkpoint itself refuses NaN
    assert f"tensor {name} holds NaN" in refused(capsys, scans, tmp_path / "out", "-m", str(path))


def test_an_adapter_tensor_stored_as_another_dtype_of_the_same_size_is_refused(
    tiny_checkpoint, adapter, scans, tmp_path, capsys
):
    def reinterpret(payload):  # the same bytes read as int32: a header that declares another dtype
        payload["state_dict"] = {k: v.view(torch.int32) for k, v in payload["state_dict"].items()}

    changed = rewrite(adapter, tmp_path, reinterpret)
    err = refused(capsys, scans, tmp_path / "out", "-m", str(tiny_checkpoint), "--adapter", str(changed))
    assert "is torch.int32, the model expects torch.float32" in err


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p["inference"].update(overlap=7), "recorded overlap must lie in [0, 1)"),
        (lambda p: p["inference"].update(amp="yes"), "recorded amp must be true or false"),
        (lambda p: p["preprocessing"].update(roi=[30, 30, 30]), "needs window sizes that are multiples of 16"),
    ],
)
def test_recorded_settings_no_option_would_accept_are_refused_at_load(
    tiny_checkpoint, adapter, scans, tmp_path, capsys, change, message
):
    changed = rewrite(adapter, tmp_path, change)
    assert message in refused(capsys, scans, tmp_path / "out", "-m", str(tiny_checkpoint), "--adapter", str(changed))


def test_an_untouched_adapter_still_predicts(tiny_checkpoint, adapter, scans, tmp_path):
    assert (
        predict(
            [
                "-i",
                str(scans),
                "-o",
                str(tmp_path / "out"),
                "-m",
                str(tiny_checkpoint),
                "--adapter",
                str(adapter),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tmp_path / "out" / "a.nii.gz").is_file()
