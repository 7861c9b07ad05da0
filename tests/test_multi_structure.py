"""Several target structures in one adaptation run, and the pictures the commands draw."""

import csv
import json
import struct

import numpy as np
import pytest

from conftest import TOTALSEG_LIST, write_method_configs
from fsseg.adapt.cli import main as adapt
from fsseg.cli.evaluate import main as evaluate
from fsseg.cli.predict import main as predict


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def run_args(checkpoint, data_list, out, configs, *extra):
    return [
        "--checkpoint",
        str(checkpoint),
        "--data-list",
        str(data_list),
        "--out",
        str(out),
        "--set",
        f"method_configs={configs}",
        "--set",
        "overlap=0.25",
        "--no-progress",
        *extra,
    ]


def test_two_structures_share_one_run_with_rows_pictures_and_one_label_map(phantom_dir, tiny_checkpoint, tmp_path):
    configs = write_method_configs(tmp_path / "configs", epochs=3)
    out = tmp_path / "run"
    assert (
        adapt(
            run_args(
                tiny_checkpoint,
                phantom_dir / "phantom_target.json",
                out,
                configs,
                "--organ",
                "liver",
                "spleen",
                "--shots",
                "1",
                "2",
                "--method",
                "lp",
                "adapter",
                "--seeds",
                "2",
            )
        )
        == 0
    )
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["organ"] for r in rows} == {"liver", "spleen"}
    assert len(rows) == 2 * 2 * 2 * 2 * 2  # organs x methods x K x seeds x test cases
    # One support set per (K, seed), shared by both structures and methods.
    assert len({r["support"] for r in rows if (r["shots"], r["seed"]) == ("2", "1")}) == 1
    # The table (what dice_vs_shots.png plots) is the mean over test cases, then mean ± std over seeds.
    table = json.loads((out / "results.json").read_text())["table"]
    for organ in ("liver", "spleen"):
        for method in ("lp", "adapter"):
            for k in ("1", "2"):
                per_seed = [
                    np.mean(
                        [
                            float(r["dice"])
                            for r in rows
                            if (r["organ"], r["method"], r["shots"], r["seed"]) == (organ, method, k, str(seed))
                        ]
                    )
                    for seed in (0, 1)
                ]
                cell = table[organ][method][k]
                assert cell["mean"] == pytest.approx(np.mean(per_seed)) and cell["std"] == pytest.approx(
                    np.std(per_seed)
                )
    for organ in ("liver", "spleen"):
        width, height = png_size(out / f"dice_vs_shots_{organ}.png")
        assert 300 < width < 2000 and 200 < height < 2000
    overlays = sorted((out / "pictures" / "lp").glob("*.png"))
    assert len(overlays) == 2 * 2  # each test case, each structure
    width, height = png_size(overlays[0])
    assert width > 2 * height > 400  # three views side by side
    adapters = sorted(p.name for p in (out / "adapters").iterdir())
    assert "liver+spleen_adapter_k2_s1.safetensors" in adapters

    # fsseg-predict writes both structures of the adapter into one label map, with previews.
    pred = tmp_path / "pred"
    assert (
        predict(
            [
                "-i",
                str(phantom_dir / "phantom_target.json"),
                "-o",
                str(pred),
                "-m",
                str(tiny_checkpoint),
                "--adapter",
                str(out / "adapters" / "liver+spleen_lp_k2_s0.safetensors"),
                "--overlap",
                "0.25",
                "--preview",
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((pred / "labels.json").read_text()) == {"0": "background", "1": "liver", "2": "spleen"}
    previews = sorted(pred.glob("*_preview.png"))
    assert len(previews) == 2 and png_size(previews[0])[0] > 400
    report = tmp_path / "report"
    assert (
        evaluate(
            [
                "--pred",
                str(pred),
                "--data-list",
                str(phantom_dir / "phantom_target.json"),
                "-o",
                str(report),
                "--no-progress",
            ]
        )
        == 0
    )
    assert png_size(report / "dice_boxplot.png")[1] > 200
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary["structures"]) == {"liver", "spleen"}


def test_two_structures_on_real_ct(sample_ct, tiny_checkpoint, tmp_path):
    configs = write_method_configs(tmp_path / "configs", epochs=2)
    out = tmp_path / "real"
    assert (
        adapt(
            run_args(
                tiny_checkpoint,
                TOTALSEG_LIST,
                out,
                configs,
                "--organ",
                "liver",
                "spleen",
                "--shots",
                "1",
                "--method",
                "lp",
                "--seeds",
                "1",
            )
        )
        == 0
    )
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["case"], r["organ"]) for r in rows) == [
        ("lidc_0001_abd_1p4mm", "liver"),
        ("lidc_0001_abd_1p4mm", "spleen"),
    ]


def test_group_name_expands_and_missing_members_are_named(phantom_dir, tiny_checkpoint, tmp_path, capsys):
    assert (
        adapt(
            run_args(
                tiny_checkpoint,
                phantom_dir / "phantom_target.json",
                tmp_path / "x",
                tmp_path,
                "--organ",
                "flare9",
                "--shots",
                "1",
            )
        )
        == 2
    )
    assert "no case annotates esophagus, duodenum" in capsys.readouterr().err


def test_too_few_cases_annotating_every_structure(tmp_path, tiny_checkpoint, sample_ct, capsys):
    # Only ts_example_ct and ts_example_ct_sm (one subject) label the adrenal glands and the liver in train.
    assert (
        adapt(
            run_args(
                tiny_checkpoint,
                TOTALSEG_LIST,
                tmp_path / "x",
                tmp_path,
                "--organ",
                "liver",
                "adrenal_gland_left",
                "--shots",
                "5",
            )
        )
        == 2
    )
    assert "K=5 shots asked for, but only" in capsys.readouterr().err
