"""fsseg-predict and fsseg-evaluate: geometry round trips, batch behaviour, real CT."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from conftest import SAMPLE_CT, TOTALSEG_LIST, ct_like, write_nifti
from fsseg.checkpoint import save_checkpoint
from fsseg.cli.evaluate import main as evaluate
from fsseg.cli.predict import main as predict
from fsseg.inference.predictor import FrozenBackbone, InferenceSettings, Predictor
from fsseg.models import create_model, list_models, register_model
from fsseg.preprocessing import Preprocessing
from fsseg.templates import load_template

# An "oracle" backbone: its feature is the preprocessed image itself, so a 1x1x1 head thresholds intensity.
if "oracle_identity" not in list_models():
    register_model(
        "oracle_identity",
        lambda: (nn.Identity(), 1),
        {},
        {"encoder": [], "decoder": [], "last_decoder_block": []},
        "test oracle: features = the preprocessed image",
    )

PRE = Preprocessing(spacing=(1.5, 1.5, 1.5), roi=(32, 32, 32))
BLOB_HU, BODY_HU = 200, 0


def oracle_checkpoint(path, pre=PRE):
    """Predicts 'liver' where HU > ~100 (intensity (100+175)/425 after the window)."""
    template = load_template()
    model = create_model("oracle_identity", num_classes=len(template))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(-50.0)
        liver = template.channel("liver")
        model.head.weight[liver] = 200.0
        model.head.bias[liver] = -200.0 * (100 + 175) / 425
    return save_checkpoint(
        path,
        {
            "arch": model.arch,
            "template": template.to_dict(),
            "preprocessing": pre.to_dict(),
            "state_dict": model.state_dict(),
        },
    )


def rotation(degrees):
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


AFFINES = {
    "identity": np.diag([1.5, 1.5, 1.5]),
    "lps": np.diag([-1.5, -1.5, 1.5]),
    "flipped_z": np.diag([1.5, 1.5, -1.5]),
    "oblique": rotation(20) @ np.diag([1.5, 1.5, 1.5]),
    "anisotropic": np.diag([0.9, 0.9, 3.0]),
}


def phantom_scan(folder, name, direction):
    shape = (40, 36, 24) if name != "anisotropic" else (60, 56, 12)
    image = np.full(shape, -1000, np.int16)
    image[4:-4, 4:-4, 2:-2] = BODY_HU
    blob = np.zeros(shape, bool)
    c = np.array(shape) // 2
    grid = np.indices(shape)
    blob[((grid - c[:, None, None, None]) ** 2 / (np.array(shape)[:, None, None, None] / 5) ** 2).sum(0) < 1] = True
    image[blob] = BLOB_HU
    affine = np.eye(4)
    affine[:3, :3] = direction
    affine[:3, 3] = [-30.0, 12.0, 40.0]
    path = write_nifti(folder / f"{name}.nii.gz", image, affine)
    return path, blob


def test_geometry_round_trip_and_oracle_dice(tmp_path):
    scans = tmp_path / "scans"
    truth = {name: phantom_scan(scans, name, direction) for name, direction in AFFINES.items()}
    ckpt = oracle_checkpoint(tmp_path / "oracle.pt")
    out = tmp_path / "pred"
    assert predict(["-i", str(scans), "-o", str(out), "-m", str(ckpt), "--organs", "liver", "--no-progress"]) == 0
    assert json.loads((out / "labels.json").read_text()) == {"0": "background", "1": "liver"}
    for name, (path, blob) in truth.items():
        source, result = nib.load(str(path)), nib.load(str(out / path.name))
        assert result.shape == source.shape, name
        assert np.array_equal(result.affine, source.affine), name
        assert np.array_equal(result.get_qform(), source.get_qform()) and np.array_equal(
            result.get_sform(), source.get_sform()
        )
        assert result.header.get_data_dtype() == np.uint8
        predicted = np.asanyarray(result.dataobj) == 1
        dice = 2 * (predicted & blob).sum() / (predicted.sum() + blob.sum())
        if name == "anisotropic":  # resampled to 1.5 mm and back: boundary voxels may change
            assert dice > 0.9, name
        else:
            assert dice == 1.0, name
    report = json.loads((out / "predictions.json").read_text())
    assert report["cases"]["identity"]["structures_found"] == ["liver"]

    # fsseg-evaluate against a folder of ground-truth label maps named like the predictions.
    gt = tmp_path / "gt"
    for path, blob in truth.values():
        write_nifti(gt / path.name, blob.astype(np.uint8), nib.load(str(path)).affine)
    assert (
        evaluate(["--pred", str(out), "--gt", str(gt), "-o", str(tmp_path / "report"), "--no-progress", "--no-plot"])
        == 0
    )
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["structures"]["liver"]["n"] == 5 and summary["structures"]["liver"]["dice"]["median"] == 1.0
    assert report["cases"]["identity"]["volume_ml"]["liver"] == pytest.approx(
        truth["identity"][1].sum() * 1.5**3 / 1000, abs=0.01
    )


def test_batch_with_a_corrupt_file_finishes_the_others(tmp_path, capsys):
    scans = tmp_path / "scans"
    phantom_scan(scans, "good", AFFINES["identity"])
    (scans / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    # A gzip whose header reads but whose data is cut: it fails inside MONAI's Compose, not in the header check.
    whole = (SAMPLE_CT / "images" / "ts_example_ct_sm.nii.gz").read_bytes()
    (scans / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    write_nifti(scans / "flat.nii.gz", ct_like((20, 20, 6))[..., 3])
    ckpt = oracle_checkpoint(tmp_path / "oracle.pt")
    out = tmp_path / "pred"
    assert predict(["-i", str(scans), "-o", str(out), "-m", str(ckpt), "--no-progress"]) == 1
    report = json.loads((out / "predictions.json").read_text())["cases"]
    assert report["good"]["status"] == "ok" and (out / "good.nii.gz").is_file()
    assert report["broken"]["status"] == "failed" and "broken.nii.gz" in report["broken"]["error"]
    assert "expected a 3D volume" in report["flat"]["error"]
    assert report["cut"]["status"] == "failed" and "cut.nii.gz" in report["cut"]["error"]
    assert not (out / "broken.nii.gz").exists() and not list(out.glob(".*part*"))
    assert (out / "good.nii.gz").stat().st_mode & 0o044 == 0o044  # readable by others, like any new file
    assert "broken.nii.gz: failed" in capsys.readouterr().err

    # --continue skips finished cases and retries the failed ones.
    stamp = (out / "good.nii.gz").stat().st_mtime_ns
    assert predict(["-i", str(scans), "-o", str(out), "-m", str(ckpt), "--continue", "--no-progress"]) == 1
    report = json.loads((out / "predictions.json").read_text())["cases"]
    assert report["good"]["status"] == "skipped" and (out / "good.nii.gz").stat().st_mtime_ns == stamp
    assert report["broken"]["status"] == "failed"


def test_cpu_bf16_gives_the_same_oracle_masks_and_the_record_says_so(tmp_path):
    scans = tmp_path / "scans"
    path, blob = phantom_scan(scans, "identity", AFFINES["identity"])
    ckpt = oracle_checkpoint(tmp_path / "oracle.pt")
    for flag, precision in (("--cpu-bf16", "cpu-bfloat16"), ("--no-cpu-bf16", "float32")):
        out = tmp_path / flag
        assert (
            predict(
                [
                    "-i",
                    str(scans),
                    "-o",
                    str(out),
                    "-m",
                    str(ckpt),
                    "--organs",
                    "liver",
                    flag,
                    "--device",
                    "cpu",
                    "--no-progress",
                ]
            )
            == 0
        )
        predicted = np.asanyarray(nib.load(str(out / path.name)).dataobj) == 1
        assert 2 * (predicted & blob).sum() / (predicted.sum() + blob.sum()) > 0.99
        assert json.loads((out / "predictions.json").read_text())["precision"] == precision


def test_cpu_default_runs_small_windows_in_pairs_with_the_features_of_one_at_a_time():
    # One 48^3 window sends the tiny UNet's convolutions down torch's slow CPU path; two take the fast one.
    torch.manual_seed(0)
    model = create_model("unet_tiny", num_classes=2).eval()
    backbone = FrozenBackbone(model.features, model.feature_channels, model.head)
    small = Preprocessing(spacing=(3.0, 3.0, 3.0), roi=(48, 48, 48))
    default = Predictor(backbone, ["a", "b"], small, torch.device("cpu"))
    single = Predictor(backbone, ["a", "b"], small, torch.device("cpu"), InferenceSettings(sw_batch_size=1))
    assert default.sw_batch_size == 2
    image = torch.rand(1, 70, 60, 50)
    paired, alone = default.stitched_features(image, backbone), single.stitched_features(image, backbone)
    assert torch.allclose(paired.float(), alone.float(), atol=2e-3)
    large = Preprocessing(roi=(96, 96, 96))  # one such window already takes the fast path; two only add memory
    assert Predictor(backbone, ["a"], large, torch.device("cpu")).sw_batch_size == 1


def test_parts_split_the_folder(tmp_path):
    scans = tmp_path / "scans"
    for i in range(3):
        phantom_scan(scans, f"case{i}", AFFINES["identity"])
    ckpt = oracle_checkpoint(tmp_path / "oracle.pt")
    out = tmp_path / "pred"
    assert (
        predict(
            ["-i", str(scans), "-o", str(out), "-m", str(ckpt), "--num-parts", "2", "--part-id", "1", "--no-progress"]
        )
        == 0
    )
    assert sorted(p.name for p in out.glob("case*")) == ["case1.nii.gz"]


def test_bad_arguments_are_one_line(tmp_path, capsys):
    ckpt = oracle_checkpoint(tmp_path / "oracle.pt")
    assert predict(["-i", str(tmp_path / "none"), "-o", str(tmp_path / "o"), "-m", str(ckpt)]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    scans = tmp_path / "scans"
    phantom_scan(scans, "a", AFFINES["identity"])
    assert predict(["-i", str(scans), "-o", str(tmp_path / "o"), "-m", str(ckpt), "--organs", "heart"]) == 2
    assert "structure 'heart' is not predicted by this model" in capsys.readouterr().err
    assert predict(["-i", str(scans), "-o", str(scans), "-m", str(ckpt)]) == 2
    assert "this folder holds input" in capsys.readouterr().err


def test_real_ct_prediction_keeps_exact_geometry_and_evaluates(sample_ct, tmp_path, capsys):
    ckpt = oracle_checkpoint(tmp_path / "oracle.pt", Preprocessing(spacing=(3.0, 3.0, 3.0), roi=(32, 32, 32)))
    scans = tmp_path / "scans"
    scans.mkdir()
    source = sample_ct / "images" / "lidc_0001_abd_1p4mm.nii.gz"
    (scans / source.name).symlink_to(source)
    out = tmp_path / "pred"
    assert predict(["-i", str(scans), "-o", str(out), "-m", str(ckpt), "--organs", "liver", "--no-progress"]) == 0
    original, result = nib.load(str(source)), nib.load(str(out / source.name))
    assert result.shape == original.shape and np.array_equal(result.affine, original.affine)
    assert nib.aff2axcodes(result.affine) == ("L", "A", "S")
    assert result.header["qform_code"] == original.header["qform_code"]
    assert np.allclose(result.header.get_zooms(), original.header.get_zooms())

    # Score it against the real label (bright voxels are a poor liver model: the numbers just have to be sane).
    data = json.loads(TOTALSEG_LIST.read_text())
    data["root"] = str(sample_ct)
    for case in data["cases"]:
        case["split"] = "test" if case["id"] in ("lidc_0001_abd_1p4mm", "ts_example_dicom") else "train"
    data_list = tmp_path / "two_tests.json"
    data_list.write_text(json.dumps(data))
    report = tmp_path / "report"
    code = evaluate(
        ["--pred", str(out), "--data-list", str(data_list), "--structures", "liver", "-o", str(report), "--no-progress"]
    )
    summary = json.loads((report / "summary.json").read_text())
    # The other test case has no prediction: it is a failure, not a skip.
    assert code == 1 and summary["failed_cases"] == ["ts_example_dicom"]
    rows = (report / "per_case.csv").read_text().splitlines()
    assert rows[0].startswith("case,structure,dice,nsd,hd95")
    assert any(r.startswith("ts_example_dicom,liver,0.0,0.0,nan,missing") for r in rows)
    scored = [r for r in rows if r.startswith("lidc_0001_abd_1p4mm,liver")][0].split(",")
    assert 0.0 < float(scored[2]) < 1.0 and scored[-1] == "ok"
    assert "liver" in capsys.readouterr().out


def test_a_folder_is_predicted_from_python_with_the_commands_outputs(tiny_checkpoint, tmp_path):
    from fsseg.inference.predict import FolderOptions, predict_folder

    write_nifti(tmp_path / "scans" / "a.nii.gz", ct_like(), np.diag([4.0, 4.0, 4.0, 1.0]))
    cases = predict_folder(
        tmp_path / "scans", tmp_path / "masks", tiny_checkpoint, organs=["liver"], options=FolderOptions(progress=False)
    )
    assert cases["a"]["status"] == "ok" and (tmp_path / "masks" / "a.nii.gz").is_file()
    record = json.loads((tmp_path / "masks" / "predictions.json").read_text())
    assert record["cases"]["a"]["status"] == "ok" and record["structures"] == ["liver"]
    again = predict_folder(
        tmp_path / "scans",
        tmp_path / "masks",
        tiny_checkpoint,
        organs=["liver"],
        options=FolderOptions(resume=True, progress=False),
    )
    assert again["a"]["status"] == "skipped"


def test_a_continued_run_keeps_what_the_first_found_of_the_cases_it_skips(tiny_checkpoint, tmp_path):
    from fsseg.inference.predict import FolderOptions, predict_folder

    write_nifti(tmp_path / "scans" / "a.nii.gz", ct_like(), np.diag([4.0, 4.0, 4.0, 1.0]))
    for resume in (False, True):
        options = FolderOptions(resume=resume, progress=False)
        predict_folder(tmp_path / "scans", tmp_path / "masks", tiny_checkpoint, organs=["liver"], options=options)
        if not resume:
            first = json.loads((tmp_path / "masks" / "predictions.json").read_text())["cases"]["a"]
    kept = json.loads((tmp_path / "masks" / "predictions.json").read_text())["cases"]["a"]
    assert kept["status"] == "skipped" and first["status"] == "ok"
    assert kept["confidence"] == first["confidence"] and kept["volume_ml"] == first["volume_ml"]


def test_a_folder_of_masks_is_scored_from_python(phantom_dir, tiny_checkpoint, tmp_path):
    from fsseg.errors import DataError
    from fsseg.inference.predict import FolderOptions, predict_folder
    from fsseg.metrics.evaluate import evaluate_folder

    target = phantom_dir / "phantom_target.json"
    predict_folder(target, tmp_path / "masks", tiny_checkpoint, organs=["liver"], options=FolderOptions(progress=False))
    summary = evaluate_folder(
        tmp_path / "masks", tmp_path / "report", data_list=target, structures=["liver"], plot=False, progress=False
    )
    assert summary["cases"] == 2 and set(summary["structures"]) == {"liver"} and not summary["failed_cases"]
    assert (tmp_path / "report" / "per_case.csv").is_file() and (tmp_path / "report" / "summary.json").is_file()
    with pytest.raises(DataError, match="one of them"):
        evaluate_folder(tmp_path / "masks", tmp_path / "report2")
