"""Does the confidence fsseg gives each predicted structure rank the predictions by their Dice?

The demo's real-CT task: the tiny UNet pretrained on subject TS-A with the liver never supervised (``make demo``'s
pretraining, or ``--checkpoint``), adapted to the liver with each method from K = 1 and 2 scans of TS-B and
LIDC-0001 under several seeds, and scored on LITS-117. fsseg-adapt gives every run's prediction of the test scan
its Dice and the confidence fsseg-predict would give it (the same function, the supports' organ-size prior
included). This script computes Spearman's rank correlation between the two over all runs, and within each method,
and writes bench/results/confidence_real.json: a positive correlation means that a lower confidence marks a worse
mask. It is reported as measured, whatever its sign.

    python bench/confidence_real.py --work /tmp/confidence_real [--checkpoint demo_out/pretrain/model.pt]

Everything runs through the installed commands in ``--work``; a rerun keeps the finished runs (fsseg-adapt
``--continue``). On 2 CPU cores the adaptations take about 4 minutes a seed, the pretraining (without
``--checkpoint``) about 6 minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from results_file import REPO, write_result
from scipy.stats import spearmanr

from fsseg.checkpoint import sha256_file

BIN = Path(sys.executable).parent
METHODS = ["lp", "adapter", "affine-ln", "ft-last", "ft"]
QUESTION = (
    "Does the confidence fsseg-predict gives a predicted structure rank the predictions by their Dice? On the "
    "demo's real-CT task (a tiny UNet pretrained on TS-A with the liver never supervised, adapted to the liver "
    "from K = 1 and 2 scans of TS-B and LIDC-0001 with five methods and several seeds, scored on LITS-117), "
    "Spearman's rank correlation between each run's confidence and its Dice: over all runs, and within each "
    "method. Positive: a lower confidence marks a worse mask."
)
COMMAND = "python bench/confidence_real.py --work DIR [--checkpoint demo_out/pretrain/model.pt] [--seeds 3]"
COLUMNS = {
    "methods": "runs of",
    "runs": "runs",
    "spearman": "Spearman ρ",
    "p_value": "p",
    "confidence_range": "confidence min–max",
    "dice_range": "Dice min–max",
    "checkpoint": "checkpoint",
}


def run(*command: str) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def pretrained(work: Path) -> Path:
    """``make demo``'s pretraining in ``work`` (resumed when interrupted)."""
    run(str(BIN / "fsseg-sample-data"), "--out", str(work / "data"))
    lists = work / "data" / "sample_ct_liver_pretrain.json"
    config = "configs/pretrain/demo_ct.yaml"
    run(str(BIN / "fsseg-pretrain"), "--config", config, "--out", str(work / "pretrain"), "--resume", "auto",
        "--no-progress", "--data-list", str(lists))  # fmt: skip
    return work / "pretrain" / "model.pt"


def adapted_rows(work: Path, checkpoint: Path, seeds: int) -> list[dict]:
    """Every (method, K, seed) run's row of fsseg-adapt: Dice and confidence on LITS-117."""
    if not (work / "data").is_dir():
        run(str(BIN / "fsseg-sample-data"), "--out", str(work / "data"))
    out = work / f"adapt_{seeds}seeds"
    run(
        str(BIN / "fsseg-adapt"), "--checkpoint", str(checkpoint),
        "--data-list", str(work / "data" / "sample_ct_liver_fewshot.json"), "--organ", "liver", "--shots", "1", "2",
        "--method", *METHODS, "--seeds", str(seeds), "--out", str(out), "--set", "method_configs=configs/adapt/demo",
        "--set", "pictures=false", "--no-progress", "--continue",
    )  # fmt: skip
    return json.loads((out / "results.json").read_text())["rows"]


def correlation(rows: list[dict], methods: str, checkpoint: str) -> dict:
    """Spearman's rank correlation of confidence and Dice over ``rows``."""
    confidence, dice = [r["confidence"] for r in rows], [r["dice"] for r in rows]
    rho, p = spearmanr(confidence, dice) if len(rows) > 2 else (float("nan"), float("nan"))
    return {
        "methods": methods,
        "runs": len(rows),
        "spearman": round(float(rho), 3),
        "p_value": float(f"{p:.3g}"),
        "confidence_range": f"{min(confidence):.2f}–{max(confidence):.2f}",
        "dice_range": f"{min(dice):.2f}–{max(dice):.2f}",
        "checkpoint": checkpoint,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the data, runs and outputs")
    parser.add_argument("--checkpoint", type=Path, help="the demo's pretrained model.pt (default: pretrain it)")
    parser.add_argument("--seeds", type=int, default=3, help="support draws per K")
    args = parser.parse_args()
    checkpoint = args.checkpoint or pretrained(args.work)
    rows = adapted_rows(args.work, checkpoint.resolve(), args.seeds)
    origin = str(args.checkpoint) if args.checkpoint else "the demo's pretraining"
    made = f"{origin}, sha256 {sha256_file(checkpoint)[:12]}"
    results = [correlation(rows, "all", made)]
    results += [correlation([r for r in rows if r["method"] == m], m, made) for m in METHODS]
    for result in results:
        rho, p, n = result["spearman"], result["p_value"], result["runs"]
        print(f"{result['methods']:>10}: Spearman {rho:+.3f} (p {p}, {n} runs)")
    print(f"wrote {write_result('confidence_real', results, QUESTION, COMMAND, COLUMNS)}")


if __name__ == "__main__":
    main()
