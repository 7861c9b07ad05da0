"""The library functions behind the commands, called the way docs/python-api.md calls them."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, quick_liver_probe, source_lists
from fsseg.errors import DataError


def test_a_folder_of_scans_goes_from_a_list_to_scores_through_the_python_api(
    phantom_dir, tiny_checkpoint, feature_cache, tmp_path
):
    from fsseg.adapt.engine import adapt
    from fsseg.data.check import check_data
    from fsseg.data.make_list import make_list
    from fsseg.export_bundle import export_checkpoint
    from fsseg.inference.predict import FolderOptions, predict_folder
    from fsseg.metrics.evaluate import evaluate_folder

    folder = phantom_dir / "phantom_target"  # images/ and labels/: make_list's "folder" layout
    phantom = json.loads((phantom_dir / "phantom_target.json").read_text())
    ids = ",".join(f"{k}={v}" for k, v in phantom["label_map"].items())
    held_out = [c["id"] for c in phantom["cases"] if c["split"] == "test"]
    listed = make_list("folder", folder, tmp_path / "mine.json", label_map=ids, test_ids=held_out)
    assert [c.id for c in listed.split("test")] == held_out and len(listed.split("train")) == 3
    with pytest.raises(DataError, match="exists"):  # never replaced without force
        make_list("folder", folder, tmp_path / "mine.json", label_map=ids, test_ids=held_out)
    (report,) = check_data([tmp_path / "mine.json"], progress=False)
    assert report.failed == 0 and len(report.cases) == 5

    config = quick_liver_probe(tiny_checkpoint, tmp_path / "mine.json", tmp_path, feature_cache)
    summary = adapt(config, tmp_path / "run", device="cpu", progress=False)
    mean, std = summary["table"]["liver"]["lp"][1]
    assert 0.0 <= mean <= 1.0 and std == 0.0  # one seed
    adapter = tmp_path / "run" / "adapters" / "liver_lp_k1_s0.safetensors"

    options = FolderOptions(progress=False)
    cases = predict_folder(folder / "images", tmp_path / "masks", tiny_checkpoint, [adapter], options=options)
    assert sorted(cases) == sorted(c.id for c in listed.cases) and {c["status"] for c in cases.values()} == {"ok"}
    scores = evaluate_folder(tmp_path / "masks", tmp_path / "report", data_list=tmp_path / "mine.json", plot=False)
    assert scores["failed_cases"] == [] and "liver" in scores["structures"]
    bundle = export_checkpoint(tiny_checkpoint, tmp_path / "bundle", [adapter])
    assert (bundle / "configs" / "inference.json").is_file()


def test_phantoms_and_a_pretraining_run_through_the_python_api(phantom_dir, tmp_path):
    from fsseg.config import load_config
    from fsseg.data.phantom import write_phantoms
    from fsseg.pretrain.config import PretrainConfig
    from fsseg.pretrain.engine import pretrain

    lists = write_phantoms(tmp_path / "phantoms", seed=1, sizes=(1, 1, 1), spacing=(4.0, 4.0, 4.0), progress=False)
    assert [p.name for p in lists] == [f"phantom_source_{s}.json" for s in "abc"] + ["phantom_target.json"]
    settings = ["preprocessing.spacing=[4.0, 4.0, 4.0]", "preprocessing.roi=[32, 32, 32]", "optim.epochs=1"]
    settings += [f"data.lists={json.dumps(source_lists(phantom_dir))}", "optim.batch_size=1", "optim.warmup_epochs=0"]
    config = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "tiny.yaml", settings)
    summary = pretrain(config, tmp_path / "pretrain", device="cpu", progress=False)
    assert len(summary["loss_history"]) == 1 and (tmp_path / "pretrain" / "model.pt").is_file()
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "config.yaml").write_text("lr: 1\n")  # the user's own file in that folder
    with pytest.raises(DataError, match="config.yaml"):
        pretrain(config, tmp_path / "theirs", device="cpu", progress=False)


def test_a_list_without_test_cases_trains_and_saves_the_adapters_and_scores_nothing(
    phantom_dir, tiny_checkpoint, feature_cache, tmp_path
):
    from dataclasses import replace

    from fsseg.adapt.engine import adapt
    from fsseg.adapters.artifact import read_adapter_file

    listing = json.loads((phantom_dir / "phantom_target.json").read_text())
    listing["root"] = str(phantom_dir / listing["root"])
    listing["cases"] = [c for c in listing["cases"] if c["split"] == "train"]  # all labelled, none held out
    (tmp_path / "labelled.json").write_text(json.dumps(listing))
    config = quick_liver_probe(tiny_checkpoint, tmp_path / "labelled.json", tmp_path, feature_cache)
    summary = adapt(replace(config, shots=[3]), tmp_path / "run", device="cpu", progress=False)
    assert summary["table"] == {} and summary["rows"] == 0
    assert read_adapter_file(tmp_path / "run" / "adapters" / "liver_lp_k3_s0.safetensors")["support"]
    assert "No test case was scored" in (tmp_path / "run" / "summary.txt").read_text()
    with pytest.raises(DataError, match="the transductive step adapts on them"):
        adapt(replace(config, ti=replace(config.ti, enabled=True)), tmp_path / "ti", device="cpu", progress=False)
