"""Bad input ends in one line naming the file or option, with a non-zero exit: never a traceback."""

import json
import os
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_predict import oracle_checkpoint
from test_pretrain import args as pretrain_args

from conftest import SAMPLE_CT, ct_like, write_method_configs, write_nifti
from fsseg.adapt.cli import main as adapt
from fsseg.adapters import adapt_model
from fsseg.adapters.artifact import read_adapter_file, save_adapter, write_adapter_file
from fsseg.adapters.feature_cache import FeatureStore
from fsseg.adapters.methods import LinearProbeConfig
from fsseg.checkpoint import load_model, read_checkpoint
from fsseg.cli.check_data import main as check_data
from fsseg.cli.evaluate import main as evaluate
from fsseg.cli.import_checkpoint import main as import_checkpoint
from fsseg.cli.make_list import main as make_list
from fsseg.cli.phantom import main as phantom
from fsseg.cli.predict import main as predict
from fsseg.inference.predictor import FrozenBackbone, Predictor
from fsseg.pretrain.cli import main as pretrain

REAL = "ts_example_ct_sm"


def one_line(capsys, expected: str, stream: str = "err") -> None:
    captured = getattr(capsys.readouterr(), stream)
    assert "Traceback" not in captured
    errors = [line for line in captured.splitlines() if "error" in line]
    assert errors and expected in errors[-1], captured


def with_spacing(tmp_path: Path, name: str, zooms) -> Path:
    """The real CT with the voxel size of its affine (the sform; no qform) replaced by ``zooms``."""
    source = nib.load(str(SAMPLE_CT / "images" / f"{REAL}.nii.gz"))
    affine = source.affine.copy()
    affine[:3, :3] = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0) * np.asarray(zooms)
    image = nib.Nifti1Image(np.asanyarray(source.dataobj), None, header=source.header.copy())
    image.set_qform(None, code=0)
    image.set_sform(affine, code=1)
    path = tmp_path / name / f"{name}.nii.gz"
    path.parent.mkdir(parents=True)
    nib.save(image, str(path))
    return path


def test_implausible_voxel_sizes_are_refused(sample_ct, tmp_path, capsys):
    zero, huge = with_spacing(tmp_path, "zero", (3.0, 0.0, 3.0)), with_spacing(tmp_path, "huge", (45.0, 45.0, 45.0))
    listed = tmp_path / "list.json"
    listed.write_text(
        json.dumps(
            {
                "name": "odd",
                "cases": [
                    {"id": "zero", "image": str(zero), "split": "test"},
                    {"id": "huge", "image": str(huge), "split": "test"},
                ],
            }
        )
    )
    assert check_data([str(listed), "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert (
        "zero.nii.gz: voxel size 3x0x3 mm is implausible" in printed and "huge.nii.gz: voxel size 45x45x45" in printed
    )
    # In a prediction batch each fails on its own; the good scan is still predicted.
    scans = tmp_path / "scans"
    scans.mkdir()
    for path in (zero, huge, SAMPLE_CT / "images" / f"{REAL}.nii.gz"):
        (scans / path.name).symlink_to(path)
    out = tmp_path / "pred"
    assert (
        predict(["-i", str(scans), "-o", str(out), "-m", str(oracle_checkpoint(tmp_path / "o.pt")), "--no-progress"])
        == 1
    )
    cases = json.loads((out / "predictions.json").read_text())["cases"]
    assert [cases[c]["status"] for c in ("zero", "huge", REAL)] == ["failed", "failed", "ok"]
    assert "implausible for CT" in cases["huge"]["error"]


def test_a_rank_deficient_affine_is_refused_not_predicted_on(tmp_path, capsys):
    axes = np.array([[2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0, 0, 0, 1]])  # x = y
    image = nib.Nifti1Image(ct_like(), np.eye(4))
    image.set_sform(axes, code=1)
    image.set_qform(None, code=0)
    path = tmp_path / "scans" / "flat.nii.gz"
    path.parent.mkdir()
    nib.save(image, str(path))
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps({"name": "odd", "cases": [{"id": "flat", "image": str(path), "split": "test"}]}))
    assert check_data([str(listed), "--no-progress"]) == 1
    assert "flat.nii.gz: the header's voxel axes are not independent" in capsys.readouterr().out
    out = tmp_path / "pred"
    assert (
        predict(
            ["-i", str(path.parent), "-o", str(out), "-m", str(oracle_checkpoint(tmp_path / "o.pt")), "--no-progress"]
        )
        == 1
    )
    cases = json.loads((out / "predictions.json").read_text())["cases"]
    assert "voxel axes are not independent" in cases["flat"]["error"]


