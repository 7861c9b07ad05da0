"""What fsseg-predict costs against the number of structures and the size of the scan, and whether the direct
label map (fsseg.inference.native_grid) gives the masks that resampling each structure gave.

Three kinds of rows, one JSON:
- ``predict``: fsseg-predict (or its steps, see below), each run in a fresh process (time, peak resident
  memory), on the synthetic 512x512x400 CT (0.78x0.78x1.25 mm) with 1, 8, 29 and all 117 structures of the
  totalseg117 template (``--kinds structures``), and with one and 117 structures on scans from 256x256x200 to
  512x512x600 (``--kinds size``);
- ``precision``: one structure in float32 and under bfloat16 autocast on the CPU (``--cpu-bf16``): seconds and
  the voxels whose labels agree;
- ``agreement``: in one process, the same model-space probabilities returned to the scan's grid both ways
  (``Predictor.resample_each``, one ``Invertd`` per structure, and ``Predictor.finish``): seconds of each, the
  voxels that agree and the smallest per-structure Dice over structures of more than 1,000 voxels.

What the masks look like decides the cost of the direct label map, which interpolates only at the structures'
borders. ``--weights organs`` (the default): the network runs with random weights as fsseg-predict runs it, in
this script's own process, and its probabilities are then replaced by organ-like ones (compact ellipsoids with
smooth borders in the body), as a trained network's look; the making of them is not timed. ``initial`` and
``decisive`` run fsseg-predict itself with random weights, as initialised (noise near the threshold) or with the
head x20 (overlapping masks of half the body each): borders everywhere, the direct label map's worst cases.

    python bench/predict_scaling.py [--models unet_tiny swinunetr] [--weights organs initial decisive]
        [--kinds structures size agreement precision]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from predict_memory import checkpoint, run_predict, synthetic_ct
from results_file import REPO, write_result

TEMPLATE, ALL = "totalseg117", 117
STRUCTURES = (1, 8, 29, ALL)
HEAD_SCALES = {"organs": 1.0, "decisive": 20.0, "initial": 1.0}
SIZES = ((256, 256, 200), (512, 512, 400), (512, 512, 600))
FULL = (512, 512, 400)
QUESTION = (
    "What does fsseg-predict cost with 1 to 117 structures (totalseg117) and on scans from 256x256x200 to "
    "512x512x600 (synthetic CT at 0.78x0.78x1.25 mm, random weights with organ-like or raw masks, each "
    "run in its own process), and "
    "does the direct label map give the masks of resampling each structure? Goals (2 CPU cores): at most "
    "1 s more per extra structure, 117 structures within 1.3x the time of one, peak memory <= 6 GB."
)
COMMAND = (
    "python bench/predict_scaling.py [--models unet_tiny swinunetr] [--weights organs initial decisive] "
    "[--kinds structures size agreement precision]"
)
COLUMNS = {
    "kind": "kind",
    "model": "model",
    "weights": "weights",
    "shape": "scan",
    "structures": "structures",
    "seconds": "seconds",
    "peak_rss_gb": "peak GB",
    "per_structure_s": "s per extra structure",
    "ratio_to_one": "x one structure",
    "old_seconds": "resampling each (s)",
    "bf16_seconds": "bfloat16 (s)",
    "agree_percent": "voxels agreeing %",
    "min_dice": "min Dice",
}


def shape_name(shape: tuple[int, int, int]) -> str:
    return "x".join(map(str, shape))


def scan_of(work: Path, shape: tuple[int, int, int]) -> Path:
    path = work / f"ct_{shape_name(shape)}.nii"  # uncompressed: the benchmark times prediction, not gzip
    return path if path.exists() else synthetic_ct(path, shape)


def predicted(scan: Path, ckpt: Path, out: Path, count: int, overlap: float, extra: tuple[str, ...] = ()) -> dict:
    from fsseg.templates import load_template

    names = load_template(TEMPLATE).structures
    measured = run_predict(scan, ckpt, out, overlap, None if count == ALL else names[:count], extra)
    print(
        f"  {scan.name} {count:>3} structures: {measured['seconds']:.1f} s, peak {measured['peak_rss_gb']:.2f} GB",
        flush=True,
    )
    return measured


def with_growth(rows: list[dict]) -> list[dict]:
    """Each row with the growth per extra structure and the ratio to one structure of its model and scan."""
    for row in rows:
        same = ("model", "weights", "shape")
        one = next(r for r in rows if r["structures"] == 1 and all(r[k] == row[k] for k in same))
        if row["structures"] > 1:
            row["per_structure_s"] = round((row["seconds"] - one["seconds"]) / (row["structures"] - 1), 3)
            row["ratio_to_one"] = round(row["seconds"] / one["seconds"], 3)
    return rows


def organ_probabilities(probabilities: torch.Tensor, image: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``probabilities`` (K, *grid) overwritten with K organ-like structures: ellipsoids of 6 to 40 voxels' radius
    centred in the body (``image`` above the window's low bound), probability sigmoid(8 (1 - r)), so that each
    is a compact mask with a smooth border, as a trained network's are."""
    rng = np.random.default_rng(seed)
    body = np.argwhere(image[0].numpy()[::4, ::4, ::4] > 0.05) * 4
    grid = np.asarray(probabilities.shape[1:])
    probabilities.zero_()
    for k in range(probabilities.shape[0]):
        centre, radii = body[rng.integers(len(body))], rng.uniform(6, 40, 3)
        lo, hi = np.maximum(centre - 2 * radii, 0).astype(int), np.minimum(centre + 2 * radii, grid).astype(int)
        axes = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
        r = np.sqrt(sum(((a - c) / s) ** 2 for a, c, s in zip(axes, centre, radii)))
        probabilities[k][lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = torch.sigmoid(torch.from_numpy(8 * (1 - r)))
    return probabilities


def model_space(scan: Path, ckpt: Path, count: int, overlap: float, weights: str):
    """The predictor of the first ``count`` structures, the preprocessed scan, its grid and the network's
    probabilities (made organ-like for ``weights`` "organs"), as fsseg-predict computes them."""
    from fsseg.checkpoint import load_model
    from fsseg.data.scans import load_scan_image
    from fsseg.data.transforms import IMAGE
    from fsseg.inference.predictor import InferenceSettings, Predictor, prediction_network

    model, template, pre, _ = load_model(ckpt)
    model.eval()
    network = prediction_network([model], list(range(count)), adapted=False)  # as fsseg-predict builds it
    predictor = Predictor(
        network, template.structures[:count], pre, torch.device("cpu"), InferenceSettings(overlap=overlap)
    )
    reference, data = load_scan_image(scan), predictor.preprocess(scan)
    probabilities = predictor.model_space_probabilities(data)
    began = time.perf_counter()
    if weights == "organs":
        organ_probabilities(probabilities, data[IMAGE])
    return predictor, data, reference, probabilities, time.perf_counter() - began


def organ_run(scan: Path, ckpt: Path, count: int, overlap: float, out: Path) -> dict:
    """fsseg-predict's steps in this process with organ-like probabilities: seconds (without the making of the
    organs) and peak memory."""
    from fsseg.data.io import save_like

    began = time.perf_counter()
    predictor, data, reference, probabilities, organ_seconds = model_space(scan, ckpt, count, overlap, "organs")
    save_like(predictor.finish(data, probabilities, reference).label, reference, out)
    return {
        "exit": 0,
        "seconds": time.perf_counter() - began - organ_seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }


def organ_predicted(scan: Path, ckpt: Path, out: Path, count: int, overlap: float) -> dict:
    """:func:`organ_run` in a fresh process (its peak memory its own)."""
    command = [sys.executable, __file__, "--organ-run", str(scan), str(ckpt), str(count), str(overlap), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the organ run failed:\n{result.stderr[-2000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    print(
        f"  {scan.name} {count:>3} organ-like structures: {measured['seconds']:.1f} s, peak "
        f"{measured['peak_rss_gb']:.2f} GB",
        flush=True,
    )
    return measured


def agreement(scan: Path, ckpt: Path, count: int, overlap: float, weights: str) -> dict:
    """Old and new return to the scan's grid of one model-space prediction of the first ``count`` structures."""
    predictor, data, reference, probabilities, _ = model_space(scan, ckpt, count, overlap, weights)
    began = time.perf_counter()
    new = predictor.finish(data, probabilities, reference).label
    new_seconds = time.perf_counter() - began
    began = time.perf_counter()
    old = predictor.resample_each(data, probabilities, reference).label
    old_seconds = time.perf_counter() - began
    dice = []
    for k in range(1, count + 1):
        a, b = old == k, new == k
        if a.sum() > 1000:
            dice.append(2 * float((a & b).sum()) / float(a.sum() + b.sum()))
    row = {
        "seconds": round(new_seconds, 2),
        "old_seconds": round(old_seconds, 2),
        "agree_percent": round(100 * float((old == new).mean()), 5),
        "min_dice": round(min(dice), 6) if dice else None,
        "compared": len(dice),
    }
    print(f"  agreement on {count} structures: {row}", flush=True)
    return row


def precision(work: Path, ckpt: Path, count: int, overlap: float) -> dict:
    """fsseg-predict in float32 and under bfloat16 autocast on the CPU: seconds of each and the voxels whose
    labels agree."""
    import nibabel as nib

    scan = scan_of(work, FULL)
    runs = {
        flag: predicted(scan, ckpt, work / f"pred_{flag}", count, overlap, (f"--{flag}",))
        for flag in ("no-cpu-bf16", "cpu-bf16")
    }
    masks = [np.asanyarray(nib.load(str(work / f"pred_{flag}" / f"{scan.stem}.nii.gz")).dataobj) for flag in runs]
    return {
        "seconds": runs["no-cpu-bf16"]["seconds"],
        "bf16_seconds": runs["cpu-bf16"]["seconds"],
        "speedup": round(runs["no-cpu-bf16"]["seconds"] / runs["cpu-bf16"]["seconds"], 3),
        "agree_percent": round(100 * float((masks[0] == masks[1]).mean()), 5),
        "peak_rss_gb": runs["no-cpu-bf16"]["peak_rss_gb"],
    }


def plot(rows: list[dict], path: Path) -> Path:
    """Seconds and peak memory against structures (the 512x512x400 scan) and against voxels (one and 117
    structures), a line per model and weights."""
    from fsseg.viz import pyplot

    plt = pyplot()
    runs = [r for r in rows if r["kind"] == "predict"]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for model, weights in sorted({(r["model"], r.get("weights", "initial")) for r in runs}):
        mine = [r for r in runs if (r["model"], r.get("weights", "initial")) == (model, weights)]
        full = sorted((r for r in mine if r["shape"] == shape_name(FULL)), key=lambda r: r["structures"])
        for axis, key in zip(axes[:2], ("seconds", "peak_rss_gb")):
            axis.plot([r["structures"] for r in full], [r[key] for r in full], "o-", label=f"{model}, {weights}")
        for count, style in ((1, "o--"), (ALL, "s-")):
            sized = sorted((r for r in mine if r["structures"] == count), key=lambda r: np.prod(parse(r["shape"])))
            if len(sized) < 2:  # measured on one scan size only
                continue
            axes[2].plot(
                [np.prod(parse(r["shape"])) / 1e6 for r in sized],
                [r["seconds"] for r in sized],
                style,
                label=f"{model}, {weights}, {count} structure{'s' if count > 1 else ''}",
            )
    titles = ("seconds, 512x512x400", "peak memory (GB), 512x512x400", "seconds against scan size")
    for axis, title, xlabel in zip(axes, titles, ("structures", "structures", "million voxels")):
        axis.set_title(title, fontsize=10)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def parse(shape: str) -> tuple[int, ...]:
    return tuple(int(n) for n in shape.split("x"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["unet_tiny", "swinunetr"])
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["structures", "size", "agreement", "precision"],
        choices=["structures", "size", "agreement", "precision"],
    )
    parser.add_argument(
        "--structures",
        nargs="+",
        type=int,
        default=list(STRUCTURES),
        help="structure counts of --kinds structures (default 1 8 29 117)",
    )
    parser.add_argument(
        "--agreement-structures",
        type=int,
        default=29,
        help="structures compared old against new (resampling each takes seconds per structure)",
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        default=["organs"],
        choices=list(HEAD_SCALES),
        help="organs: the network runs with random weights, and its probabilities are replaced by "
        "organ-like ones (compact ellipsoids with smooth borders) before the return to the scan's "
        "grid, as a trained network's would look; initial: random weights as initialised, masks of "
        "noise near the threshold; decisive: the head x20, overlapping half-volume masks. The last "
        "two are the direct label map's worst cases: borders everywhere",
    )
    parser.add_argument(
        "--organ-run", nargs=5, metavar=("SCAN", "CKPT", "COUNT", "OVERLAP", "OUT"), help=argparse.SUPPRESS
    )  # one organ-like run, in the child process
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (default 0.25)")
    parser.add_argument("--work", help="keep scans and checkpoints here (default: a temporary folder)")
    args = parser.parse_args()
    if args.organ_run:
        scan, ckpt, count, overlap, out = args.organ_run
        print(json.dumps(organ_run(Path(scan), Path(ckpt), int(count), float(overlap), Path(out))))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="fsseg-predict-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for model, weights in ((m, w) for m in args.models for w in args.weights):
        ckpt = checkpoint(work / f"{model}_{weights}_{TEMPLATE}.pt", model, TEMPLATE, HEAD_SCALES[weights])
        common = {"model": model, "weights": weights, "overlap": args.overlap}
        runs = set()
        if "structures" in args.kinds:
            runs |= {(FULL, count) for count in args.structures}
        if "size" in args.kinds:
            runs |= {(shape, count) for shape in SIZES for count in (1, ALL)}
        for shape, count in sorted(runs):
            if weights == "organs":
                measured = organ_predicted(scan_of(work, shape), ckpt, work / "organs.nii.gz", count, args.overlap)
            else:
                measured = predicted(scan_of(work, shape), ckpt, work / "pred", count, args.overlap)
            rows.append({"kind": "predict", **common, "shape": shape_name(shape), "structures": count, **measured})
        if "agreement" in args.kinds:
            compared = agreement(scan_of(work, FULL), ckpt, args.agreement_structures, args.overlap, weights)
            rows.append(
                {
                    "kind": "agreement",
                    **common,
                    "shape": shape_name(FULL),
                    "structures": args.agreement_structures,
                    **compared,
                }
            )
        if "precision" in args.kinds and weights != "organs":
            rows.append(
                {
                    "kind": "precision",
                    **common,
                    "shape": shape_name(FULL),
                    "structures": 1,
                    **precision(work, ckpt, 1, args.overlap),
                }
            )
    with_growth([r for r in rows if r["kind"] == "predict"])
    out = write_result(
        "predict_scaling",
        rows,
        QUESTION,
        COMMAND,
        COLUMNS,
        key=lambda r: (r["kind"], r["model"], r.get("weights", "initial"), r["shape"], r["structures"]),
    )
    print(f"wrote {out}")
    print(f"wrote {plot(json.loads(out.read_text())['rows'], REPO / 'docs' / 'predict_scaling.png')}")


if __name__ == "__main__":
    main()
