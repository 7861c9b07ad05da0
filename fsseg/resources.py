"""Files fsseg ships besides its code: the run and method configs (``configs/``), the dataset specs
(``data_lists/datasets/``), the example data lists (``data_lists/examples/``) and the sample CT
(``sample_data/ct/``).

An installed wheel holds them as package data under ``fsseg/shipped/`` (setup.cfg maps the repository's folders
there); an editable install or a checkout reads them where they lie in the repository. Either way a command run
from any folder finds the same files.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

# Name under fsseg/shipped/ in a wheel -> folder in the repository.
FOLDERS = {
    "configs": "configs",
    "datasets": "data_lists/datasets",
    "examples": "data_lists/examples",
    "sample_ct": "sample_data/ct",
}


def shipped_dir(name: str) -> Path:
    """The folder of shipped files ``name`` (a key of ``FOLDERS``)."""
    packaged = Path(str(importlib.resources.files("fsseg") / "shipped" / name))
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[1] / FOLDERS[name]


def find_config(path: str | Path) -> Path:
    """``path`` as given when it exists; else, for a relative path such as ``configs/adapt/demo``, the shipped
    copy; else ``path`` unchanged (the caller reports it missing)."""
    path = Path(path)
    if path.exists() or path.is_absolute() or not path.parts or path.parts[0] != "configs":
        return path
    shipped = shipped_dir("configs").joinpath(*path.parts[1:])
    return shipped if shipped.exists() else path
