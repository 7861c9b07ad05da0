"""``fsseg-adapt --merge``: the parts of a sweep run on several machines (``--num-parts P --part-id I``) combined
into the one set of results a single run of the whole sweep writes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import yaml

from fsseg.adapt.config import AdaptConfig
from fsseg.adapt.results import (
    RUN_FILES,
    adapter_name,
    check_own_run_files,
    results_table,
    write_results,
    write_summary,
)
from fsseg.config import from_dict
from fsseg.errors import ConfigError
from fsseg.files import atomic_path
from fsseg.outputs import check_outputs, prepare_output_dir

# What every part must share: the inputs and the settings of its rows.
SHARED = ("checkpoint_sha256", "data_list", "organs", "signature", "method_settings")


def _read_part(folder: Path) -> tuple[dict, dict]:
    results, config = folder / "results.json", folder / "config.yaml"
    if not results.is_file() or not config.is_file():
        raise ConfigError(f"--merge: {folder} holds no finished fsseg-adapt part (results.json and config.yaml)")
    try:
        document, config_data = json.loads(results.read_text()), yaml.safe_load(config.read_text())
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise ConfigError(f"--merge: {folder} cannot be read ({error})") from None
    rows = document.get("rows") if isinstance(document, dict) else None
    if (
        not isinstance(config_data, dict)
        or not isinstance(rows, list)
        or not all(isinstance(r, dict) and {"method", "shots", "seed"} <= set(r) for r in rows)
    ):
        raise ConfigError(
            f"--merge: {folder} is not a part of fsseg-adapt (its results.json holds no list of rows "
            "with method, shots and seed, or its config.yaml is not a mapping)"
        )
    return document, config_data


def merge_parts(folders: Sequence[str | Path], out: str | Path) -> dict:
    """Check that the parts in ``folders`` belong to one sweep and together hold every run once; write the
    merged results.json, results.csv and adapter files under ``out`` and print the table.

    Raises:
        ConfigError: a part is unreadable, comes from other inputs or settings, a run is in two parts, or runs
            of the sweep are missing (naming them).
        DataError: ``out`` would replace a part's results or files fsseg-adapt did not write.
    """
    out = Path(out)
    check_outputs([out / name for name in RUN_FILES], [Path(d) / "results.json" for d in folders], option="--out")
    check_own_run_files(out)
    prepare_output_dir(out, "--out")
    parts = [(Path(folder), *_read_part(Path(folder))) for folder in folders]
    first_folder, first, config_data = parts[0]
    for folder, document, config in parts[1:]:
        differs = [key for key in SHARED if document.get(key) != first.get(key)]
        if differs or config != config_data:
            what = ", ".join(differs) or "config.yaml"
            raise ConfigError(f"--merge: {folder} is not a part of the sweep in {first_folder} (its {what} differs)")
    config = from_dict(AdaptConfig, config_data, "config.yaml")
    order = {(method, shots, seed): i for i, (seed, shots, method) in enumerate(config.jobs())}
    owner: dict[tuple[str, int, int], Path] = {}
    rows = []
    for folder, document, _ in parts:
        for job in dict.fromkeys((r["method"], r["shots"], r["seed"]) for r in document["rows"]):
            if job not in order:
                raise ConfigError(
                    f"--merge: {folder} holds {job[0]} K={job[1]} seed {job[2]}, which is not a run of "
                    "the sweep its config.yaml describes"
                )
            if job in owner:
                raise ConfigError(f"--merge: {job[0]} K={job[1]} seed {job[2]} is in both {owner[job]} and {folder}")
            owner[job] = folder
        rows += document["rows"]
    missing = [job for job in order if job not in owner]
    if missing:
        listed = ", ".join(f"{m} K={k} seed {s}" for m, k, s in missing[:6]) + (" ..." if len(missing) > 6 else "")
        raise ConfigError(
            f"--merge: {len(missing)} run(s) of the sweep are in no part: {listed} (a part that failed "
            "or has not finished; run it, with --continue, and merge again)"
        )
    rows.sort(key=lambda r: order[(r["method"], r["shots"], r["seed"])])
    (out / "adapters").mkdir(parents=True, exist_ok=True)
    # each run's adapter from the part that ran it, and nothing else of a part's folder: a foreign file, or a stale
    # one of a run another part owns, never enters the merged sweep
    for (method, shots, seed), folder in owner.items():
        adapter = folder / "adapters" / adapter_name(first["organs"], method, shots, seed)
        if adapter.is_file():
            with atomic_path(out / "adapters" / adapter.name) as tmp:
                shutil.copyfile(adapter, tmp)
    header = {key: first[key] for key in ("checkpoint", "evaluation_space", *SHARED)}
    write_results(out, rows, config, header, sum(float(p[1].get("seconds", 0)) for p in parts))
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config_data, sort_keys=False))
    table = results_table(rows, config)
    print(write_summary(out, table, config, rows), end="")
    return {"table": table, "rows": len(rows), "parts": len(parts)}
