"""Nothing is lost: outputs never replace inputs, never collide, refused runs leave their folder as it was."""

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml
from test_importing import published
from test_predict import oracle_checkpoint
from test_pretrain import args as pretrain_args

from conftest import SAMPLE_CT, write_method_configs, write_nifti
from fsseg.adapt.cli import main as adapt
from fsseg.checkpoint import read_checkpoint, save_checkpoint
from fsseg.cli.evaluate import main as evaluate
from fsseg.cli.import_checkpoint import main as import_checkpoint
from fsseg.cli.predict import main as predict
from fsseg.models import create_model
from fsseg.pretrain.cli import main as pretrain

REAL = "ts_example_ct_sm"
LIVER_ID = 5  # TotalSegmentator v2


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def totalseg_layout(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Path:
    """A TotalSegmentator-layout data set: <case>/ct.nii.gz and <case>/segmentations/liver.nii.gz."""
    entries = []
    for case, (image, liver, affine) in cases.items():
        write_nifti(root / case / "ct.nii.gz", image, affine)
        write_nifti(root / case / "segmentations" / "liver.nii.gz", liver.astype(np.uint8), affine)
        entries.append(
            {
                "id": case,
                "image": f"{case}/ct.nii.gz",
                "labels": {"liver": f"{case}/segmentations/liver.nii.gz"},
                "split": "test",
            }
        )
    path = root / "list.json"
    path.write_text(json.dumps({"name": "ts", "root": ".", "cases": entries}))
    return path


def real_case():
    image, label = (
        nib.load(str(SAMPLE_CT / "images" / f"{REAL}.nii.gz")),
        nib.load(str(SAMPLE_CT / "labels" / f"{REAL}.nii.gz")),
    )
    return np.asanyarray(image.dataobj).astype(np.int16), np.asanyarray(label.dataobj) == LIVER_ID, image.affine


def blob_scan(centre: tuple[int, int, int]):
    """A phantom whose only bright (liver for the oracle) region is a ball at ``centre``."""
    shape = (40, 36, 24)
    image = np.full(shape, -1000, np.int16)
    image[4:-4, 4:-4, 2:-2] = 0
    grid = np.indices(shape)
    ball = ((grid - np.array(centre)[:, None, None, None]) ** 2).sum(0) < 36
    image[ball] = 200
    return image, ball, np.diag([1.5, 1.5, 1.5, 1.0])


def test_predict_refuses_output_folders_that_hold_a_lists_files(sample_ct, tmp_path, capsys):
    root = tmp_path / "ts"
    data_list = totalseg_layout(root, {"s0001": real_case(), "s0002": real_case()})
    ckpt = oracle_checkpoint(tmp_path / "oracle.pt")
    before = digests(root)
    # A case folder (its ct.nii.gz), a label folder, the list's own folder: each holds an input.
    for target in (root / "s0001", root / "s0002" / "segmentations", root):
        assert (
            predict(["-i", str(data_list), "--split", "test", "-o", str(target), "-m", str(ckpt), "--no-progress"]) == 2
        )
        assert "holds input" in capsys.readouterr().err
    assert digests(root) == before

    # A scan folder with the user's own labels.json: refused before anything is written.
    scans = tmp_path / "scans"
    write_nifti(scans / "a.nii.gz", blob_scan((20, 18, 12))[0])
    (scans / "labels.json").write_text('{"1": "my own labels"}')
    before = digests(scans)
    assert predict(["-i", str(scans), "-o", str(scans), "-m", str(ckpt), "--no-progress"]) == 2
    assert digests(scans) == before


def test_cases_with_one_file_name_get_their_own_masks_and_scores(tmp_path, capsys):
    root = tmp_path / "ts"
    cases = {"s0001": blob_scan((12, 10, 8)), "s0002": blob_scan((28, 26, 16))}
    data_list = totalseg_layout(root, cases)
    ckpt = oracle_checkpoint(tmp_path / "oracle.pt")
    out = tmp_path / "pred"
    assert predict(["-i", str(data_list), "-o", str(out), "-m", str(ckpt), "--organs", "liver", "--no-progress"]) == 0
    assert "2 predicted" in capsys.readouterr().out
    for case, (_, ball, _) in cases.items():  # named by case id, each its own mask
        assert np.array_equal(np.asanyarray(nib.load(str(out / f"{case}.nii.gz")).dataobj) == 1, ball), case
    assert not (out / "ct.nii.gz").exists()
    report = tmp_path / "report"
    assert (
        evaluate(["--pred", str(out), "--data-list", str(data_list), "-o", str(report), "--no-plot", "--no-progress"])
        == 0
    )
    summary = json.loads((report / "summary.json").read_text())
    assert summary["cases"] == 2 and summary["structures"]["liver"]["dice"]["mean"] == 1.0

    # Two scans of a folder with one stem would share an output: refused before anything is written.
    scans = tmp_path / "scans"
    write_nifti(scans / "scan.nii.gz", cases["s0001"][0])
    write_nifti(scans / "scan.nii", cases["s0002"][0])
    assert predict(["-i", str(scans), "-o", str(tmp_path / "p2"), "-m", str(ckpt), "--no-progress"]) == 2
    assert "would both be predicted to scan.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "p2").exists()


def test_import_never_replaces_its_source(tmp_path, capsys):
    torch.manual_seed(0)
    source = tmp_path / "published.pth"
    torch.save(published(create_model("swinunetr_tiny", num_classes=29), "fseft"), source)
    before = digest(source)
    assert import_checkpoint([str(source), "-o", str(source), "--force"]) == 2
    assert "would replace input" in capsys.readouterr().err
    link = tmp_path / "link.pth"
    link.symlink_to(source)
    assert import_checkpoint([str(source), "-o", str(link), "--force"]) == 2
    assert digest(source) == before


def test_refused_resume_and_continue_keep_the_runs_config(phantom_dir, tiny_checkpoint, tmp_path, capsys):
    lists = [str(phantom_dir / f"phantom_source_{s}.json") for s in "ab"]
    out = tmp_path / "pretrain"
    assert pretrain(pretrain_args(out, lists, 1)) == 0
    config = (out / "config.yaml").read_text()
    # Resuming with another architecture, and from a checkpoint without training state, is refused.
    assert pretrain(pretrain_args(out, lists, 2, "model.name=unet") + ["--resume", "auto"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert pretrain(pretrain_args(out, lists, 2, "optim.lr=0.5") + ["--resume", str(tiny_checkpoint)]) == 2
    assert "holds no training state" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == config

    run = tmp_path / "adapt"
    run.mkdir()
    kept = {"organs": ["liver"], "shots": [1], "methods": ["lp"], "kept": True}  # an earlier run's, kept
    (run / "config.yaml").write_text(yaml.safe_dump(kept))
    (run / "results.json").write_text(
        json.dumps({"signature": {"checkpoint_sha256": "another"}, "organs": ["liver"], "rows": []})
    )
    code = adapt(
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
    assert code == 2 and "comes from another checkpoint" in capsys.readouterr().err
    assert yaml.safe_load((run / "config.yaml").read_text()) == kept


def test_continue_writes_what_a_killed_run_left_missing(tmp_path):
    scans = tmp_path / "scans"
    write_nifti(scans / "a.nii.gz", blob_scan((20, 18, 12))[0])
    ckpt = oracle_checkpoint(tmp_path / "oracle.pt")
    out = tmp_path / "pred"
    command = [
        "-i",
        str(scans),
        "-o",
        str(out),
        "-m",
        str(ckpt),
        "--organs",
        "liver",
        "--save-probabilities",
        "--no-progress",
    ]
    assert predict(command) == 0
    # What kill -9 during the probabilities leaves: the mask, a hidden part file, no probabilities.
    probabilities = out / "a_probabilities.nii.gz"
    probabilities.rename(out / ".a_probabilities.nii.gz.x1y2.part.nii.gz")
    assert predict(command + ["--continue"]) == 0
    report = json.loads((out / "predictions.json").read_text())
    assert report["cases"]["a"]["status"] == "ok" and probabilities.is_file()
    assert not list(out.glob(".*part*"))
    assert nib.load(str(probabilities)).shape == (40, 36, 24, 1)
    assert predict(command + ["--continue"]) == 0
    assert json.loads((out / "predictions.json").read_text())["cases"]["a"]["status"] == "skipped"


def test_checkpoints_with_non_finite_weights_are_never_written(tiny_checkpoint, tmp_path):
    payload = read_checkpoint(tiny_checkpoint)
    name = next(iter(payload["state_dict"]))
    payload["state_dict"][name] = payload["state_dict"][name].clone().fill_(float("nan"))
    target = tmp_path / "diverged.pt"
    try:
        save_checkpoint(target, payload)
    except Exception as error:
        assert f"tensor {name} holds NaN" in str(error)
    else:
        raise AssertionError("a NaN checkpoint was saved")
    assert not target.exists() and not list(tmp_path.glob(".*part*"))


def test_a_rerun_removes_what_a_killed_import_or_export_left(tiny_checkpoint, tmp_path):
    import os

    from fsseg.cli.export_bundle import main as export_bundle

    source = tmp_path / "published.pth"
    torch.save(published(create_model("swinunetr_tiny", num_classes=29), "fseft"), source)
    leftover = tmp_path / ".imported.pt.k1l2.part.pt"  # what kill -9 leaves inside atomic_path
    leftover.write_bytes(b"half a checkpoint")
    assert import_checkpoint([str(source), "-o", str(tmp_path / "imported.pt")]) == 0
    assert not leftover.exists() and (tmp_path / "imported.pt").is_file()
    staging = tmp_path / ".bundle.x9y8.part"  # a killed export's staging folder
    (staging / "models").mkdir(parents=True)
    umask = os.umask(0o022)
    try:
        assert export_bundle(["-m", str(tiny_checkpoint), "-o", str(tmp_path / "bundle")]) == 0
    finally:
        os.umask(umask)
    assert not staging.exists()
    assert (tmp_path / "bundle").stat().st_mode & 0o777 == 0o755  # a new folder's permissions, not mkdtemp's 0700


def test_a_case_that_fails_after_its_mask_is_written_leaves_none_of_its_files(
    tmp_path, tiny_checkpoint, monkeypatch, capsys
):
    import fsseg.inference.predict as predict_module
    from conftest import ct_like

    for name in ("a", "b"):
        write_nifti(tmp_path / "scans" / f"{name}.nii.gz", ct_like(), np.diag([4.0, 4.0, 4.0, 1.0]))

    def fails_for_b(path, *args):
        if path.name.startswith("b"):
            raise RuntimeError("the picture could not be drawn")
        path.write_bytes(b"png")

    monkeypatch.setattr(predict_module, "overlay_png", fails_for_b)
    out = tmp_path / "out"
    assert (
        predict(
            ["-i", str(tmp_path / "scans"), "-o", str(out), "-m", str(tiny_checkpoint), "--preview", "--no-progress"]
        )
        == 1
    )
    assert "the picture could not be drawn" in capsys.readouterr().err
    assert (out / "a.nii.gz").exists() and (out / "a_preview.png").exists()
    assert not (out / "b.nii.gz").exists()  # the mask was written before the picture failed
