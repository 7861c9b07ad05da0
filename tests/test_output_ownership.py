"""fsseg-predict writes only files it owns (issue 44, class 2): a file of the output folder that its record does not
name is refused, never replaced; a rerun replaces its own files; parts sharing one folder keep every case's record."""

from __future__ import annotations

import json

import numpy as np

from conftest import ct_like, write_nifti
from fsseg.cli.predict import main as predict

SPACING = np.diag([4.0, 4.0, 4.0, 1.0])


def scans(folder, names=("a", "b")):
    for i, name in enumerate(names):
        write_nifti(folder / f"{name}.nii.gz", ct_like(seed=i), SPACING)
    return folder


def test_a_file_of_the_output_folder_fsseg_did_not_write_is_refused_not_replaced(tmp_path, tiny_checkpoint, capsys):
    truth = tmp_path / "labels"  # the user's ground truth, named like the masks
    write_nifti(truth / "a.nii.gz", np.zeros((24, 20, 16), np.uint8), SPACING)
    before = (truth / "a.nii.gz").read_bytes()
    assert (
        predict(["-i", str(scans(tmp_path / "scans")), "-o", str(truth), "-m", str(tiny_checkpoint), "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err
    assert "a.nii.gz: exists, and fsseg-predict did not write it" in err and err.count("\n") == 1
    assert (truth / "a.nii.gz").read_bytes() == before and sorted(p.name for p in truth.iterdir()) == ["a.nii.gz"]


def test_a_rerun_replaces_its_own_files(tmp_path, tiny_checkpoint):
    command = [
        "-i",
        str(scans(tmp_path / "scans")),
        "-o",
        str(tmp_path / "out"),
        "-m",
        str(tiny_checkpoint),
        "--save-probabilities",
        "--no-progress",
    ]
    assert predict(command) == 0
    assert predict(command) == 0


def test_parts_predicting_into_one_folder_keep_every_cases_record(tmp_path, tiny_checkpoint):
    folder = scans(tmp_path / "scans", ("a", "b", "c"))
    out = tmp_path / "out"
    for part in ("0", "1"):
        assert (
            predict(
                [
                    "-i",
                    str(folder),
                    "-o",
                    str(out),
                    "-m",
                    str(tiny_checkpoint),
                    "--num-parts",
                    "2",
                    "--part-id",
                    part,
                    "--no-progress",
                ]
            )
            == 0
        )
    cases = json.loads((out / "predictions.json").read_text())["cases"]
    assert {case: entry["status"] for case, entry in cases.items()} == {"a": "ok", "b": "ok", "c": "ok"}


def test_a_predictions_json_of_another_tool_is_refused(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.json").write_text('[{"case": "a", "score": 0.9}]')
    assert (
        predict(["-i", str(scans(tmp_path / "scans")), "-o", str(out), "-m", str(tiny_checkpoint), "--no-progress"])
        == 2
    )
    assert "predictions.json: exists and is not a record of fsseg-predict" in capsys.readouterr().err
    assert (out / "predictions.json").read_text() == '[{"case": "a", "score": 0.9}]'


def test_run_folders_holding_another_commands_or_the_users_config_are_refused(
    tmp_path, tiny_checkpoint, phantom_dir, capsys
):
    from fsseg.adapt.cli import main as adapt
    from fsseg.pretrain.cli import main as pretrain

    theirs = {
        "pretraining run": "model: {name: unet_tiny}\noptim: {lr: 0.001}\ndata: {lists: []}\n",
        "user's notes": "my: notes\n",
    }
    for what, text in theirs.items():
        run = tmp_path / what.replace(" ", "_")
        run.mkdir()
        (run / "config.yaml").write_text(text)
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
                    "--out",
                    str(run),
                    "--no-progress",
                ]
            )
            == 2
        ), what
        assert "config.yaml: exists and is not a file of fsseg-adapt" in capsys.readouterr().err
        assert (run / "config.yaml").read_text() == text
    adapt_run = tmp_path / "adapt_run"
    adapt_run.mkdir()
    (adapt_run / "config.yaml").write_text("organs: [liver]\nshots: [1]\nmethods: [lp]\n")
    assert (
        pretrain(
            [
                "--config",
                "configs/pretrain/tiny.yaml",
                "--data-list",
                str(phantom_dir / "phantom_source_a.json"),
                "--out",
                str(adapt_run),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "config.yaml: exists and is not a file of fsseg-pretrain" in capsys.readouterr().err


def test_forced_writes_never_replace_a_file_the_command_reads(tmp_path, sample_ct, capsys):
    from test_make_list import nnunet_dataset

    from fsseg.cli.make_list import main as make_list

    root = nnunet_dataset(tmp_path / "Dataset001_X", sample_ct)
    before = (root / "dataset.json").read_bytes()
    assert make_list(["nnunet", "--root", str(root), "-o", str(root / "dataset.json"), "--force"]) == 2
    assert "would replace input" in capsys.readouterr().err and (root / "dataset.json").read_bytes() == before


def test_an_evaluation_folder_holding_the_users_files_is_refused_and_its_own_is_replaced(tmp_path, capsys):
    from fsseg.cli.evaluate import main as evaluate

    pred, gt = tmp_path / "pred", tmp_path / "gt"
    mask = np.zeros((24, 20, 16), np.uint8)
    mask[8:16, 8:12, 4:10] = 1
    for folder in (pred, gt):
        write_nifti(folder / "a.nii.gz", mask, SPACING)
    report = tmp_path / "report"
    report.mkdir()
    (report / "summary.json").write_text('{"my": "summary"}')
    command = ["--pred", str(pred), "--gt", str(gt), "-o", str(report), "--no-plot", "--no-progress"]
    assert evaluate(command) == 2
    assert "summary.json: exists and is not a file of fsseg-evaluate" in capsys.readouterr().err
    assert (report / "summary.json").read_text() == '{"my": "summary"}'
    (report / "summary.json").unlink()
    assert evaluate(command) == 0 and evaluate(command) == 0  # its own report is replaced