def test_a_header_claiming_more_memory_than_the_machine_has_is_refused_before_reading(tmp_path, capsys):
    header = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.diag([0.1, 0.1, 0.1, 1.0])).header
    header.set_data_shape((20000, 20000, 2000))  # 2 m across at 0.1 mm: plausible sizes, 3 TB of voxels
    path = tmp_path / "huge.nii"
    path.write_bytes(header.binaryblock + b"\0" * 68)
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps({"name": "odd", "cases": [{"id": "huge", "image": str(path), "split": "test"}]}))
    assert check_data([str(listed), "--no-progress"]) == 1
    assert "huge.nii: the header claims a 20000x20000x2000 grid" in capsys.readouterr().out


@pytest.fixture()
def blocker(tmp_path) -> Path:
    """A plain file where an output folder would go."""
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


def writers(tmp_path, blocker, phantom_dir, ckpt):
    scans = tmp_path / "scans"
    write_nifti(scans / "a.nii.gz", np.full((24, 24, 24), 40, np.int16), np.diag([4.0, 4.0, 4.0, 1.0]))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "w.pth")
    (tmp_path / "folder").mkdir(exist_ok=True)
    target = str(phantom_dir / "phantom_target.json")
    return {
        "predict": (predict, ["-i", str(scans), "-o", str(blocker), "-m", str(ckpt)]),
        "predict-below-file": (predict, ["-i", str(scans), "-o", str(blocker / "sub"), "-m", str(ckpt)]),
        "evaluate": (
            evaluate,
            [
                "--pred",
                str(scans),
                "--gt",
                str(scans),
                "--gt-label-map",
                str(tmp_path / "none.json"),
                "-o",
                str(blocker),
            ],
        ),
        "import-into-folder": (import_checkpoint, [str(tmp_path / "w.pth"), "-o", str(tmp_path / "folder"), "--force"]),
        "make-list": (make_list, ["btcv", "--root", str(tmp_path), "-o", str(tmp_path / "folder"), "--force"]),
        "phantom": (phantom, ["--out", str(blocker)]),
        "adapt": (adapt, ["--checkpoint", str(ckpt), "--data-list", target, "--out", str(blocker)]),
        "pretrain": (pretrain, pretrain_args(blocker, [target], 1)),
        "unwritable": (phantom, ["--out", "/proc/fsseg-cannot-write-here"]),
    }


@pytest.mark.parametrize(
    "command",
    [
        "predict",
        "predict-below-file",
        "evaluate",
        "import-into-folder",
        "make-list",
        "phantom",
        "adapt",
        "pretrain",
        "unwritable",
    ],
)
def test_every_writer_refuses_a_bad_output_path_in_one_line(
    command, tmp_path, blocker, phantom_dir, tiny_checkpoint, capsys
):
    main, argv = writers(tmp_path, blocker, phantom_dir, tiny_checkpoint)[command]
    assert main(argv + ["--no-progress"] if command not in ("import-into-folder", "make-list") else argv) == 2
    captured = capsys.readouterr().err
    assert "Traceback" not in captured and "error:" in captured
    assert blocker.read_text() == "not a folder"


OUT_OF_RANGE = {
    "pretrain": [
        (["optim.lr=.nan"], "expected a finite number"),
        (["optim.weight_decay=-1"], "must lie in [0, inf)"),
        (["num_workers=-2"], "must lie in [0, inf)"),
        (["augmentation.pos=0", "augmentation.neg=0"], "cannot both be 0"),
        (["preprocessing.roi=[8, 8, 8]"], "multiples of 16"),
        (["preprocessing.orientation=RRS"], "one of each pair"),
        (["loss.smooth=0"], "must lie in (0, inf)"),
        (["augmentation.intensity_shift_prob=1.5"], "[0, 1]"),
        (["optim.grad_clip=-1"], "(0, inf)"),
        (["sampling.volumes_per_epoch=0"], "[1, inf)"),
    ],
    "adapt": [
        (["overlap=1.0"], "[0, 1)"),
        (["nsd_tolerance=-1"], "(0, inf)"),
        (["ti.gamma=2"], "[0, 1)"),
        (["seeds=0"], "[1, inf)"),
        (["shots=[0]"], "[1, inf)"),
    ],
}


