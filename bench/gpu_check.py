"""The real path on one GPU, in one run: CUDA detection, fsseg-predict, fsseg-adapt and torchrun pretraining.

1. CUDA detection: what torch sees and what fsseg's ``--device auto`` picks.
2. fsseg-predict with AMP on SwinUNETR-48 (random weights, a decisive head) over a synthetic 512x512x400 CT at
   0.78x0.78x1.25 mm, all 29 structures: time and peak GPU memory; the same command on the CPU, and how far
   the two label maps agree (float16 autocast against float32). Then one structure against all 117 of the
   totalseg117 template (goals: one in <= 3 s end to end, 117 within 1.3x of it).
3. fsseg-adapt with lp, adapter and ft at K=1 on SwinUNETR-48 and phantoms at 1.5 mm (the shipped method
   settings, epochs capped): time and peak GPU memory per method, each in its own process.
4. ``torchrun --nproc_per_node=1`` pretraining of SwinUNETR-48 on phantoms at 1.5 mm with the NCCL group (one
   process joins a group too): killed in its second epoch, resumed with ``--resume auto`` to the end; the
   data-wait share of a step is what the step waited for the loader over the whole step.

Each command runs in a child process that reports its own peak memory. Writes ``bench/results/gpu_check.json`` and
prints a table. ``--smoke`` runs the same steps on the CPU with the tiny UNet and small volumes: it checks the
script and measures nothing. Run it through ``bench/gpu_check.sh`` (about 8 minutes on an H200).

    python bench/gpu_check.py [--work DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from predict_memory import SHAPE, SPACING, synthetic_ct  # noqa: E402
from results_file import write_result  # noqa: E402

from fsseg.checkpoint import read_checkpoint, save_checkpoint  # noqa: E402
from fsseg.data import phantom  # noqa: E402
from fsseg.models import create_model  # noqa: E402
from fsseg.preprocessing import Preprocessing  # noqa: E402
from fsseg.templates import load_template  # noqa: E402
from fsseg.training.runtime import resolve_device  # noqa: E402

QUESTION = (
    "Does the real path work on a GPU, and what does it take? CUDA detection; fsseg-predict with AMP on "
    "SwinUNETR-48 over a 512x512x400 CT (time, peak GPU memory) and its label map against the CPU's; "
    "fsseg-adapt lp, adapter and ft at K = 1; torchrun pretraining through NCCL, killed and resumed."
)
COMMAND = "bash bench/gpu_check.sh [--smoke]"
COLUMNS = {"step": "step", "smoke": "smoke run", "seconds": "seconds", "result": "result"}

# Runs one fsseg command's main() and prints its exit code, time and this process's peak memory.
CHILD = """
import importlib, json, resource, sys, time, torch
began = time.perf_counter()
code = importlib.import_module(sys.argv[1]).main(sys.argv[2:])
print(json.dumps({"exit": code, "seconds": round(time.perf_counter() - began, 2),
                  "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else None,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}))
"""
METHODS = ("lp", "adapter", "ft")
COMPARED = ("liver", "spleen", "stomach")
OVERLAP = 0.25
STEPS = ("predict", "scaling", "adapt", "pretrain", "compare")


class Sizes:
    """What each step runs on: the real sizes, or small ones for ``--smoke``."""

    def __init__(self, smoke: bool) -> None:
        self.smoke = smoke
        self.device = "cpu" if smoke else "cuda"
        self.model = "unet_tiny" if smoke else "swinunetr"
        self.scan = (96, 96, 64) if smoke else SHAPE
        self.preprocessing = Preprocessing(spacing=(4.0,) * 3, roi=(32,) * 3) if smoke else Preprocessing()
        self.phantom_spacing = (4.0,) * 3 if smoke else (1.5,) * 3
        self.adapt_epochs = 2 if smoke else 10
        self.pretrain_cases = 8  # per data set: enough steps that the kill lands inside epoch 2
        self.pretrain_config = REPO / "configs" / "pretrain" / ("tiny.yaml" if smoke else "swinunetr.yaml")


def run_child(module: str, args: list[str], timeout: float) -> dict:
    """One fsseg command in a fresh process; its report, or the reason it failed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        result = subprocess.run(
            [sys.executable, "-c", CHILD, module, *args], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return {"exit": None, "error": f"timed out after {timeout:.0f} s"}
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return {"exit": result.returncode, "error": result.stderr[-1500:]}
    return json.loads(lines[-1])


def detect() -> dict:
    found = {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "fsseg_auto_device": str(resolve_device("auto")),
    }
    if torch.cuda.is_available():
        found.update(
            name=torch.cuda.get_device_name(0),
            bf16=torch.cuda.is_bf16_supported(),
            memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 1024**3, 1),
            nccl=torch.distributed.is_nccl_available(),
            cuda=torch.version.cuda,
        )
    return found


def decisive_checkpoint(path: Path, sizes: Sizes, template_name: str = "fseft29") -> Path:
    """Random weights with the head scaled up, so that most voxels lie far from the threshold and two precisions
    can be compared on masks."""
    template = load_template(template_name)
    torch.manual_seed(0)
    model = create_model(sizes.model, num_classes=len(template))
    with torch.no_grad():
        model.head.weight.mul_(20.0)
    return save_checkpoint(
        path,
        {
            "arch": model.arch,
            "template": template.to_dict(),
            "preprocessing": sizes.preprocessing.to_dict(),
            "state_dict": model.state_dict(),
        },
    )


def agreement(first: Path, second: Path) -> dict:
    import nibabel as nib

    a, b = (np.asanyarray(nib.load(str(p)).dataobj) for p in (first, second))
    dice = {}
    for label in sorted((set(np.unique(a)) | set(np.unique(b))) - {0}):
        x, y = a == label, b == label
        dice[int(label)] = round(float(2 * (x & y).sum() / max(x.sum() + y.sum(), 1)), 4)
    return {
        "voxels_equal": round(float((a == b).mean()), 6),
        "min_structure_dice": min(dice.values()) if dice else None,
        "structures_found": len(dice),
    }


def predict_run(work: Path, name: str, scan: Path, checkpoint: Path, device: str, organs: list[str]) -> dict:
    out = work / f"predict_{name}"
    shutil.rmtree(out, ignore_errors=True)
    return run_child(
        "fsseg.cli.predict",
        [
            "-i",
            str(scan),
            "-o",
            str(out),
            "-m",
            str(checkpoint),
            "--device",
            device,
            "--overlap",
            str(OVERLAP),
            "--no-progress",
            "--quiet",
            *(["--organs", *organs] if organs else []),
        ],
        timeout=300,
    )


def check_predict(work: Path, sizes: Sizes, checkpoint: Path) -> dict:
    """All 29 structures on the GPU: time and peak memory."""
    scan = synthetic_ct(work / "ct.nii.gz", sizes.scan)
    return {
        "scan": {"shape": list(sizes.scan), "spacing_mm": list(SPACING)},
        "overlap": OVERLAP,
        "structures": 29,
        "run": predict_run(work, sizes.device, scan, checkpoint, sizes.device, []),
    }


def check_scaling(work: Path, sizes: Sizes) -> dict:
    """One structure and all 117 of the totalseg117 template on the GPU (an uncompressed scan: the time is the
    prediction's, not gzip's). Goals (issue 47): one structure in <= 3 s end to end, 117 within 1.3x of it."""
    scan = work / "ct.nii"
    if not scan.exists():
        synthetic_ct(scan, sizes.scan)
    checkpoint = decisive_checkpoint(work / "model_totalseg117.pt", sizes, "totalseg117")
    first = load_template("totalseg117").structures[:1]
    runs = {
        str(count): predict_run(
            work, f"scaling_{count}", scan, checkpoint, sizes.device, list(first) if count == 1 else []
        )
        for count in (1, 117)
    }
    result: dict = {"template": "totalseg117", "runs": runs}
    if all(r.get("exit") == 0 for r in runs.values()):
        result["ratio_117_to_1"] = round(runs["117"]["seconds"] / runs["1"]["seconds"], 2)
    return result


def check_compare(work: Path, sizes: Sizes, checkpoint: Path) -> dict:
    """A few structures on the GPU (AMP) and on the CPU (float32): how far the label maps agree."""
    scan = work / "ct.nii.gz"
    if not scan.exists():
        synthetic_ct(scan, sizes.scan)
    runs = {
        device: predict_run(work, f"compare_{device}", scan, checkpoint, device, list(COMPARED))
        for device in dict.fromkeys([sizes.device, "cpu"])
    }
    result = {"structures": list(COMPARED), "runs": runs}
    if all(r.get("exit") == 0 for r in runs.values()):
        result.update(agreement(*(work / f"predict_compare_{d}" / "ct.nii.gz" for d in (sizes.device, "cpu"))))
    return result


def method_configs(folder: Path, epochs: int) -> Path:
    """The shipped settings of each method with the schedule capped at ``epochs``."""
    folder.mkdir(parents=True, exist_ok=True)
    for method in METHODS:
        settings = yaml.safe_load((REPO / "configs" / "adapt" / f"{method}.yaml").read_text())
        settings["training"]["epochs"] = epochs
        (folder / f"{method}.yaml").write_text(yaml.safe_dump(settings))
    return folder


def check_adapt(work: Path, sizes: Sizes, checkpoint: Path) -> dict:
    dataset = phantom.PhantomDataset("gpu_target", {"1": "liver", "2": "spleen"}, train=1, test=1)
    data_list = phantom.write_dataset(
        work / "adapt_data", dataset, seed=0, spacing=sizes.phantom_spacing, progress=False
    )
    configs = method_configs(work / "methods", sizes.adapt_epochs)
    rows = {}
    for method in METHODS:
        out = work / f"adapt_{method}"
        shutil.rmtree(out, ignore_errors=True)
        report = run_child(
            "fsseg.adapt.cli",
            [
                "--checkpoint",
                str(checkpoint),
                "--data-list",
                str(data_list),
                "--out",
                str(out),
                "--organ",
                "liver",
                "--shots",
                "1",
                "--seeds",
                "1",
                "--method",
                method,
                "--device",
                sizes.device,
                "--set",
                f"method_configs={configs}",
                "--set",
                "pictures=false",
                "--no-progress",
                "--quiet",
            ],
            timeout=300,
        )
        if report.get("exit") == 0:
            results = json.loads((out / "results.json").read_text())
            row = results["rows"][0]
            report.update(
                dice=row["dice"],
                epochs=row["epochs"],
                train_seconds=row["train_seconds"],
                trainable_params=row["trainable_params"],
            )
        rows[method] = report
    return {"epochs_cap": sizes.adapt_epochs, "methods": rows}


def checkpoint_epoch(path: Path) -> int:
    try:
        return int(read_checkpoint(path)["epoch"])
    except Exception:  # not written yet, or being replaced
        return 0


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def check_pretrain(work: Path, sizes: Sizes) -> dict:
    datasets = [
        phantom.PhantomDataset(f"gpu_source_{s}", labels, sizes.pretrain_cases)
        for s, labels in (("a", {"1": "liver", "2": "spleen"}), ("b", {"1": "liver", "2": "stomach"}))
    ]
    lists = [
        str(phantom.write_dataset(work / "pretrain_data", d, seed=0, spacing=sizes.phantom_spacing, progress=False))
        for d in datasets
    ]
    out = work / "pretrain"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        "optim.epochs=2",
        "optim.warmup_epochs=1",
        "checkpoint_every=1",
        f"num_workers={4 if not sizes.smoke else 0}",
    ]
    if sizes.smoke:
        overrides += ["preprocessing.spacing=[4.0, 4.0, 4.0]", "preprocessing.roi=[32, 32, 32]"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        "-m",
        "pretrain",
        "--config",
        str(sizes.pretrain_config),
        "--out",
        str(out),
        "--data-list",
        *lists,
        "--device",
        sizes.device,
        "--no-progress",
        *(a for o in overrides for a in ("--set", o)),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    began = time.perf_counter()
    first = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    while first.poll() is None and time.perf_counter() - began < 240:
        if (out / "checkpoint_latest.pt").exists():  # written atomically at the end of epoch 1
            for pid in [first.pid, *descendants(first.pid)]:  # torchrun's workers run in sessions of their own
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    first.wait()
    first_err = first.stderr.read()[-1500:]
    killed = first.returncode == -signal.SIGKILL and checkpoint_epoch(out / "checkpoint_latest.pt") == 1
    result = {"killed_in_epoch_2": killed, "first_run_exit": first.returncode}
    if not killed and first.returncode != 0:
        return {**result, "error": first_err}
    resumed = subprocess.run(command + ["--resume", "auto"], env=env, capture_output=True, text=True, timeout=300)
    result["resumed_exit"] = resumed.returncode
    if resumed.returncode != 0:
        return {**result, "error": resumed.stderr[-1500:]}
    summary = json.loads((out / "summary.json").read_text())
    log = (out / "train.log").read_text()
    step = summary["seconds_data_wait"] + summary["seconds_compute"]
    result.update(
        epochs_done=checkpoint_epoch(out / "checkpoint_latest.pt"),
        steps=summary["steps"],
        steps_per_epoch=summary["steps_per_epoch"],
        world_size=summary["world_size"],
        process_group=next(
            (line.split("process group: ")[1].split(")")[0] for line in log.splitlines() if "process group: " in line),
            None,
        ),
        resumed_after_epoch_1="after epoch 1 " in log,
        resumed_run_seconds_per_step=round(step / max(summary["steps_per_epoch"], 1), 3),
        data_wait_share=round(summary["seconds_data_wait"] / step, 4) if step else None,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_check.json"))
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny UNet, small volumes: checks the script only")
    parser.add_argument(
        "--steps",
        nargs="+",
        default=list(STEPS),
        choices=STEPS,
        help="which steps, in this order (default: all; the CPU comparison last, it is the slowest)",
    )
    args = parser.parse_args()
    sizes = Sizes(args.smoke)
    work = Path(args.work or tempfile.mkdtemp(prefix="fsseg-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    document = {"detect": detect()}
    print(json.dumps(document["detect"]), flush=True)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run on a GPU machine, or with --smoke to check the script")
    checkpoint = decisive_checkpoint(work / "model.pt", sizes)
    steps = {
        "predict": lambda: check_predict(work, sizes, checkpoint),
        "scaling": lambda: check_scaling(work, sizes),
        "adapt": lambda: check_adapt(work, sizes, checkpoint),
        "pretrain": lambda: check_pretrain(work, sizes),
        "compare": lambda: check_compare(work, sizes, checkpoint),
    }
    for name in args.steps:
        began = time.perf_counter()
        document[name] = {**steps[name](), "step_seconds": round(time.perf_counter() - began, 1)}
        print(f"{name}: {json.dumps(document[name])}", flush=True)
        rows = [
            {
                "step": step,
                "smoke": args.smoke,
                "seconds": result.get("step_seconds"),
                "result": json.dumps(result, separators=(",", ":")),
            }
            for step, result in document.items()
        ]
        # rewritten after every step: what finished survives a later timeout
        out = write_result("gpu_check", rows, QUESTION, COMMAND, COLUMNS, out=Path(args.out))
    print_table(document)
    print(f"wrote {out}")


def print_table(document: dict) -> None:
    gb = lambda value: f"{value:.2f}" if isinstance(value, (int, float)) else "-"  # noqa: E731

    def line(name: str, run: dict, note: str = "") -> None:
        print(
            f"{name:<24} {run.get('exit')!s:>4} {run.get('seconds', '-')!s:>8} {gb(run.get('peak_gpu_gb')):>7} "
            f"{gb(run.get('peak_rss_gb')):>7}  {note or run.get('error', '')[-80:]}"
        )

    print(f"\n{'step':<24} {'exit':>4} {'seconds':>8} {'GPU GB':>7} {'RSS GB':>7}  notes")
    if "predict" in document:
        line("predict, 29 structures", document["predict"]["run"])
    for count, run in document.get("scaling", {}).get("runs", {}).items():
        line(
            f"predict, {count} of totalseg117",
            run,
            f"{document['scaling'].get('ratio_117_to_1')}x one structure" if count == "117" else "",
        )
    for method, run in document.get("adapt", {}).get("methods", {}).items():
        line(f"adapt {method} K=1", run, f"Dice {run['dice']}, {run['epochs']} epochs" if "dice" in run else "")
    pre = document.get("pretrain")
    if pre:
        line(
            "pretrain torchrun x1",
            {"exit": pre.get("resumed_exit"), "seconds": pre.get("step_seconds")},
            f"group {pre.get('process_group')}, killed in epoch 2: {pre.get('killed_in_epoch_2')}, "
            f"data-wait share {pre.get('data_wait_share')} of {pre.get('resumed_run_seconds_per_step')} s/step",
        )
    for device, run in document.get("compare", {}).get("runs", {}).items():
        equal = document["compare"].get("voxels_equal")
        line(f"predict {device}, 3", run, f"voxels equal GPU/CPU: {equal}" if device == "cpu" else "")


if __name__ == "__main__":
    main()
