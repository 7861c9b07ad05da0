"""Data lists: one JSON file per dataset naming its cases, splits and label map.

Format::

    {"name": "btcv", "root": "optional/base/dir",
     "label_map": {"1": "spleen", "2": "kidney_right", "6": "liver"},
     "cases": [{"id": "img0001", "image": "imagesTr/img0001.nii.gz", "label": "labelsTr/label0001.nii.gz",
                "split": "train"},
               {"id": "s0011", "image": "s0011/ct.nii.gz",
                "labels": {"liver": "s0011/segmentations/liver.nii.gz"}, "split": "test"}]}

A case gives one multi-label map (``label``), per-structure binary masks (``labels``), or neither (images to
predict). Relative paths resolve against ``root`` (itself relative to the list file), else the ``data_root``
argument or the ``FSSEG_DATA_ROOT`` environment variable, else the list file's folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fsseg.data.labels import LabelMap
from fsseg.errors import DataError
from fsseg.outputs import check_file_name
from fsseg.templates import Template, canonical_name

SPLITS = ("train", "val", "test")
DATA_ROOT_ENV = "FSSEG_DATA_ROOT"
_CASE_KEYS = {"id", "image", "label", "labels", "split", "group"}
_LIST_KEYS = {"name", "root", "label_map", "cases", "description"}


@dataclass(frozen=True)
class Case:
    """One scan of a dataset with its annotation and split.

    ``group`` names the subject: cases of one group (the same scan at two resolutions, say) must never be
    split between a support set and a query set.
    """

    id: str
    image: Path
    split: str = "train"
    label: Path | None = None
    labels: dict[str, Path] = field(default_factory=dict)
    group: str = ""
    dataset: str = ""

    @property
    def has_annotation(self) -> bool:
        return self.label is not None or bool(self.labels)

    @property
    def annotation_files(self) -> list[Path]:
        """The label map or the per-structure masks."""
        return ([self.label] if self.label is not None else []) + list(self.labels.values())

    @property
    def files(self) -> list[Path]:
        """Every file the case names: its image and annotation."""
        return [self.image, *self.annotation_files]

    def annotated_structures(self, label_map: LabelMap) -> list[str]:
        """Canonical names of the structures this case annotates."""
        if self.labels:
            return list(self.labels)
        return label_map.structures if self.label is not None else []


@dataclass(frozen=True)
class DataList:
    """A parsed, path-resolved data list."""

    name: str
    path: Path
    root: Path
    label_map: LabelMap
    cases: tuple[Case, ...]

    def split(self, name: str) -> list[Case]:
        """Cases of one split (``train``, ``val`` or ``test``)."""
        if name not in SPLITS:
            raise DataError(f"unknown split '{name}'; expected one of {', '.join(SPLITS)}")
        return [case for case in self.cases if case.split == name]

    def case(self, case_id: str) -> Case:
        for case in self.cases:
            if case.id == case_id:
                return case
        raise DataError(f"{self.path}: no case with id '{case_id}'")

    @property
    def structures(self) -> list[str]:
        """Every structure annotated by at least one case."""
        names: list[str] = []
        for case in self.cases:
            names.extend(n for n in case.annotated_structures(self.label_map) if n not in names)
        return names

    def cases_annotating(self, structures: str | Sequence[str], split: str | None = None) -> list[Case]:
        """Cases (optionally of one split) whose annotation includes every one of ``structures``."""
        names = {canonical_name(s) for s in ([structures] if isinstance(structures, str) else structures)}
        pool = self.cases if split is None else self.split(split)
        return [case for case in pool if names <= set(case.annotated_structures(self.label_map))]

    def template_coverage(self, template: Template) -> tuple[list[str], list[str]]:
        """(structures trained against ``template``, structures outside it)."""
        inside = [n for n in self.structures if n in template]
        return inside, [n for n in self.structures if n not in template]


def load_datalist(path: str | Path, data_root: str | Path | None = None) -> DataList:
    """Read and validate a data list JSON file, resolving every path.

    Raises:
        DataError: missing file, malformed JSON (with the line), or an invalid field (naming the case).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data list not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text (JSON) file") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object with 'name', 'label_map' and 'cases'")
    unknown = sorted(set(raw) - _LIST_KEYS)
    if unknown:
        raise DataError(f"{path}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(_LIST_KEYS))}")
    for key in ("name", "root", "description"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise DataError(f"{path}: '{key}' must be a string, got {raw[key]!r}")
    name = raw.get("name") or path.stem
    root = _resolve_root(path, raw.get("root"), data_root)
    label_map = LabelMap.parse(raw.get("label_map", {}), source=str(path))
    cases_raw = raw.get("cases")
    if not isinstance(cases_raw, list) or not cases_raw:
        raise DataError(f"{path}: 'cases' must be a non-empty list")
    cases = tuple(_parse_case(entry, i, path, root, str(name), label_map) for i, entry in enumerate(cases_raw))
    seen: set[str] = set()
    for case in cases:
        if case.id in seen:
            raise DataError(f"{path}: duplicate case id '{case.id}'")
        seen.add(case.id)
    return DataList(name=str(name), path=path, root=root, label_map=label_map, cases=cases)


def _resolve_root(list_path: Path, root: str | None, data_root: str | Path | None) -> Path:
    folder = list_path.resolve().parent
    if root:
        return (folder / Path(root).expanduser()).resolve()
    chosen = data_root or os.environ.get(DATA_ROOT_ENV)
    return Path(chosen).expanduser().resolve() if chosen else folder


def _parse_case(entry: object, index: int, path: Path, root: Path, dataset: str, label_map: LabelMap) -> Case:
    where = f"{path}: case #{index + 1}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object with 'id' and 'image'")
    if "id" in entry:
        where = f"{path}: case '{entry['id']}'"
    unknown = sorted(set(entry) - _CASE_KEYS)
    if unknown:
        raise DataError(f"{where}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(_CASE_KEYS))}")
    for key in ("id", "image"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise DataError(f"{where}: missing or empty '{key}'")
    check_file_name(entry["id"], f"{path}: case id")  # ids name output files
    if "group" in entry and not isinstance(entry["group"], (str, int)):
        raise DataError(f"{where}: 'group' must be a string")
    split = entry.get("split", "train")
    if split not in SPLITS:
        raise DataError(f"{where}: split '{split}' is not one of {', '.join(SPLITS)}")
    if "label" in entry and "labels" in entry:
        raise DataError(
            f"{where}: give either 'label' (one multi-label map) or 'labels' (per-structure masks), not both"
        )
    label = None
    if "label" in entry:
        if not isinstance(entry["label"], str) or not entry["label"]:
            raise DataError(f"{where}: 'label' must be a file path")
        if not label_map.entries:
            raise DataError(f"{where}: has a 'label' map but the data list has no 'label_map'")
        label = root / entry["label"]
    labels: dict[str, Path] = {}
    if "labels" in entry:
        if not isinstance(entry["labels"], dict) or not entry["labels"]:
            raise DataError(f"{where}: 'labels' must map structure names to mask files")
        for structure, mask in entry["labels"].items():
            if not isinstance(mask, str) or not mask:
                raise DataError(f"{where}: mask of '{structure}' must be a file path")
            name = canonical_name(structure)
            if name in labels:
                raise DataError(f"{where}: structure '{name}' is given twice in 'labels'")
            labels[name] = root / mask
    return Case(
        id=entry["id"],
        image=root / entry["image"],
        split=split,
        label=label,
        labels=labels,
        group=str(entry.get("group", entry["id"])),
        dataset=dataset,
    )