@pytest.mark.parametrize(
    "stage, overrides, expected", [(stage, o, e) for stage, cases in OUT_OF_RANGE.items() for o, e in cases]
)
def test_out_of_range_settings_are_one_line(stage, overrides, expected, phantom_dir, tiny_checkpoint, tmp_path, capsys):
    if stage == "pretrain":
        code = pretrain(pretrain_args(tmp_path / "run", [str(phantom_dir / "phantom_source_a.json")], 1, *overrides))
    else:
        sets = [arg for override in overrides for arg in ("--set", override)]
        code = adapt(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--data-list",
                str(phantom_dir / "phantom_target.json"),
                "--out",
                str(tmp_path / "run"),
                *sets,
                "--no-progress",
            ]
        )
    assert code == 2
    one_line(capsys, expected)


def test_out_of_range_method_settings_and_options_are_one_line(phantom_dir, tiny_checkpoint, tmp_path, capsys):
    configs = write_method_configs(tmp_path / "m", lr=float("nan"))
    assert (
        adapt(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--data-list",
                str(phantom_dir / "phantom_target.json"),
                "--out",
                str(tmp_path / "run"),
                "--set",
                f"method_configs={configs}",
                "--organ",
                "liver",
                "--shots",
                "1",
                "--method",
                "lp",
                "--no-progress",
            ]
        )
        == 2
    )
    one_line(capsys, "training.lr: expected a finite number")
    scans = tmp_path / "scans"
    write_nifti(scans / "a.nii.gz", np.full((24, 24, 24), 40, np.int16), np.diag([4.0, 4.0, 4.0, 1.0]))
    for option, value in (("--overlap", "1"), ("--sw-batch-size", "0"), ("--num-parts", "0")):
        with pytest.raises(SystemExit) as stop:
            predict(["-i", str(scans), "-o", str(tmp_path / "p"), "-m", str(tiny_checkpoint), option, value])
        assert stop.value.code == 2
        assert f"argument {option}: the value must lie in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate(["--pred", str(scans), "--gt", str(scans), "-o", str(tmp_path / "r"), "--nsd-tolerance", "-1"])
    assert "argument --nsd-tolerance" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        phantom(["--out", str(tmp_path / "ph"), "--source-cases", "0"])
    assert "argument --source-cases" in capsys.readouterr().err


def test_largest_component_needs_no_undeclared_package(tmp_path):
    scans = tmp_path / "scans"
    image = np.full((40, 36, 24), -1000, np.int16)
    image[4:-4, 4:-4, 2:-2] = 0
    image[8:14, 8:14, 6:12] = 200
    image[26:28, 26:28, 16:18] = 200  # a second, smaller bright region
    write_nifti(scans / "a.nii.gz", image, np.diag([1.5, 1.5, 1.5, 1.0]))
    out = tmp_path / "pred"
    assert (
        predict(
            [
                "-i",
                str(scans),
                "-o",
                str(out),
                "-m",
                str(oracle_checkpoint(tmp_path / "o.pt")),
                "--organs",
                "liver",
                "--largest-component",
                "--no-progress",
            ]
        )
        == 0
    )
    mask = np.asanyarray(nib.load(str(out / "a.nii.gz")).dataobj)
    assert mask[10, 10, 8] == 1 and mask[26:28, 26:28, 16:18].max() == 0


def crafted(tiny_checkpoint, tmp_path):
    payload = read_checkpoint(tiny_checkpoint)
    state = payload["state_dict"]
    files = {
        "wrong_shape": {**payload, "state_dict": {**state, "head.weight": state["head.weight"][:, :4]}},
        "short_template": {**payload, "template": {"name": "short", "structures": ["liver"], "ids": [1]}},
        "missing_arch": {k: v for k, v in payload.items() if k != "arch"},
        "bad_arch": {**payload, "arch": "unet_tiny"},
    }
    for name, content in files.items():
        torch.save(content, tmp_path / f"{name}.pt")
    return {name: tmp_path / f"{name}.pt" for name in files}


