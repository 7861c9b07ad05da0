"""Seconds per pretraining step, split into data wait and compute, with and without the disk cache.

Runs the real training loop (``fsseg.pretrain.engine.run_pretraining``) for a few steps on phantom volumes at real size
(1.5 mm) for the tiny config and for SwinUNETR-48 at 96^3, each three ways: no cache, cold cache (first
epoch fills it) and warm cache (a second run reads it). Target: data wait < 10 % of a step once the cache
is warm. Prints a table and writes JSON.

    python bench/pretrain_step.py [--models tiny swinunetr48] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from results_file import write_result

from fsseg.config import load_config
from fsseg.data import phantom
from fsseg.pretrain.config import PretrainConfig
from fsseg.pretrain.engine import run_pretraining
from fsseg.training.runtime import init_runtime

REPO = Path(__file__).resolve().parents[1]
SETUPS = {
    "tiny": (REPO / "configs/pretrain/tiny.yaml", []),
    "swinunetr48": (
        REPO / "configs/pretrain/swinunetr.yaml",
        ["model.kwargs={feature_size: 48}", "optim.batch_size=1", "augmentation.crops_per_volume=1", "num_workers=0"],
    ),
}

QUESTION = (
    "Does a pretraining step wait for data? Seconds per step split into data wait and compute, on phantoms "
    "at 1.5 mm, without the disk cache, with a cold cache and with a warm one. Target: data wait < 10 % of "
    "a step with a warm cache."
)
COMMAND = "python bench/pretrain_step.py [--models ...] [--steps 3]"
COLUMNS = {
    "model": "model",
    "cache": "cache",
    "steps": "steps",
    "data_wait_s_per_step": "data wait s/step",
    "compute_s_per_step": "compute s/step",
    "data_wait_fraction": "data wait share",
}


def run(name: str, lists: list[str], cache: str, cache_dir: Path, steps: int, work: Path) -> dict:
    config_path, overrides = SETUPS[name]
    batch = load_config(PretrainConfig, config_path, overrides).optim.batch_size
    overrides = overrides + [
        f"data.lists={json.dumps(lists)}",
        "optim.epochs=1",
        "optim.warmup_epochs=0",
        f"sampling.volumes_per_epoch={steps * batch}",
        f"data.cache={'false' if cache == 'off' else 'true'}",
        f"data.cache_dir={json.dumps(str(cache_dir))}",
    ]
    config = load_config(PretrainConfig, config_path, overrides)
    summary = run_pretraining(config, work / f"{name}_{cache}_{time.time_ns()}", init_runtime("cpu"), progress=False)
    per_step = (summary["seconds_data_wait"] + summary["seconds_compute"]) / summary["steps"]
    return {
        "model": name,
        "cache": cache,
        "steps": summary["steps"],
        "data_wait_s_per_step": round(summary["seconds_data_wait"] / summary["steps"], 3),
        "compute_s_per_step": round(summary["seconds_compute"] / summary["steps"], 3),
        "data_wait_fraction": round(summary["seconds_data_wait"] / summary["steps"] / per_step, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench/results/pretrain_step.json"))
    parser.add_argument("--steps", type=int, default=3, help="training steps per measurement")
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lists = [
            str(phantom.write_dataset(work / "data", dataset, seed=0, spacing=(1.5, 1.5, 1.5), progress=False))
            for dataset in phantom.default_datasets(source_cases=2)[:3]
        ]
        for name in args.models:
            cache_dir = work / f"cache_{name}"
            for cache in ("off", "cold", "warm"):
                rows.append(run(name, lists, cache, cache_dir, args.steps, work))
                print(rows[-1], flush=True)
    header = f"{'model':<12} {'cache':<5} {'steps':>5} {'data wait s/step':>17} {'compute s/step':>15} {'wait %':>7}"
    print(header)
    for row in rows:
        print(
            f"{row['model']:<12} {row['cache']:<5} {row['steps']:>5} {row['data_wait_s_per_step']:>17.3f} "
            f"{row['compute_s_per_step']:>15.3f} {100 * row['data_wait_fraction']:>6.1f}%"
        )
    out = write_result(
        "pretrain_step", rows, QUESTION, COMMAND, COLUMNS, key=lambda r: (r["model"], r["cache"]), out=Path(args.out)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
