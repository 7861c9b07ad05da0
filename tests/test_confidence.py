"""The confidence of each predicted structure: its factors, and what fsseg-adapt and fsseg-predict record of it."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import quick_liver_probe
from fsseg.inference.confidence import confidence_of, structure_uncertainty


def cube(size: int = 24, low: int = 8, high: int = 16, inside: float = 1.0) -> torch.Tensor:
    probability = torch.zeros(size, size, size)
    probability[low:high, low:high, low:high] = inside
    return probability


def test_a_sharp_single_piece_of_the_expected_size_is_fully_trusted():
    uncertainty = structure_uncertainty(cube())
    assert (uncertainty.components, uncertainty.largest_share) == (1, 1.0)
    assert uncertainty.entropy_inside == pytest.approx(0.0, abs=1e-3)
    assert confidence_of(uncertainty, 8.0, 8.0).confidence == pytest.approx(1.0, abs=1e-3)
    assert confidence_of(uncertainty, 8.0, None).size == 1.0  # no prior known: size says nothing


def test_a_blurred_border_a_stray_island_and_a_wrong_size_each_lower_the_confidence():
    sharp = confidence_of(structure_uncertainty(cube()), 8.0, 8.0).confidence
    blurred = cube()
    blurred[7:17, 7:17, 7:17] = torch.where(blurred[7:17, 7:17, 7:17] > 0, 0.7, 0.3)
    unsure = confidence_of(structure_uncertainty(blurred), 8.0, 8.0)
    assert unsure.sharpness < 0.2 and unsure.confidence < sharp
    islands = cube()
    islands[1:3, 1:3, 1:3] = 1.0
    scattered = confidence_of(structure_uncertainty(islands), 8.0, 8.0)
    assert scattered.components == 2 and scattered.coherence == pytest.approx(512 / 520)
    assert confidence_of(structure_uncertainty(cube()), 16.0, 8.0).size == 0.5  # twice the supports' size
    assert confidence_of(structure_uncertainty(torch.zeros(8, 8, 8)), 0.0, 8.0).confidence == 0.0  # nothing found


def test_adapters_carry_the_supports_size_prior_and_predictions_their_confidence_and_review_flag(
    phantom_dir, tiny_checkpoint, feature_cache, tmp_path
):
    from fsseg.adapt.engine import adapt
    from fsseg.adapters.artifact import read_adapter_file
    from fsseg.inference.predict import FolderOptions, predict_folder

    config = quick_liver_probe(tiny_checkpoint, phantom_dir / "phantom_target.json", tmp_path, feature_cache)
    adapt(config, tmp_path / "run", device="cpu", progress=False)
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    assert rows and all(0.0 <= row["confidence"] <= 1.0 for row in rows)
    adapter = tmp_path / "run" / "adapters" / "liver_lp_k1_s0.safetensors"
    prior = read_adapter_file(adapter)["size_prior_ml"]["liver"]
    assert prior > 0

    options = FolderOptions(progress=False, flag_below=1.0)  # nothing reaches 1: every case is flagged
    cases = predict_folder(
        phantom_dir / "phantom_target.json", tmp_path / "masks", tiny_checkpoint, [adapter], options=options
    )
    for entry in cases.values():
        liver = entry["confidence"]["liver"]
        assert liver["prior_ml"] == prior and liver["volume_ml"] == entry["volume_ml"]["liver"]
        assert entry["review"] == ["liver"]
    record = json.loads((tmp_path / "masks" / "predictions.json").read_text())
    assert record["size_prior_ml"] == {"liver": prior} and record["cases"].keys() == cases.keys()


def test_a_sparse_mask_over_a_large_box_is_read_whole_rather_than_missed():
    probability = torch.zeros(130, 130, 130)
    probability[1::64, 1::64, 1::64] = 0.9  # 27 single voxels at odd positions: the half-resolution grid misses all
    uncertainty = structure_uncertainty(probability)
    assert uncertainty.components == 27 and uncertainty.largest_share == pytest.approx(1 / 27)
