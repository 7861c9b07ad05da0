"""Nothing silently wrong: non-finite voxels, grids that do not match, duplicated structures and ids, values that
are not labels, inputs that are not CT in HU and runs asked for twice all stop or warn instead of scoring."""

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_predict import oracle_checkpoint
from test_pretrain import args as pretrain_args

from conftest import SAMPLE_CT, TOTALSEG_LIST, write_method_configs, write_nifti
from fsseg.adapt.cli import main as adapt
from fsseg.adapt.config import AdaptConfig
from fsseg.adapt.engine import Adaptation
from fsseg.adapters import adapt_model
from fsseg.adapters.artifact import save_adapter
from fsseg.adapters.methods import LinearProbeConfig
from fsseg.checkpoint import load_model, read_checkpoint, save_checkpoint
from fsseg.cli.check_data import main as check_data
from fsseg.cli.evaluate import main as evaluate
from fsseg.cli.predict import main as predict
from fsseg.data.datalist import load_datalist
from fsseg.errors import DataError, user_error
from fsseg.pretrain.cli import main as pretrain

TOTALSEG_MAP = SAMPLE_CT / "label_maps" / "totalsegmentator_v2_total.json"
REAL = "ts_example_ct_sm"


def real_list(path: Path, image: Path, case: str = REAL, split: str = "train") -> Path:
    """A data list of one real CT case (its real label) whose image is ``image``."""
    path.write_text(
        json.dumps(
            {
                "name": "real",
                "label_map": json.loads(TOTALSEG_MAP.read_text()),
                "cases": [
                    {
                        "id": case,
                        "image": str(image),
                        "label": str(SAMPLE_CT / "labels" / f"{case}.nii.gz"),
                        "split": split,
                    }
                ],
            }
        )
    )
    return path


def real_with(tmp_path: Path, name: str, change) -> Path:
    """The real CT scan as float32 with ``change(array)`` applied, on its own grid."""
    source = nib.load(str(SAMPLE_CT / "images" / f"{REAL}.nii.gz"))
    array = np.asanyarray(source.dataobj).astype(np.float32)
    change(array)
    return write_nifti(tmp_path / name / f"{REAL}.nii.gz", array, source.affine)


def poison(array):
    array[40:60, 40:60, 10:12] = np.nan
    array[0, 0, 0] = np.inf


def test_non_finite_voxels_are_refused_wherever_volumes_are_read(sample_ct, tmp_path, capsys):
    scan = real_with(tmp_path, "nan", poison)
    data_list = real_list(tmp_path / "nan.json", scan)
    assert check_data([str(data_list), "--no-progress"]) == 1
    assert "NaN or infinite" in capsys.readouterr().out

    # Prediction: that case fails with the reason, the batch goes on.
    real = np.asanyarray(nib.load(str(SAMPLE_CT / "images" / f"{REAL}.nii.gz")).dataobj)
    write_nifti(scan.parent / "good.nii.gz", real, nib.load(str(scan)).affine)
    out = tmp_path / "pred"
    ckpt = oracle_checkpoint(tmp_path / "oracle.pt")
    assert predict(["-i", str(scan.parent), "-o", str(out), "-m", str(ckpt), "--no-progress"]) == 1
    cases = json.loads((out / "predictions.json").read_text())["cases"]
    assert cases[REAL]["status"] == "failed" and "NaN or infinite" in cases[REAL]["error"]
    assert cases["good"]["status"] == "ok"

    # Adaptation refuses it as a support case before training on it.
    data = json.loads(TOTALSEG_LIST.read_text())
    data["root"] = str(SAMPLE_CT)
    for case in data["cases"]:
        if case["id"] == REAL:
            case["image"] = str(scan)
    adapt_list = tmp_path / "adapt.json"
    adapt_list.write_text(json.dumps(data))
    config = AdaptConfig(checkpoint=str(ckpt), data_list=str(adapt_list), organs=["liver"], shots=[1], methods=["lp"])
    run = Adaptation(config, tmp_path / "adapt", torch.device("cpu"))
    with pytest.raises(Exception) as raised:  # MONAI's Compose wraps it; the CLI prints the cause
        run.support(next(c for c in run.pool if c.id == REAL))
    assert "NaN or infinite" in str(user_error(raised.value))

    # Pretraining refuses the case in one line and saves no checkpoint.
    run = tmp_path / "run"
    assert pretrain(pretrain_args(run, [str(data_list)], 1)) == 2
    assert "NaN or infinite" in capsys.readouterr().err
    assert not (run / "checkpoint_latest.pt").exists()


