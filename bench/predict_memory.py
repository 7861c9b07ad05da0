"""Host memory of fsseg-predict on a full-size CT: a synthetic 512x512x400 scan at 0.78x0.78x1.25 mm.

Each configuration runs ``fsseg-predict`` in a fresh process, so that its peak resident memory (ru_maxrss) is
its own: every structure of the fseft29 template (29), and one structure, for each network. The growth per
extra structure is (peak with 29 - peak with 1) / 28. Targets (CPU): peak <= 6 GB with 29 structures, growth
< 100 MB per structure.

    python bench/predict_memory.py [--models unet_tiny swinunetr] [--overlap 0.5] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from results_file import write_result

REPO = Path(__file__).resolve().parents[1]
SHAPE, SPACING = (512, 512, 400), (0.78, 0.78, 1.25)
QUESTION = (
    "How much host memory does fsseg-predict take on a full-size CT (synthetic 512x512x400 at "
    "0.78x0.78x1.25 mm), with all 29 fseft29 structures and with one? Each run in its own process, random "
    "weights. Targets (CPU): peak <= 6 GB with 29 structures, < 100 MB per extra structure."
)
COMMAND = "python bench/predict_memory.py [--models unet_tiny swinunetr] [--overlap 0.5]"
COLUMNS = {
    "model": "model",
    "structures": "structures",
    "overlap": "overlap",
    "peak_rss_gb": "peak GB",
    "growth_mb_per_structure": "MB per extra structure",
    "seconds": "seconds",
}
# Runs fsseg-predict and reports the process's own peak memory.
CHILD = """
import json, resource, sys, time
from fsseg.cli.predict import main
began = time.perf_counter()
code = main(sys.argv[1:])
print(json.dumps({"exit": code, "seconds": time.perf_counter() - began,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}))
"""


def synthetic_ct(path: Path, shape: tuple[int, int, int] = SHAPE) -> Path:
    """An abdomen-like int16 volume at SPACING: air, an elliptic body of soft tissue, a brighter organ and bone."""
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    organ = ((x + 0.3) / 0.35) ** 2 + ((y - 0.1) / 0.3) ** 2 < 1
    spine = (x**2 + (y + 0.45) ** 2) < 0.01
    axial = np.full(shape[:2], -1000, np.int16)
    axial[body], axial[organ], axial[spine] = 40, 120, 700
    volume = np.repeat(axial[:, :, None], shape[2], axis=2)
    volume[..., : shape[2] // 10] = -1000  # air below the body, as in a scan's first slices
    affine = np.diag([*SPACING, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    return path


def checkpoint(path: Path, model_name: str, template_name: str = "fseft29", head_scale: float = 1.0) -> Path:
    """Random weights for ``template_name``; ``head_scale`` multiplies the head's weights: a decisive head puts
    most voxels far from the threshold, as trained weights do, where the initial one leaves them near it."""
    from fsseg.checkpoint import save_checkpoint
    from fsseg.models import create_model
    from fsseg.preprocessing import Preprocessing
    from fsseg.templates import load_template

    template = load_template(template_name)
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=len(template))
    with torch.no_grad():
        model.head.weight.mul_(head_scale)
    return save_checkpoint(
        path,
        {
            "arch": model.arch,
            "template": template.to_dict(),
            "preprocessing": Preprocessing().to_dict(),
            "state_dict": model.state_dict(),
        },
    )


def run_predict(
    scan: Path, ckpt: Path, out: Path, overlap: float, organs: list[str] | None, extra: tuple[str, ...] = ()
) -> dict:
    args = [
        "-i",
        str(scan),
        "-o",
        str(out),
        "-m",
        str(ckpt),
        "--overlap",
        str(overlap),
        "--no-progress",
        "--quiet",
        *extra,
    ]
    if organs:
        args += ["--organs", *organs]
    result = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"fsseg-predict failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["unet_tiny", "swinunetr"])
    parser.add_argument(
        "--overlap", type=float, default=0.5, help="sliding-window overlap (memory does not depend on it; time does)"
    )
    parser.add_argument("--work", help="keep the synthetic scan and checkpoints here (default: a temporary folder)")
    parser.add_argument(
        "--out",
        default=str(REPO / "bench" / "results" / "predict_memory.json"),
        help="JSON to write; the results of models measured earlier in it are kept",
    )
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="fsseg-predict-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    scan = work / "ct_512x512x400.nii.gz"
    if not scan.exists():
        synthetic_ct(scan)
    results = []
    for model in args.models:
        ckpt = checkpoint(work / f"{model}.pt", model)
        for organs in (None, ["liver"]):
            measured = run_predict(scan, ckpt, work / f"pred_{model}_{len(organs or [0] * 29)}", args.overlap, organs)
            results.append(
                {"model": model, "structures": 29 if organs is None else 1, "overlap": args.overlap, **measured}
            )
            print(
                f"{model:<10} {results[-1]['structures']:>2} structures: peak {measured['peak_rss_gb']:.2f} GB, "
                f"{measured['seconds']:.0f} s",
                flush=True,
            )
    for model in args.models:
        rows = [r for r in results if r["model"] == model]
        peaks = {r["structures"]: r["peak_rss_gb"] for r in rows}
        for row in rows:
            row["growth_mb_per_structure"] = round((peaks[29] - peaks[1]) / 28 * 1024, 1)
    print(f"\n{'model':<10} {'structures':>10} {'peak RSS GB':>12} {'seconds':>8} {'MB/structure':>12}")
    for r in results:
        print(
            f"{r['model']:<10} {r['structures']:>10} {r['peak_rss_gb']:>12.2f} {r['seconds']:>8.0f} "
            f"{r['growth_mb_per_structure']:>12}"
        )
    print("targets: < 100 MB per extra structure; peak with 29 structures <= 6 GB")
    # models not measured now keep their earlier rows
    out = write_result(
        "predict_memory",
        results,
        QUESTION,
        COMMAND,
        COLUMNS,
        key=lambda r: (r["model"], r["structures"]),
        out=Path(args.out),
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
