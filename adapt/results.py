"""What fsseg-adapt writes and reads back: result rows, the method x K table, results.json/.csv, and the finished
runs ``--continue`` keeps."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fsseg.adapt.config import AdaptConfig
from fsseg.adapters.artifact import SUFFIX
from fsseg.config import to_dict
from fsseg.errors import ConfigError, DataError
from fsseg.files import atomic_path
from fsseg.outputs import check_run_file

if TYPE_CHECKING:
    from fsseg.adapt.engine import Adaptation

log = logging.getLogger("fsseg.adapt")
RUN_FILES = ("config.yaml", "results.json", "results.csv")
# What marks the run files as fsseg-adapt's own (a config.yaml may be a pretraining run's or the user's).
OWN_KEYS = {"config.yaml": ("organs", "shots", "methods"), "results.json": ("rows", "organs")}

RESULT_FIELDS = [
    "organ",
    "method",
    "shots",
    "seed",
    "case",
    "dice",
    "nsd",
    "hd95",
    "confidence",
    "transductive",
    "trainable_params",
    "total_params",
    "train_seconds",
    "epochs",
    "support",
]


def run_signature(run: Adaptation) -> dict:
    """What every result row depends on besides its method's settings (compared by ``--continue``)."""
    config = run.config
    return _plain(
        {
            "checkpoint_sha256": run.checkpoint_sha,
            "data_list": str(Path(run.datalist.path).resolve()),
            "organs": run.organs,
            "tests": [case.id for case in run.tests],
            "overlap": config.overlap,
            "precision": run.predictor.precision,
            "nsd_tolerance": config.nsd_tolerance,
            "ti": to_dict(config.ti),
        }
    )


def method_signatures(run: Adaptation) -> dict:
    """Each method's options and training settings, as compared by ``--continue``."""
    return _plain({method: to_dict(settings) for method, (settings, _) in run.settings.items()})


def _plain(data: object) -> object:
    """As it reads back from JSON (tuples as lists), so that saved and current signatures compare equal."""
    return json.loads(json.dumps(data))


def finished_runs(path: Path, run: Adaptation) -> dict[tuple[str, int, int], list[dict]]:
    """The complete (method, K, seed) runs of an earlier ``results.json`` made with the same inputs and settings.

    Raises:
        ConfigError: the file is unreadable or comes from other inputs (checkpoint, data list, structures, ...).
    """
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"--continue: {path} cannot be read ({error}); remove it to start afresh") from None
    rows = document.get("rows") if isinstance(document, dict) else None
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and {"method", "shots", "seed"} <= set(r) for r in rows
    ):
        raise ConfigError(
            f"--continue: {path} is not a results file of fsseg-adapt (no list of rows with "
            "method, shots and seed); remove it to start afresh"
        )
    if document.get("signature") != run_signature(run):
        raise ConfigError(
            f"--continue: {path} comes from another checkpoint, data list, target structures, TI or "
            "scoring settings; choose another --out or drop --continue to start afresh"
        )
    saved, current = document.get("method_settings"), method_signatures(run)
    saved = saved if isinstance(saved, dict) else {}
    groups: dict[tuple[str, int, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["shots"], row["seed"]), []).append(row)
    complete = len(run.tests) * len(run.organs)
    kept = {
        job: rows
        for job, rows in groups.items()
        if len(rows) == complete and job[0] in current and saved.get(job[0]) == current[job[0]]
    }
    changed = sorted({job[0] for job in groups if job[0] in current and saved.get(job[0]) != current[job[0]]})
    log.info(
        f"--continue: keeping {len(kept)} finished run(s) of {path}"
        + (f"; running again those of {', '.join(changed)} (settings changed)" if changed else "")
    )
    return kept


def results_table(rows: list[dict], config: AdaptConfig) -> dict:
    """{organ: {method: {K: (mean, std) over seeds of the mean Dice over test cases}}}."""
    table: dict = {}
    for organ in dict.fromkeys(r["organ"] for r in rows):
        for method in config.methods:
            for shots in config.shots:
                per_seed = []
                for seed in range(config.seeds):
                    dice = [
                        r["dice"]
                        for r in rows
                        if (r["organ"], r["method"], r["shots"], r["seed"]) == (organ, method, shots, seed)
                    ]
                    if dice:
                        per_seed.append(float(np.mean(dice)))
                if per_seed:
                    table.setdefault(organ, {}).setdefault(method, {})[shots] = (
                        float(np.mean(per_seed)),
                        float(np.std(per_seed)),
                    )
    return table


