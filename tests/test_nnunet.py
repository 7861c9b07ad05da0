"""nnU-Net results folders imported: a small network built by dynamic-network-architectures from a plans file,
saved as nnU-Net saves it, gives the same outputs in fsseg, and predicts and adapts on real CT."""

from __future__ import annotations

import json
import pydoc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import TOTALSEG_LIST, write_method_configs
from fsseg.adapt.cli import main as adapt
from fsseg.checkpoint import load_model
from fsseg.cli.import_checkpoint import main as import_checkpoint
from fsseg.cli.predict import main as predict

pytest.importorskip("dynamic_network_architectures", reason="nnU-Net import needs dynamic-network-architectures")

STATS = {
    "mean": 60.0,
    "std": 180.0,
    "percentile_00_5": -990.0,
    "percentile_99_5": 1300.0,
    "min": -1024.0,
    "max": 3000.0,
    "median": 40.0,
}
ARCHITECTURE = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 4,
        "features_per_stage": [8, 16, 24, 32],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2, 2],
        "n_conv_per_stage_decoder": [1, 1, 1],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 3}


def nnunet_network(architecture: dict, classes: int) -> torch.nn.Module:
    """The network nnU-Net trains from these plans: classes located by name, deep supervision on."""
    kwargs = {
        k: pydoc.locate(v) if k in architecture["_kw_requires_import"] and v else v
        for k, v in architecture["arch_kwargs"].items()
    }
    network = pydoc.locate(architecture["network_class_name"])(
        input_channels=1, num_classes=classes, deep_supervision=True, **kwargs
    )
    network.apply(lambda m: torch.nn.init.normal_(m.bias, std=0.3) if getattr(m, "bias", None) is not None else None)
    return network


def write_results_folder(
    root: Path, labels: dict = LABELS, architecture: dict = ARCHITECTURE, normalization: str = "CTNormalization"
) -> tuple[Path, torch.nn.Module]:
    """An nnU-Net v2 results folder with a randomly initialised, 'trained' network, saved as nnU-Net saves it."""
    folder = root / "Dataset042_Abdomen" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    plans = {
        "dataset_name": "Dataset042_Abdomen",
        "plans_name": "nnUNetPlans",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "image_reader_writer": "SimpleITKIO",
        "foreground_intensity_properties_per_channel": {"0": STATS},
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "patch_size": [32, 64, 64],
                "spacing": [3.0, 2.0, 2.0],
                "normalization_schemes": [normalization],
                "use_mask_for_norm": [False],
                "architecture": architecture,
                "batch_size": 2,
            },
            "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
        },
    }
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": 4,
        "file_ending": ".nii.gz",
        "name": "Abdomen",
    }
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    torch.manual_seed(0)  # the same weights whatever ran before in this process: the label checks depend on them
    network = nnunet_network(architecture, len(labels))
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    torch.save(
        {
            "network_weights": network.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "grad_scaler_state": None,
            "logging": {
                "train_losses": [np.float64(-0.4)],
                "ema_fg_dice": [np.float64(0.7)],
                "epoch_end_timestamps": [1.0],
            },
            "_best_ema": np.float64(0.7),
            "current_epoch": 1000,
            "init_args": {
                "plans": plans,
                "configuration": "3d_fullres",
                "fold": 0,
                "dataset_json": dataset,
                "device": torch.device("cpu"),
            },
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": (0, 1, 2),
        },
        folder / "fold_0" / "checkpoint_final.pth",
    )
    return folder, network


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    folder, network = write_results_folder(root)
    output = root / "imported.pt"
    assert import_checkpoint([str(folder), "-o", str(output)]) == 0
    return output, network.eval()


def test_an_nnunet_results_folder_imports_with_its_labels_preprocessing_and_outputs(imported):
    output, network = imported
    model, template, pre, payload = load_model(output)
    assert template.structures == ("liver", "spleen", "kidney_left") and payload["source"]["format"] == "nnunet"
    # SimpleITK's z, y, x of RAS files; the plans' spacing and patch size in that order; no foreground crop.
    assert pre.orientation == "SAR" and pre.spacing == (3.0, 2.0, 2.0) and pre.roi == (32, 64, 64)
    assert pre.hu_window == (-990.0, 1300.0) and not pre.crop_foreground
    model.eval()
    hu = torch.empty(2, 1, 32, 64, 64).uniform_(-1200, 1500, generator=torch.Generator().manual_seed(0))
    window = (hu.clamp(-990, 1300) + 990) / 2290  # fsseg's preprocessing
    z_scored = (hu.clamp(-990, 1300) - 60.0) / 180.0  # nnU-Net's CT normalisation
    with torch.no_grad():
        logits, reference = model(window), network(z_scored)[0]
    assert torch.allclose(logits, reference[:, 1:] - reference[:, :1], atol=1e-4)
    probabilities = torch.sigmoid(logits)
    label = torch.where(probabilities.max(1).values > 0.5, probabilities.argmax(1) + 1, 0)
    # The label map is nnU-Net's argmax wherever the two best classes are not tied to float precision.
    top = reference.topk(2, dim=1).values
    clear = (top[:, 0] - top[:, 1]) > 1e-4
    assert clear.float().mean() > 0.99 and len(label.unique()) == 4
    assert torch.equal(label[clear], reference.argmax(1)[clear])


