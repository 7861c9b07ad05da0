"""One current result file per benchmark, ``bench/results/<name>.json``, each row stamped with the commit, date,
host and torch it was measured with (git keeps the earlier files).

The file says what the benchmark asks (``question``), how to run it (``command``) and which row fields its table
shows (``columns``); ``bench/render_docs.py`` turns the files into docs/benchmarks.md.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from collections.abc import Hashable
from pathlib import Path
from typing import Callable

import torch

from fsseg.checkpoint import versions
from fsseg.files import atomic_path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
STAMP = ("commit", "date", "host", "torch")


def provenance() -> dict[str, str]:
    """The commit (``+changes`` when the tree differs from it), today's date, the host and torch's version."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+changes"
    host = f"{os.cpu_count()} CPU cores, {versions()['cpu']}"
    if torch.cuda.is_available():
        host += f", {torch.cuda.get_device_name()}"
    return {"commit": commit, "date": datetime.date.today().isoformat(), "host": host, "torch": str(torch.__version__)}


def write_result(
    name: str,
    rows: list[dict],
    question: str,
    command: str,
    columns: dict[str, str],
    key: Callable[[dict], Hashable] | None = None,
    out: Path | None = None,
) -> Path:
    """Write the benchmark's file with ``rows`` stamped by :func:`provenance`; return its path.

    ``columns`` maps the row fields the table shows to their headers. With ``key``, the rows of the current file
    that no new row replaces are kept (a benchmark run in parts, or a rerun of some of its cases).
    """
    path = out or RESULTS / f"{name}.json"
    stamp = provenance()
    stamped = [{**row, **stamp} for row in rows]
    if key is not None and path.is_file():
        new = {key(row) for row in stamped}
        stamped = [row for row in json.loads(path.read_text())["rows"] if key(row) not in new] + stamped
    document = {"benchmark": name, "question": question, "command": command, "columns": columns, "rows": stamped}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(document, indent=1) + "\n")
    return path