def test_crafted_checkpoints_and_adapters_are_one_line(tiny_checkpoint, tmp_path, capsys):
    scans = tmp_path / "scans"
    write_nifti(scans / "a.nii.gz", np.full((24, 24, 24), 40, np.int16), np.diag([4.0, 4.0, 4.0, 1.0]))
    expected = {
        "wrong_shape": "tensor head.weight has shape (29, 4, 1, 1, 1)",
        "short_template": "tensor head.weight",
        "missing_arch": "checkpoint lacks arch",
        "bad_arch": "'arch' must be",
    }
    for name, path in crafted(tiny_checkpoint, tmp_path).items():
        assert predict(["-i", str(scans), "-o", str(tmp_path / name), "-m", str(path), "--no-progress"]) == 2
        one_line(capsys, expected[name])

    base, template, pre, _ = load_model(tiny_checkpoint)
    adapter = save_adapter(
        tmp_path / "lp.safetensors",
        adapt_model(base, template, ["liver"], "lp"),
        "lp",
        LinearProbeConfig(),
        tiny_checkpoint,
        pre,
    )
    payload = read_adapter_file(adapter)
    write_adapter_file(tmp_path / "shape.safetensors", {**payload, "state_dict": {"head.weight": torch.zeros(3, 3)}})
    write_adapter_file(tmp_path / "nostructures.safetensors", {k: v for k, v in payload.items() if k != "structures"})
    (tmp_path / "cut.safetensors").write_bytes(adapter.read_bytes()[:-100])
    torch.save(payload, tmp_path / "earlier.pt")  # an adapter file of an earlier fsseg version still loads
    for name, message in (
        ("shape", "tensor head.weight has shape (3, 3)"),
        ("nostructures", "lacks structures"),
        ("cut", "truncated or corrupt"),
    ):
        assert (
            predict(
                [
                    "-i",
                    str(scans),
                    "-o",
                    str(tmp_path / f"o{name}"),
                    "-m",
                    str(tiny_checkpoint),
                    "--adapter",
                    str(tmp_path / f"{name}.safetensors"),
                    "--no-progress",
                ]
            )
            == 2
        )
        one_line(capsys, message)
    assert (
        predict(
            [
                "-i",
                str(scans),
                "-o",
                str(tmp_path / "oearlier"),
                "-m",
                str(tiny_checkpoint),
                "--adapter",
                str(tmp_path / "earlier.pt"),
                "--no-progress",
            ]
        )
        == 0
    )


class RunsCode:
    """A pickled payload that would run a shell command when unpickled."""

    def __reduce__(self):
        return os.system, ("echo this must never run",)


def test_files_torch_cannot_or_will_not_load_are_named_for_what_they_are(tmp_path, capsys):
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    (tmp_path / "scan.pth").write_bytes((SAMPLE_CT / "labels" / f"{REAL}.nii.gz").read_bytes())
    torch.save({"w": torch.ones(1000)}, tmp_path / "whole.pth")
    whole = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[: len(whole) // 2])
    torch.save({"w": torch.ones(2), "when": np.datetime64("2024-01-01")}, tmp_path / "objects.pth")
    torch.save({"w": torch.ones(2), "x": RunsCode()}, tmp_path / "code.pth")
    cases = {
        "random": "not a PyTorch file",
        "scan": "gzip data, a NIfTI perhaps",
        "cut": "not a PyTorch file",
        "objects": "holds a Python object of type",
        "code": "holds code, a call to posix.system, that unpickling would run; it is never loaded",
    }
    for name, expected in cases.items():
        assert import_checkpoint([str(tmp_path / f"{name}.pth"), "-o", str(tmp_path / f"{name}.pt")]) == 2
        captured = capsys.readouterr().err
        assert expected in captured and "Traceback" not in captured, name
        assert ("--unsafe-load" in captured) == (name == "objects"), name


def test_more_malformed_inputs_are_one_line(phantom_dir, tiny_checkpoint, tmp_path, capsys):
    # --gt-label-map missing, then malformed.
    gt = tmp_path / "gt"
    write_nifti(gt / "a.nii.gz", np.zeros((8, 8, 8), np.uint8))
    assert (
        evaluate(
            [
                "--pred",
                str(gt),
                "--gt",
                str(gt),
                "--gt-label-map",
                str(tmp_path / "none.json"),
                "-o",
                str(tmp_path / "r"),
                "--no-plot",
            ]
        )
        == 2
    )
    one_line(capsys, "--gt-label-map not found")
    (tmp_path / "bad.json").write_text("{1: liver")
    assert (
        evaluate(
            [
                "--pred",
                str(gt),
                "--gt",
                str(gt),
                "--gt-label-map",
                str(tmp_path / "bad.json"),
                "-o",
                str(tmp_path / "r"),
                "--no-plot",
            ]
        )
        == 2
    )
    one_line(capsys, "is not valid JSON")

    # A data list whose root is not a string; a results.json that is a list.
    (tmp_path / "rootless.json").write_text(json.dumps({"name": "x", "root": 3, "cases": [{"id": "a", "image": "a"}]}))
    assert check_data([str(tmp_path / "rootless.json")]) == 2
    one_line(capsys, "'root' must be a string")
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("[]")
    assert (
        adapt(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--data-list",
                str(phantom_dir / "phantom_target.json"),
                "--out",
                str(run),
                "--set",
                f"method_configs={write_method_configs(tmp_path / 'm')}",
                "--organ",
                "liver",
                "--shots",
                "1",
                "--method",
                "lp",
                "--continue",
                "--no-progress",
            ]
        )
        == 2
    )
    one_line(capsys, "results.json: exists and is not a file of fsseg-adapt")

    # Broken dataset specs.
    specs = {
        "list": [],
        "no_id_group": {"layouts": [{"image_glob": "*.nii.gz", "id_pattern": "(.*)"}]},
        "bad_regex": {"layouts": [{"image_glob": "*.nii.gz", "id_pattern": "(?P<id>"}]},
        "unknown_field": {"layouts": [{"image_glob": "*", "id_pattern": "(?P<id>.*)", "label": "{case}.nii"}]},
        "layout_not_object": {"layouts": ["imagesTr"]},
    }
    for name, spec in specs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(spec))
        assert make_list([str(tmp_path / f"{name}.json"), "--root", str(tmp_path), "-o", str(tmp_path / "o.json")]) == 2
        captured = capsys.readouterr().err
        assert f"{name}.json" in captured and "Traceback" not in captured, name