def test_an_imported_nnunet_predicts_and_adapts_on_real_ct(imported, sample_ct, tmp_path):
    output, _ = imported
    scan = sample_ct / "images" / "ts_example_dicom.nii.gz"
    assert predict(["-i", str(scan), "-o", str(tmp_path / "pred"), "-m", str(output), "--no-progress"]) == 0
    mask, source = nib.load(str(tmp_path / "pred" / scan.name)), nib.load(str(scan))
    assert mask.shape == source.shape and np.array_equal(mask.affine, source.affine)
    assert json.loads((tmp_path / "pred" / "labels.json").read_text())["3"] == "kidney_left"
    configs = write_method_configs(tmp_path / "configs", epochs=1)
    # The small scans: a support from one subject, a test case from another.
    listing = json.loads(TOTALSEG_LIST.read_text())
    listing["root"] = str(sample_ct)
    listing["cases"] = [
        {**case, "split": "test" if case["id"] == "ts_example_dicom" else "train"}
        for case in listing["cases"]
        if case["id"] in ("ts_example_ct_sm", "ts_example_dicom")
    ]
    data_list = tmp_path / "list.json"
    data_list.write_text(json.dumps(listing))
    assert (
        adapt(
            [
                "--checkpoint",
                str(output),
                "--data-list",
                str(data_list),
                "--organ",
                "liver",
                "--shots",
                "1",
                "--method",
                "lp",
                "ft-last",
                "--seeds",
                "1",
                "--out",
                str(tmp_path / "adapt"),
                "--set",
                f"method_configs={configs}",
                "--set",
                "pictures=false",
                "--no-progress",
            ]
        )
        == 0
    )
    rows = (tmp_path / "adapt" / "results.csv").read_text().splitlines()
    assert any(r.startswith("liver,lp,1,0,") for r in rows) and any(r.startswith("liver,ft-last,1,0,") for r in rows)


@pytest.mark.parametrize(
    "problem, message",
    [
        ("regions", "region-based labels"),
        ("mr", "not nnU-Net's CT normalisation"),
        ("missing", "missing for the network plans.json describes, e.g. encoder.stages.3"),
        ("fold", "fold_3/checkpoint_final.pth: not found; this folder holds fold_0/checkpoint_final.pth"),
        ("aliases", "labels name gallbladder under more than one id"),  # two heads for one structure
    ],
)
def test_an_nnunet_folder_that_does_not_fit_is_one_line(tmp_path, capsys, problem, message):
    labels = {
        "regions": {**LABELS, "kidney": [3, 4]},
        "aliases": {"background": 0, "gallbladder": 1, "gall": 2, "kidney_left": 3},
    }.get(problem, LABELS)
    folder, network = write_results_folder(
        tmp_path, labels=labels, normalization="ZScoreNormalization" if problem == "mr" else "CTNormalization"
    )
    if problem == "missing":
        weights_file = folder / "fold_0" / "checkpoint_final.pth"
        payload = torch.load(weights_file, weights_only=False)
        payload["network_weights"] = {
            k: v for k, v in payload["network_weights"].items() if not k.startswith("encoder.stages.3")
        }
        torch.save(payload, weights_file)
    args = [str(folder), "-o", str(tmp_path / "out.pt")] + (["--fold", "3"] if problem == "fold" else [])
    assert import_checkpoint(args) == 2
    printed = capsys.readouterr().err
    assert message in printed and "Traceback" not in printed, printed
    assert not (tmp_path / "out.pt").exists()


def test_plans_from_before_nnunet_2_4_build_the_same_network(tmp_path):
    from fsseg.importing_nnunet import architecture

    kwargs = ARCHITECTURE["arch_kwargs"]
    legacy = {
        "UNet_class_name": "PlainConvUNet",
        "UNet_base_num_features": 8,
        "unet_max_num_features": 32,
        "conv_kernel_sizes": kwargs["kernel_sizes"],
        "pool_op_kernel_sizes": kwargs["strides"],
        "n_conv_per_stage_encoder": kwargs["n_conv_per_stage"],
        "n_conv_per_stage_decoder": kwargs["n_conv_per_stage_decoder"],
    }
    network_class, built, imports = architecture(legacy, tmp_path)
    assert network_class == ARCHITECTURE["network_class_name"] and imports == ARCHITECTURE["_kw_requires_import"]
    assert built["features_per_stage"] == [8, 16, 32, 32]
    assert {k: v for k, v in built.items() if k != "features_per_stage"} == {
        k: v for k, v in kwargs.items() if k != "features_per_stage"
    }


def test_force_never_replaces_a_file_of_the_results_folder_it_reads(tmp_path, capsys):
    folder, _ = write_results_folder(tmp_path)
    for name in ("plans.json", "fold_0/checkpoint_final.pth"):
        before = (folder / name).read_bytes()
        assert import_checkpoint([str(folder), "-o", str(folder / name), "--force"]) == 2
        assert "would replace input" in capsys.readouterr().err and (folder / name).read_bytes() == before


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c.update({"inherits_from": "3d_fullres"}),
            "configurations inherit in a cycle: 3d_fullres -> 3d_fullres",
        ),
        (lambda c: c["architecture"].pop("arch_kwargs"), "described with missing or malformed values (KeyError"),
        (lambda c: c["architecture"].update(arch_kwargs=[1, 2]), "described with missing or malformed values"),
    ],
)
def test_malformed_plans_are_one_line(tmp_path, capsys, change, message):
    folder, _ = write_results_folder(tmp_path)
    plans = json.loads((folder / "plans.json").read_text())
    change(plans["configurations"]["3d_fullres"])
    (folder / "plans.json").write_text(json.dumps(plans))
    assert import_checkpoint([str(folder), "-o", str(tmp_path / "out.pt")]) == 2
    printed = capsys.readouterr().err
    assert message in printed and "Traceback" not in printed and printed.count("\n") == 1, printed
