"""Adaptation speed: the reference code's loop vs fsseg's frozen-feature cache, for `lp` and `adapter`.

SwinUNETR-48 (random weights: speed does not depend on them), K = 5 phantom supports at real size (1.5 mm,
about 250x190x150 voxels after the foreground crop) and two test scans. Both loops take the same optimiser
steps on the same supports:

* reference-style: every step runs the frozen backbone on each 96^3 image crop (as FSEFT does);
* fsseg: features computed once per scan by sliding window (float16 on disk), steps on crops of them.

The reference-style loop is timed on ``--epochs`` epochs and extrapolated to ``--extrapolate`` epochs (FSEFT
trains up to 200 with early stopping; its LP was still improving at epoch 43); the output says so. Dice of
both after the measured steps is reported (they should agree within 0.01). Prints a table, writes JSON.

    python bench/adapt_speed.py --out bench/results/adapt_speed.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adapt.config import AdaptConfig, load_method_settings
from adapt.engine import Adaptation, predict_query, train
from fsseg.adapters import adapt_model
from fsseg.checkpoint import save_checkpoint
from fsseg.data import phantom
from fsseg.data.transforms import Preprocessing
from fsseg.metrics import score_structure
from fsseg.models import create_model
from fsseg.templates import load_template

REPO = Path(__file__).resolve().parents[1]


def make_inputs(work: Path, model: str, spacing: float, shots: int, tests: int) -> tuple[Path, Path]:
    dataset = phantom.PhantomDataset("bench_target", {str(i + 1): n for i, n in enumerate(phantom.STRUCTURES)},
                                     train=shots, test=tests)
    data_list = phantom.write_dataset(work, dataset, seed=0, spacing=(spacing,) * 3, progress=False)
    template = load_template()
    torch.manual_seed(0)
    network = create_model(model, num_classes=len(template))
    pre = Preprocessing() if model.startswith("swin") else Preprocessing(spacing=(3.0,) * 3, roi=(48,) * 3)
    checkpoint = save_checkpoint(work / "model.pt", {"arch": network.arch, "template": template.to_dict(),
                                 "preprocessing": pre.to_dict(), "state_dict": network.state_dict()})
    return data_list, checkpoint


def mean_dice(adapted, run: Adaptation) -> float:
    scores = []
    for case in run.tests:
        query = run.query(case)
        predicted = predict_query(adapted, query, run)
        scores.append(score_structure(predicted["liver"], query.masks["liver"], query.spacing).dice)
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench/results/adapt_speed.json"))
    parser.add_argument("--model", default="swinunetr", help="registered model (default swinunetr, 62M)")
    parser.add_argument("--spacing", type=float, default=1.5, help="phantom voxel size in mm")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--tests", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1, help="epochs actually run by both loops")
    parser.add_argument("--extrapolate", type=int, default=100, help="epochs to extrapolate the timings to")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_list, checkpoint = make_inputs(work, args.model, args.spacing, args.shots, args.tests)
        config = AdaptConfig(checkpoint=str(checkpoint), data_list=str(data_list), organs=["liver"],
                             shots=[args.shots], methods=["lp", "adapter"], seeds=1, overlap=0.25)
        run = Adaptation(config, work / "run", torch.device("cpu"))
        supports = [run.support(case) for case in run.pool[: args.shots]]
        began = time.perf_counter()
        for support in supports:
            run.features(support)
        extraction = time.perf_counter() - began
        shape = tuple(supports[0].image.shape[1:])
        for method in ("lp", "adapter"):
            training = load_method_settings(REPO / "configs" / "adapt", method).training
            training.epochs, training.warmup_epochs = args.epochs, 0
            timings, dice = {}, {}
            for style, cached in (("fsseg", True), ("reference", False)):
                torch.manual_seed(0)
                adapted = adapt_model(run.base, run.template, ["liver"], method)
                began = time.perf_counter()
                train(adapted, supports, run, training, seed=0, epochs=(0, args.epochs), use_feature_cache=cached)
                timings[style] = (time.perf_counter() - began) / args.epochs
                dice[style] = mean_dice(adapted, run)
            steps = args.epochs * len(supports)
            fsseg_total = extraction + timings["fsseg"] * args.extrapolate
            reference_total = timings["reference"] * args.extrapolate
            rows.append({
                "method": method, "model": args.model, "support_shape": shape, "steps_measured": steps,
                "crops_per_step": training.crops_per_volume, "fsseg_crop": list(training.crop_size or run.pre.roi),
                "reference_crop": list(run.pre.roi),
                "feature_extraction_s": round(extraction, 1),
                "fsseg_s_per_epoch": round(timings["fsseg"], 3), "reference_s_per_epoch": round(timings["reference"], 2),
                "extrapolated_epochs": args.extrapolate,
                "fsseg_total_s": round(fsseg_total, 1), "reference_total_s": round(reference_total, 1),
                "speedup": round(reference_total / fsseg_total, 1),
                "dice_fsseg": round(dice["fsseg"], 4), "dice_reference": round(dice["reference"], 4),
            })
            print(rows[-1], flush=True)
    print(f"\nReference-style timings measured over {args.epochs} epoch(s) of {args.shots} steps and extrapolated "
          f"to {args.extrapolate} epochs; fsseg's total includes extracting the support features once.")
    print(f"{'method':<8} {'extract s':>9} {'fsseg s/ep':>10} {'ref s/ep':>9} {'fsseg tot':>10} {'ref tot':>9} "
          f"{'speedup':>8} {'Dice fsseg':>10} {'Dice ref':>9}")
    for r in rows:
        print(f"{r['method']:<8} {r['feature_extraction_s']:>9} {r['fsseg_s_per_epoch']:>10} {r['reference_s_per_epoch']:>9} "
              f"{r['fsseg_total_s']:>10} {r['reference_total_s']:>9} {r['speedup']:>7}x {r['dice_fsseg']:>10} "
              f"{r['dice_reference']:>9}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "adapt_speed", "targets": {"lp": ">= 20x", "adapter": ">= 4x"},
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
