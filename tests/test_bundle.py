"""fsseg-export-bundle: MONAI's bundle runner segments a NIfTI folder with the masks fsseg-predict writes."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import write_method_configs
from fsseg.adapt.cli import main as adapt
from fsseg.checkpoint import read_checkpoint, save_checkpoint
from fsseg.cli.export_bundle import main as export_bundle
from fsseg.cli.predict import main as predict
from fsseg.data.datalist import load_datalist
from fsseg.templates import Template


@pytest.fixture(scope="module")
def adapters(phantom_dir, tiny_checkpoint, tmp_path_factory):
    """A linear probe, a spatial adapter and a LoRA for the liver (the spatial adapter is predicted in two passes,
    the LoRA merged into its backbone in the bundle)."""
    out = tmp_path_factory.mktemp("adapt")
    for method, lr in (("lp", 1.0), ("adapter", 0.1), ("lora", 0.05)):
        configs = write_method_configs(out / f"configs_{method}", epochs=15, crops_per_volume=4, lr=lr)
        assert (
            adapt(
                [
                    "--checkpoint",
                    str(tiny_checkpoint),
                    "--data-list",
                    str(phantom_dir / "phantom_target.json"),
                    "--organ",
                    "liver",
                    "--shots",
                    "1",
                    "--method",
                    method,
                    "--seeds",
                    "1",
                    "--out",
                    str(out / method),
                    "--set",
                    f"method_configs={configs}",
                    "--set",
                    "pictures=false",
                    "--set",
                    "overlap=0.25",
                    "--no-progress",
                ]
            )
            == 0
        )
    return {
        method: out / method / "adapters" / f"liver_{method}_k1_s0.safetensors" for method in ("lp", "adapter", "lora")
    }


def confident_checkpoint(checkpoint, path):
    """The tiny checkpoint with its liver and spleen rows raised, so that its own head finds something."""
    payload = read_checkpoint(checkpoint)
    template = Template.from_dict(payload["template"])
    for name in ("liver", "spleen"):
        payload["state_dict"]["head.bias"][template.channel(name)] += 4.0
    return save_checkpoint(path, payload)


@pytest.mark.parametrize("method", ["lp", "adapter", "lora", None])
def test_a_bundle_run_by_monai_writes_the_masks_of_fsseg_predict(
    phantom_dir, tiny_checkpoint, adapters, tmp_path, method
):
    scans = tmp_path / "scans"
    scans.mkdir()
    for case in load_datalist(phantom_dir / "phantom_target.json").split("test"):
        (scans / f"{case.id}.nii.gz").symlink_to(case.image)
    checkpoint = tiny_checkpoint if method else confident_checkpoint(tiny_checkpoint, tmp_path / "base.pt")
    chosen = ["--adapter", str(adapters[method])] if method else ["--organs", "liver", "spleen"]
    bundle = tmp_path / "bundle"
    assert export_bundle(["-m", str(checkpoint), *chosen, "-o", str(bundle)]) == 0
    assert {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} == {
        "configs/metadata.json",
        "configs/inference.json",
        "models/model.pt",
    }
    assert (
        predict(["-i", str(scans), "-o", str(tmp_path / "fsseg"), "-m", str(checkpoint), *chosen, "--no-progress"]) == 0
    )
    # MONAI's own runner, from a folder of the user's, not the checkout
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str(bundle / "configs" / "inference.json"),
            "--bundle_root",
            str(bundle),
            "--dataset_dir",
            str(scans),
            "--output_dir",
            str(tmp_path / "monai"),
        ],
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = 0
    for scan in sorted(scans.iterdir()):
        stem = scan.name.removesuffix(".nii.gz")
        ours, theirs = (
            nib.load(str(tmp_path / "fsseg" / scan.name)),
            nib.load(str(tmp_path / "monai" / f"{stem}_seg.nii.gz")),
        )
        assert np.allclose(theirs.affine, ours.affine, atol=1e-5)
        mask = np.asanyarray(theirs.dataobj).reshape(ours.shape)
        if method == "lora":  # merged weights round apart from the adapter's two paths: a voxel on the threshold
            assert np.mean(mask != np.asanyarray(ours.dataobj)) < 1e-4
        else:
            assert np.array_equal(mask, np.asanyarray(ours.dataobj))
        found += int(mask.any())
    assert found  # masks that could differ
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert not any("lora_" in key for key in state)  # a LoRA is merged: the bundle runs plain layers
    labels = json.loads((bundle / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]["pred"]
    assert labels["channel_def"]["1"] == "liver"


def test_a_bundle_is_never_written_over_an_existing_folder(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "notes.txt").write_text("mine")
    assert export_bundle(["-m", str(tiny_checkpoint), "-o", str(tmp_path / "bundle")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "bundle").iterdir()] == ["notes.txt"]


def test_a_bundle_preprocesses_as_fsseg_predict_does_refusing_an_all_air_scan(tiny_checkpoint, tmp_path):
    from conftest import write_nifti

    scans = tmp_path / "scans"
    write_nifti(scans / "air.nii.gz", np.full((24, 24, 16), -1000, dtype=np.int16), np.diag([4.0, 4.0, 4.0, 1.0]))
    bundle = tmp_path / "bundle"
    assert export_bundle(["-m", str(tiny_checkpoint), "-o", str(bundle)]) == 0
    steps = json.loads((bundle / "configs" / "inference.json").read_text())["preprocessing"]["transforms"]
    assert [step["_target_"] for step in steps][:1] == ["fsseg.data.transforms.LoadVolumed"]
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
         "--bundle_root", str(bundle), "--dataset_dir", str(scans), "--output_dir", str(tmp_path / "monai")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode != 0 and "no voxel lies above the HU window" in run.stderr