def test_blank_training_scans_are_named_not_called_empty_masks(phantom_dir, tiny_checkpoint, tmp_path, capsys):
    data = json.loads((phantom_dir / "phantom_target.json").read_text())
    data["root"] = str(phantom_dir / "phantom_target")
    train = next(c for c in data["cases"] if c["split"] == "train")
    reference = nib.load(str(phantom_dir / "phantom_target" / train["image"]))
    air = write_nifti(tmp_path / "air.nii.gz", np.full(reference.shape, -1000, np.int16), reference.affine)
    data["cases"] = [c for c in data["cases"] if c["split"] == "test"] + [{**train, "image": str(air)}]
    path = tmp_path / "air.json"
    path.write_text(json.dumps(data))
    assert (
        adapt(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--data-list",
                str(path),
                "--out",
                str(tmp_path / "run"),
                "--set",
                f"method_configs={write_method_configs(tmp_path / 'm')}",
                "--organ",
                "liver",
                "--shots",
                "1",
                "--method",
                "lp",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "air.nii.gz: no voxel lies above the HU window" in err and "mask is empty" not in err
    source = json.loads((phantom_dir / "phantom_source_a.json").read_text())
    source["root"] = str(phantom_dir / "phantom_source_a")
    source["cases"] = [
        {**source["cases"][0], "image": str(air), "label": str(phantom_dir / "phantom_target" / train["label"])}
    ]
    source["label_map"] = data["label_map"]
    (tmp_path / "air_source.json").write_text(json.dumps(source))
    assert pretrain(pretrain_args(tmp_path / "pre", [str(tmp_path / "air_source.json")], 1)) == 2
    one_line(capsys, "no voxel lies above the HU window")


def test_damaged_caches_are_recomputed(phantom_dir, tmp_path):
    lists = [str(phantom_dir / "phantom_source_a.json")]
    out = tmp_path / "run"
    assert pretrain(pretrain_args(out, lists, 1)) == 0
    cached = sorted((out / "cache").glob("*.pt"))
    assert cached
    for path in cached:  # a full disk or a kill mid-write
        path.write_bytes(path.read_bytes()[:100])
    assert pretrain(pretrain_args(out, lists, 2) + ["--resume", "auto"]) == 0
    assert all(zipfile.is_zipfile(p) for p in (out / "cache").glob("*.pt"))

    model, _, pre, _ = load_model(out / "checkpoint_latest.pt")
    predictor = Predictor(model, [], pre, torch.device("cpu"))
    backbone = FrozenBackbone(model.features, model.feature_channels, model.head)
    store = FeatureStore(tmp_path / "features", "key", lambda image: predictor.stitched_features(image, backbone))
    image = torch.rand(1, 40, 36, 24)
    first = np.array(store.get("scan", image))
    path = store.path("scan")
    path.write_bytes(path.read_bytes()[:200])
    assert np.array_equal(np.array(store.get("scan", image)), first)
