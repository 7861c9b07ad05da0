"""Sliding-window time on the CPU against windows per forward pass (``sw_batch_size``), and fsseg's default.

For a single window whose first layers are small (N x C x D x H <= 20480, e.g. 8 channels at 48^3), torch runs
CPU convolutions through its slow im2col path instead of oneDNN; two windows a pass take the fast path. This
measures what that costs for the demo's UNet (roi 48^3) and SwinUNETR-48 (roi 96^3), with random weights on a
random volume (the time does not depend on the values), and which batch fsseg picks for each.

    python bench/sw_batch_cpu.py [--batches 1 2 4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from monai.inferers import sliding_window_inference
from results_file import write_result

from fsseg.inference import Predictor
from fsseg.models import create_model
from fsseg.preprocessing import Preprocessing

REPO = Path(__file__).resolve().parents[1]
QUESTION = (
    "How long does a sliding window take on the CPU against the windows per forward pass (sw_batch_size), "
    "and which does fsseg pick? Random weights on a random volume, overlap 0.5."
)
COMMAND = "python bench/sw_batch_cpu.py [--batches 1 2 4]"
COLUMNS = {
    "model": "model",
    "roi": "roi",
    "sw_batch_size": "windows a pass",
    "fsseg_default": "fsseg default",
    "seconds": "seconds",
}
# (model, its kwargs, roi, volume): volumes of the demo's phantoms at 3 mm and of a small CT at 1.5 mm.
CASES = [
    ("unet_tiny", {}, (48, 48, 48), (111, 87, 78)),
    ("swinunetr", {"feature_size": 48}, (96, 96, 96), (130, 120, 96)),
]


def seconds(model: torch.nn.Module, volume: torch.Tensor, roi: tuple[int, ...], batch: int) -> float:
    """One warm sliding window (overlap 0.5, gaussian) over ``volume``."""
    with torch.no_grad():
        sliding_window_inference(volume[..., : roi[2]], roi, batch, model, overlap=0.5, mode="gaussian")
        began = time.perf_counter()
        sliding_window_inference(volume, roi, batch, model, overlap=0.5, mode="gaussian")
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4], help="batches to time besides 1")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "sw_batch_cpu.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    for name, kwargs, roi, shape in CASES:
        model = create_model(name, 2, **kwargs).eval()
        default = Predictor(model, ["a"], Preprocessing(roi=roi), torch.device("cpu")).sw_batch_size
        volume = torch.rand(1, 1, *shape)
        for batch in sorted({1, *args.batches}):
            results.append(
                {
                    "model": name,
                    "roi": list(roi),
                    "volume": list(shape),
                    "sw_batch_size": batch,
                    "fsseg_default": batch == default,
                    "seconds": round(seconds(model, volume, roi, batch), 2),
                }
            )
            print(f"{name:<10} roi {roi[0]:>3}^3 sw_batch_size {batch}: {results[-1]['seconds']:7.2f} s", flush=True)

    print(f"\n{'model':<10} {'roi':>5} {'sw_batch_size':>13} {'seconds':>8} {'vs 1':>6}")
    for r in results:
        single = next(s["seconds"] for s in results if s["model"] == r["model"] and s["sw_batch_size"] == 1)
        mark = " (fsseg default)" if r["fsseg_default"] else ""
        print(
            f"{r['model']:<10} {r['roi'][0]:>5} {r['sw_batch_size']:>13} {r['seconds']:>8.2f} "
            f"{single / r['seconds']:>5.2f}x{mark}"
        )
    out = write_result("sw_batch_cpu", results, QUESTION, COMMAND, COLUMNS, out=Path(args.out))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