def test_adapt_refuses_a_test_label_on_another_grid(phantom_dir, tiny_checkpoint, tmp_path, capsys):
    data = json.loads((phantom_dir / "phantom_target.json").read_text())
    data["root"] = str(phantom_dir / "phantom_target")
    test_case = next(c for c in data["cases"] if c["split"] == "test")
    label = nib.load(str(phantom_dir / "phantom_target" / test_case["label"]))
    shifted = label.affine.copy()
    shifted[:3, 3] += 12.0  # same shape, moved by 12 mm: Dice would be computed across two grids
    moved = write_nifti(tmp_path / "moved.nii.gz", np.asanyarray(label.dataobj), shifted)
    test_case["label"] = str(moved)
    path = tmp_path / "moved.json"
    path.write_text(json.dumps(data))
    code = adapt(
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
    assert code == 2
    assert "moved.nii.gz: does not match its image" in capsys.readouterr().err
    assert not (tmp_path / "run" / "results.json").exists()


def test_one_structure_twice_is_refused(tiny_checkpoint, tmp_path, capsys):
    base, template, pre, _ = load_model(tiny_checkpoint)
    adapters = []
    for name in ("a.pt", "b.pt"):
        adapted = adapt_model(base, template, ["liver"], "lp")
        adapters.append(str(save_adapter(tmp_path / name, adapted, "lp", LinearProbeConfig(), tiny_checkpoint, pre)))
    scans = tmp_path / "scans"
    write_nifti(
        scans / "a.nii.gz",
        np.where(np.indices((24,) * 3)[0] > 8, 40, -1000).astype(np.int16),
        np.diag([4.0, 4.0, 4.0, 1.0]),
    )
    assert (
        predict(
            [
                "-i",
                str(scans),
                "-o",
                str(tmp_path / "pred"),
                "-m",
                str(tiny_checkpoint),
                "--adapter",
                *adapters,
                "--no-progress",
            ]
        )
        == 2
    )
    assert "more than one adapter predicts liver" in capsys.readouterr().err

    # A labels.json naming one structure twice would score it twice (Dice 1 against the wrong id).
    pred = tmp_path / "masks"
    label = nib.load(str(SAMPLE_CT / "labels" / f"{REAL}.nii.gz"))
    write_nifti(pred / f"{REAL}.nii.gz", (np.asanyarray(label.dataobj) == 5).astype(np.uint8), label.affine)
    (pred / "labels.json").write_text('{"0": "background", "1": "liver", "2": "liver"}')
    data_list = real_list(tmp_path / "list.json", SAMPLE_CT / "images" / f"{REAL}.nii.gz", split="test")
    assert (
        evaluate(
            [
                "--pred",
                str(pred),
                "--data-list",
                str(data_list),
                "-o",
                str(tmp_path / "r"),
                "--no-plot",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "structure 'liver' is given two ids" in capsys.readouterr().err


def test_values_that_are_not_label_ids_or_not_hu_are_not_taken_as_such(sample_ct, tmp_path, capsys):
    label = nib.load(str(SAMPLE_CT / "labels" / f"{REAL}.nii.gz"))
    pred = tmp_path / "masks"
    write_nifti(pred / f"{REAL}.nii.gz", (np.asanyarray(label.dataobj) == 5) * np.float32(0.7), label.affine)
    (pred / "labels.json").write_text('{"0": "background", "1": "liver"}')
    data_list = real_list(tmp_path / "list.json", SAMPLE_CT / "images" / f"{REAL}.nii.gz", split="test")
    assert (
        evaluate(
            [
                "--pred",
                str(pred),
                "--data-list",
                str(data_list),
                "-o",
                str(tmp_path / "r"),
                "--no-plot",
                "--no-progress",
            ]
        )
        == 1
    )
    row = (tmp_path / "r" / "per_case.csv").read_text().splitlines()[1]
    assert "non-integer values" in row

    # One id given twice in a label map ("1" and "01").
    doubled = tmp_path / "doubled.json"
    doubled.write_text(
        json.dumps(
            {
                "name": "d",
                "label_map": {"1": "liver", "01": "spleen"},
                "cases": [{"id": "a", "image": "a.nii.gz", "label": "a_label.nii.gz"}],
            }
        )
    )
    with pytest.raises(DataError, match="gives id 1 twice"):
        load_datalist(doubled)

    # A scan scaled to [0, 1] is predicted with a warning that names it.
    scaled = real_with(
        tmp_path, "scaled", lambda a: a.__setitem__(slice(None), (np.clip(a, -1000, 1000) + 1000) / 2000)
    )
    assert (
        predict(
            [
                "-i",
                str(scaled.parent),
                "-o",
                str(tmp_path / "p"),
                "-m",
                str(oracle_checkpoint(tmp_path / "o.pt")),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "does not look like CT in HU" in capsys.readouterr().err

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert pretrain(["--config", str(empty), "--out", str(tmp_path / "x")]) == 2
    assert "config file is empty" in capsys.readouterr().err


def test_a_run_asked_for_twice_is_refused(phantom_dir, tiny_checkpoint, tmp_path, capsys):
    common = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--data-list",
        str(phantom_dir / "phantom_target.json"),
        "--out",
        str(tmp_path / "run"),
        "--organ",
        "liver",
        "--no-progress",
    ]
    assert adapt(common + ["--shots", "1", "1", "--method", "lp"]) == 2
    assert "shots lists 1 more than once" in capsys.readouterr().err
    assert adapt(common + ["--shots", "1", "--method", "lp", "lp"]) == 2
    assert "methods lists lp more than once" in capsys.readouterr().err


def test_an_untrained_head_is_neither_predicted_nor_copied(phantom_dir, tiny_checkpoint, tmp_path, capsys, caplog):
    payload = read_checkpoint(tiny_checkpoint)
    imported = save_checkpoint(tmp_path / "imported.pt", {**payload, "kind": "imported", "head_trained": False})
    config = AdaptConfig(
        checkpoint=str(imported),
        data_list=str(phantom_dir / "phantom_target.json"),
        organs=["liver"],
        shots=[1],
        methods=["lp"],
        seeds=1,
    )
    with caplog.at_level(logging.INFO):
        run = Adaptation(config, tmp_path / "adapt", torch.device("cpu"))
    assert "fresh rows for liver" in caplog.text and "start from the checkpoint" not in caplog.text
    adapted = adapt_model(run.base, run.template, ["liver"], "lp")
    liver = run.template.channel("liver")
    assert not torch.equal(adapted.head.weight[0], run.base.head.weight[liver])

    scans = tmp_path / "scans"
    write_nifti(scans / "a.nii.gz", np.full((24, 24, 24), 40, np.int16), np.diag([4.0, 4.0, 4.0, 1.0]))
    assert predict(["-i", str(scans), "-o", str(tmp_path / "pred"), "-m", str(imported), "--no-progress"]) == 2
    assert "adapt it first" in capsys.readouterr().err


def test_evaluate_scores_masks_of_other_tools_by_id(sample_ct, tmp_path, capsys):
    label = nib.load(str(SAMPLE_CT / "labels" / f"{REAL}.nii.gz"))
    ids = np.asanyarray(label.dataobj)
    data_list = real_list(tmp_path / "list.json", SAMPLE_CT / "images" / f"{REAL}.nii.gz", split="test")
    # TotalSegmentator-style output: the ground truth's own ids, no labels.json.
    pred = tmp_path / "totalseg"
    write_nifti(pred / f"{REAL}.nii.gz", ids, label.affine)
    assert (
        evaluate(
            [
                "--pred",
                str(pred),
                "--data-list",
                str(data_list),
                "--structures",
                "liver",
                "spleen",
                "-o",
                str(tmp_path / "r1"),
                "--no-plot",
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "r1" / "summary.json").read_text())
    assert (
        summary["structures"]["liver"]["dice"]["mean"] == 1.0 and summary["structures"]["spleen"]["dice"]["mean"] == 1.0
    )

    # A binary mask with its own map: id 1 is the spleen.
    pred = tmp_path / "binary"
    write_nifti(pred / f"{REAL}.nii.gz", (ids == 1).astype(np.uint8), label.affine)
    (tmp_path / "map.json").write_text('{"0": "background", "1": "spleen"}')
    assert (
        evaluate(
            [
                "--pred",
                str(pred),
                "--data-list",
                str(data_list),
                "--pred-label-map",
                str(tmp_path / "map.json"),
                "-o",
                str(tmp_path / "r2"),
                "--no-plot",
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert list(summary["structures"]) == ["spleen"] and summary["structures"]["spleen"]["dice"]["mean"] == 1.0
    # Two plain id-mask folders, neither naming its ids: each id is scored as a structure of its own.
    gt = tmp_path / "gt"
    write_nifti(gt / f"{REAL}.nii.gz", ids, label.affine)
    assert (
        evaluate(
            [
                "--pred",
                str(tmp_path / "totalseg"),
                "--gt",
                str(gt),
                "-o",
                str(tmp_path / "r3"),
                "--no-plot",
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "r3" / "summary.json").read_text())
    liver = next(int(k) for k, v in json.loads(TOTALSEG_LIST.read_text())["label_map"].items() if v == "liver")
    assert summary["structures"][f"label_{liver}"]["dice"]["mean"] == 1.0
    assert set(summary["structures"]) == {f"label_{i}" for i in np.unique(ids) if i}


def test_a_prediction_holding_ids_its_labels_json_does_not_name_fails_its_case(sample_ct, tmp_path):
    label = nib.load(str(SAMPLE_CT / "labels" / f"{REAL}.nii.gz"))
    ids = np.asanyarray(label.dataobj)
    data_list = real_list(tmp_path / "list.json", SAMPLE_CT / "images" / f"{REAL}.nii.gz", split="test")
    pred = tmp_path / "pred"
    # the liver written as 5 while labels.json calls it 1: its Dice would be 0 without a word
    write_nifti(pred / f"{REAL}.nii.gz", np.where(ids == 5, 5, 0).astype(np.uint8), label.affine)
    (pred / "labels.json").write_text('{"0": "background", "1": "liver"}')
    assert (
        evaluate(
            [
                "--pred",
                str(pred),
                "--data-list",
                str(data_list),
                "-o",
                str(tmp_path / "r"),
                "--no-plot",
                "--no-progress",
            ]
        )
        == 1
    )
    rows = (tmp_path / "r" / "per_case.csv").read_text()
    assert "holds ids [5] that its label map does not name" in rows
