"""The real CT that ships with fsseg: five scans of four subjects with organ labels, and data lists for them.

``fsseg-sample-data --out DIR`` writes the scans with their provenance and licences (README.md) and manifest into
DIR/ct, and the shipped example lists (``data_lists/examples/sample_ct_*.json``) into DIR with their root set to
DIR/ct, so that fsseg-check-data, fsseg-pretrain and fsseg-adapt run on ``DIR/*.json`` as they stand. Every scan
is checked against the sha256 in the manifest before it is written; a file already in DIR is kept when it is the
same and refused when it is not, so running the command again is harmless and never replaces a file of the
user's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from fsseg.errors import DataError
from fsseg.files import atomic_path, staged_writes
from fsseg.resources import shipped_dir

LIST_PREFIX = "sample_ct_"
DATA_FOLDER = "ct"  # under --out, beside the lists


@dataclass(frozen=True)
class SampleData:
    """What :func:`write_sample_data` wrote: the scans' folder, and each data list by name."""

    folder: Path
    lists: dict[str, Path]


def sample_ct_dir() -> Path:
    """The packaged sample CT folder (read-only use: write a copy with :func:`write_sample_data`)."""
    return shipped_dir("sample_ct")


def sample_lists() -> dict[str, Path]:
    """The shipped data lists of the sample CT, by name (``sample_ct_totalseg``, ...)."""
    return {p.stem: p for p in sorted(shipped_dir("examples").glob(f"{LIST_PREFIX}*.json"))}


def _checked_files(source: Path) -> dict[str, bytes]:
    """Every file of the sample folder by relative path; the scans' bytes checked against the manifest."""
    manifest = json.loads((source / "manifest.json").read_text())["cases"]
    files = {p.relative_to(source).as_posix(): p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file()}
    for case, entry in manifest.items():
        for key in (k.removesuffix("_sha256") for k in entry if k.endswith("_sha256")):
            data = files.get(entry[key])
            if data is None or hashlib.sha256(data).hexdigest() != entry[f"{key}_sha256"]:
                raise DataError(
                    f"{source / entry[key]}: the packaged sample scan of '{case}' is missing or damaged "
                    "(sha256 differs from manifest.json); reinstall fsseg"
                )
    return files


def _list_text(path: Path) -> bytes:
    """A shipped list with its root made the scans' folder beside it."""
    data = json.loads(path.read_text())
    data["root"] = DATA_FOLDER
    return (json.dumps(data, indent=1) + "\n").encode()


def _differs(target: Path, data: bytes) -> bool:
    """Whether ``target`` exists and is not a file holding exactly ``data``."""
    return target.exists() and not (target.is_file() and target.read_bytes() == data)


def write_sample_data(out: str | Path) -> SampleData:
    """Write the sample CT and its data lists into ``out`` (created if needed); return where they lie.

    Raises:
        DataError: a packaged scan is damaged, or ``out`` holds a different file of the same name (checked
            before the first write).
    """
    out = Path(out)
    files = {f"{DATA_FOLDER}/{relative}": data for relative, data in _checked_files(sample_ct_dir()).items()}
    files.update({f"{name}.json": _list_text(path) for name, path in sample_lists().items()})
    clash = next((out / relative for relative, data in files.items() if _differs(out / relative, data)), None)
    if clash is not None:
        raise DataError(f"{clash}: already exists and is not the sample's file; remove it or choose another --out")
    with staged_writes(out) as staging:  # all missing files or none
        for relative, data in files.items():
            if not (out / relative).exists():
                with atomic_path(staging / relative) as tmp:
                    tmp.write_bytes(data)
    return SampleData(folder=out / DATA_FOLDER, lists={name: out / f"{name}.json" for name in sample_lists()})