def format_table(table: dict, config: AdaptConfig, rows: list[dict]) -> str:
    """Rows = method, columns = K (mean ± std over seeds), then trainable parameters, the ratio to all, and the
    mean training seconds of one (K, seed) run."""
    parameters = {r["method"]: (r["trainable_params"], r["total_params"]) for r in rows}
    seconds = {m: float(np.mean([r["train_seconds"] for r in rows if r["method"] == m])) for m in parameters}
    lines = []
    for organ, methods in table.items():
        lines.append(f"Dice on the test cases, {organ} (mean ± std over {config.seeds} seed(s)):")
        lines.append(
            f"{'method':<10}"
            + "".join(f"{'K=' + str(k):>16}" for k in config.shots)
            + f"{'trainable':>14}{'fewer':>9}{'s/run':>8}"
        )
        for method, cells in methods.items():
            trainable, total = parameters[method]
            lines.append(
                f"{method:<10}"
                + "".join(
                    f"{cells[k][0]:>9.3f} ± {cells[k][1]:.3f}" if k in cells else f"{'-':>16}" for k in config.shots
                )
                + f"{trainable:>14,}{total / trainable:>8.0f}x{seconds[method]:>8.0f}"
            )
    return "\n".join(lines)


def measured(table: dict, rows: list[dict]) -> str:
    """One sentence a structure on what the run measured: the method with the highest mean Dice at each K, and
    where full fine-tuning stands when it ran."""
    trainable = {r["method"]: r["trainable_params"] for r in rows}
    sentences = []
    for organ, methods in table.items():
        shots = sorted({k for cells in methods.values() for k in cells})
        best = []
        for k in shots:
            method = max((m for m in methods if k in methods[m]), key=lambda m: methods[m][k][0])
            best.append(
                f"at K={k} {method} ({trainable[method]:,} trainable parameters) with {methods[method][k][0]:.3f}"
            )
        text = f"Measured on {organ}: the highest mean Dice " + ", ".join(best)
        if "ft" in methods:
            text += f"; full fine-tuning ({trainable['ft']:,}) reached " + ", ".join(
                f"{methods['ft'][k][0]:.3f} at K={k}" for k in shots if k in methods["ft"]
            )
        sentences.append(text + ".")
    return "\n".join(sentences)


def write_summary(out: Path, table: dict, config: AdaptConfig, rows: list[dict]) -> str:
    """The table and the sentence of what was measured, written to ``out``/summary.txt; returns the text."""
    scored = f"{format_table(table, config, rows)}\n{measured(table, rows)}\n"
    text = scored if rows else "No test case was scored (the list has none); the adapters are in adapters/.\n"
    with atomic_path(out / "summary.txt") as tmp:
        tmp.write_text(text)
    return text


def adapter_name(organs: list[str], method: str, shots: int, seed: int) -> str:
    """The file name of one run's adapter under ``adapters/``."""
    return f"{'+'.join(organs)}_{method}_k{shots}_s{seed}{SUFFIX}"


def best_adapter(rows: list[dict], out: Path, organs: list[str]) -> dict | None:
    """The (method, K) with the highest mean Dice and its seed-0 adapter file, for the largest K run."""
    candidates = [r for r in rows if not r["transductive"]]
    if not candidates:
        return None
    shots = max(r["shots"] for r in candidates)
    means = {}
    for method in dict.fromkeys(r["method"] for r in candidates):
        dice = [r["dice"] for r in candidates if r["method"] == method and r["shots"] == shots]
        if dice:
            means[method] = float(np.mean(dice))
    method = max(means, key=means.get)
    path = out / "adapters" / adapter_name(organs, method, shots, 0)
    return {
        "method": method,
        "shots": shots,
        "mean_dice": means[method],
        "adapter": str(path) if path.exists() else None,
    }


def run_header(run: Adaptation) -> dict:
    """What results.json says of the inputs every row shares (compared by ``--continue`` and ``--merge``)."""
    return {
        "checkpoint": run.config.checkpoint,
        "checkpoint_sha256": run.checkpoint_sha,
        "data_list": run.config.data_list,
        "organs": run.organs,
        "evaluation_space": "native grid of each test case",
        "signature": run_signature(run),
        "method_settings": method_signatures(run),
    }


def write_results(
    out: Path, rows: list[dict], config: AdaptConfig, header: dict, seconds: float, part: tuple[int, int] = (0, 1)
) -> None:
    """results.csv and results.json (``header`` from :func:`run_header`, the table, the rows) under ``out``;
    ``part`` = (part id, parts) of a sweep split over machines."""
    with atomic_path(out / "results.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    table = results_table(rows, config)
    document = {
        "best": best_adapter(rows, out, header["organs"]),
        **header,
        "table": {
            o: {m: {str(k): {"mean": v[0], "std": v[1]} for k, v in c.items()} for m, c in ms.items()}
            for o, ms in table.items()
        },
        "part": {"id": part[0], "of": part[1]},
        "rows": rows,
        "seconds": round(seconds, 1),
    }
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(document, indent=1) + "\n")


def check_own_run_files(out: Path) -> None:
    """Refuse an ``out`` whose run files fsseg-adapt did not write (results.csv counts as its own beside its own
    results.json)."""
    for name, keys in OWN_KEYS.items():
        check_run_file(out / name, keys, "fsseg-adapt")
    if (out / "results.csv").exists() and not (out / "results.json").exists():
        raise DataError(f"{out / 'results.csv'}: exists without fsseg-adapt's results.json; choose another --out")
