"""predictions.json: what fsseg-predict wrote into an output folder, case by case.

A case is recorded before any of its files is written, so that a later run knows which files of the folder are
fsseg-predict's own: it may replace those, and refuses any other file in its way (a user's ground truth, another
tool's masks). Parts of a batch that predict into one folder share the record: each change is read, merged and
written under a lock, so no part's cases are lost.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Callable

from fsseg.errors import DataError
from fsseg.files import atomic_path

try:  # POSIX; elsewhere parts sharing a folder write their records without a lock
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

REPORT, LABELS = "predictions.json", "labels.json"
LOCK = ".predictions.lock"


def read_record(out: Path) -> dict | None:
    """The folder's record, or None when it has none.

    Raises:
        DataError: a predictions.json that is not fsseg-predict's.
    """
    path = out / REPORT
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("cases"), dict):
        raise DataError(f"{path}: exists and is not a record of fsseg-predict; choose another output folder")
    return record


def check_owned(out: Path, planned: Iterable[Path], outputs_of: Callable[[str], Iterable[Path]]) -> None:
    """Refuse to write over a file of ``out`` that fsseg-predict did not write: one not named by the folder's
    record (``outputs_of(case)``: every file a recorded case may have).

    Raises:
        DataError: naming the first such file.
    """
    record = read_record(out)
    owned = {REPORT, LABELS} if record is not None else set()
    for case in (record or {}).get("cases", {}):
        owned |= {path.name for path in outputs_of(case)}
    in_the_way = next((path for path in planned if path.exists() and path.name not in owned), None)
    if in_the_way is not None:
        raise DataError(
            f"{in_the_way}: exists, and fsseg-predict did not write it (the folder's {REPORT} does not "
            "name it); choose another output folder or move the file away"
        )


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with open(out / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# Entries of a run that has not (yet) predicted the case: they keep what an earlier run found of it.
WITHOUT_FINDINGS = ("pending", "skipped")


def update_record(out: Path, header: dict, cases: dict[str, dict]) -> None:
    """Merge ``header`` and ``cases`` (case -> entry) into the folder's record, under the folder's lock. A pending or
    skipped entry keeps the volumes and confidences an earlier run recorded for its case (``--continue`` loses
    nothing); a new prediction or failure replaces them."""
    with _locked(out):
        record = read_record(out) or {"cases": {}}
        record.update(header)
        for case, entry in cases.items():
            earlier = record["cases"].get(case, {}) if entry.get("status") in WITHOUT_FINDINGS else {}
            record["cases"][case] = {**earlier, **entry}
        with atomic_path(out / REPORT) as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n")
