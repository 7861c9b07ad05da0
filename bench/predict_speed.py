"""Prediction speed: fsseg-predict end to end vs the bare sliding window, vs the reference code's recipe.

On a real-size scan (a phantom at 0.8x0.8x2.5 mm) and the real CT of the sample data (lidc_0001_abd_1p4mm):

* ``network``: MONAI's sliding window alone on the already preprocessed volume (the floor);
* ``fsseg-predict``: the whole command for that scan: reading, preprocessing, sliding window, probabilities
  mapped back to the input grid, writing (target: at most 1.15x the floor);
* ``reference``: the FSEFT recipe: sliding window with roi 96, overlap 0.25, sw_batch 1, logits of every
  template channel kept; its masks are compared with fsseg's.

All passes use the reference's overlap 0.25 so that the masks can be compared.
* variants of the network pass: bf16 autocast, channels_last_3d.

Peak memory (RSS) of each is reported. Prints a table, writes JSON.

    python bench/predict_speed.py [--model swinunetr]
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from results_file import write_result

from fsseg.checkpoint import save_checkpoint
from fsseg.cli.predict import main as predict
from fsseg.data import phantom
from fsseg.data.io import save_nifti
from fsseg.data.transforms import IMAGE
from fsseg.inference import InferenceSettings, Predictor
from fsseg.models import create_model
from fsseg.preprocessing import Preprocessing
from fsseg.templates import load_template

REPO = Path(__file__).resolve().parents[1]
OVERLAP = 0.25
QUESTION = (
    "How much does fsseg-predict add to the bare sliding window, and how does it compare with the reference "
    "code's recipe? Random weights, overlap 0.25; masks compared with the reference's. Target: fsseg-predict "
    "<= 1.15 x the network's time."
)
COMMAND = "python bench/predict_speed.py [--model swinunetr]"
COLUMNS = {
    "scan": "scan",
    "model": "model",
    "network_s": "network s",
    "fsseg_predict_s": "fsseg-predict s",
    "predict_over_network": "ratio",
    "reference_recipe_s": "reference s",
    "reference_mask_agreement": "mask agreement",
    "bf16_s": "bf16 s",
    "peak_rss_gb": "peak GB",
}
REAL_CT = REPO / "sample_data" / "ct" / "images" / "lidc_0001_abd_1p4mm.nii.gz"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def timed(fn):
    began = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench/results/predict_speed.json"))
    parser.add_argument("--model", default="swinunetr", help="registered model (default swinunetr, 62M)")
    parser.add_argument("--organs", nargs="+", default=["liver", "spleen"])
    args = parser.parse_args()
    template = load_template()
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=len(template)).eval()
    pre = Preprocessing()
    channels = [template.channel(o) for o in args.organs]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = save_checkpoint(
            work / "model.pt",
            {
                "arch": model.arch,
                "template": template.to_dict(),
                "preprocessing": pre.to_dict(),
                "state_dict": model.state_dict(),
            },
        )
        image, _, affine = phantom.generate_volume(np.random.default_rng(0), (0.8, 0.8, 2.5))
        scans = {"phantom_0.8x0.8x2.5": save_nifti(image, affine, work / "scans" / "phantom.nii.gz")}
        scans["lidc_0001_abd_1p4mm"] = REAL_CT
        for name, scan in scans.items():
            single = work / f"in_{name}"
            single.mkdir()
            (single / scan.name).symlink_to(scan)
            predictor = Predictor(
                lambda x: model(x)[:, channels],
                args.organs,
                pre,
                torch.device("cpu"),
                InferenceSettings(overlap=OVERLAP),
            )
            data = predictor.preprocess(scan)
            volume = data[IMAGE].as_tensor()[None]

            def window_pass(network, overlap=OVERLAP, cast=contextlib.nullcontext):
                with torch.no_grad(), cast():
                    return sliding_window_inference(volume, pre.roi, 1, network, overlap=overlap, mode="gaussian")

            logits, network_s = timed(lambda: window_pass(lambda x: model(x)[:, channels]))
            _, command_s = timed(
                lambda: predict(
                    [
                        "-i",
                        str(single),
                        "-o",
                        str(work / f"out_{name}"),
                        "-m",
                        str(checkpoint),
                        "--organs",
                        *args.organs,
                        "--no-progress",
                        "--overlap",
                        str(OVERLAP),
                        "--quiet",
                    ]
                )
            )
            reference, reference_s = timed(lambda: window_pass(model))
            ours = (torch.sigmoid(logits[0]) > 0.5).numpy()
            theirs = (torch.sigmoid(reference[0, channels]) > 0.5).numpy()
            bf16, bf16_s = timed(
                lambda: window_pass(
                    lambda x: model(x)[:, channels], cast=lambda: torch.autocast("cpu", dtype=torch.bfloat16)
                )
            )
            agree_bf16 = float(((torch.sigmoid(bf16[0].float()) > 0.5).numpy() == ours).mean())
            model_cl = model.to(memory_format=torch.channels_last_3d)
            _, channels_last_s = timed(
                lambda: window_pass(lambda x: model_cl(x.contiguous(memory_format=torch.channels_last_3d))[:, channels])
            )
            model.to(memory_format=torch.contiguous_format)
            rows.append(
                {
                    "scan": name,
                    "model": args.model,
                    "model_grid": list(volume.shape[2:]),
                    "network_s": round(network_s, 1),
                    "fsseg_predict_s": round(command_s, 1),
                    "predict_over_network": round(command_s / network_s, 3),
                    "reference_recipe_s": round(reference_s, 1),
                    "reference_over_network": round(reference_s / network_s, 3),
                    "reference_mask_agreement": float((ours == theirs).mean()),
                    "bf16_s": round(bf16_s, 1),
                    "bf16_mask_agreement": agree_bf16,
                    "channels_last_3d_s": round(channels_last_s, 1),
                    "peak_rss_gb": round(peak_rss_gb(), 2),
                }
            )
            print(rows[-1], flush=True)
    print(
        f"{'scan':<22} {'network s':>9} {'predict s':>9} {'ratio':>6} {'reference s':>11} {'bf16 s':>7} "
        f"{'chlast s':>8} {'peak GB':>7}"
    )
    for r in rows:
        print(
            f"{r['scan']:<22} {r['network_s']:>9} {r['fsseg_predict_s']:>9} {r['predict_over_network']:>6} "
            f"{r['reference_recipe_s']:>11} {r['bf16_s']:>7} {r['channels_last_3d_s']:>8} {r['peak_rss_gb']:>7}"
        )
    out = write_result(
        "predict_speed", rows, QUESTION, COMMAND, COLUMNS, key=lambda r: (r["scan"], r["model"]), out=Path(args.out)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
