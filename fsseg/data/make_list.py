"""Build a data list (``fsseg-make-list``) by scanning a dataset's standard folder layout.

Each supported dataset is described by a JSON spec in ``data_lists/datasets/`` (its label map and where its
images and labels lie); adding a dataset means adding a spec, not code. A layout entry::

    {"image_glob": "imagesTr/*.nii.gz",            # images, relative to --root
     "id_pattern": "(?P<id>liver_\\d+)\\.nii\\.gz$",  # regex on the image path; must capture 'id'
     "label": "labelsTr/{id}.nii.gz",             # optional multi-label map; {dir} = the image's folder
     "labels_glob": "{id}/segmentations/*.nii.gz", # or optional per-structure masks (file stem = structure)
     "split": "train"}

An optional ``split_csv`` ({"file", "id_column", "split_column", "delimiter"}) overrides splits per case.

``nnunet`` reads a dataset in nnU-Net's raw layout instead (``DatasetXXX_Name/``: ``dataset.json``, ``imagesTr/``
with channel ``_0000``, ``labelsTr/``, ``imagesTs/``): the spec is made from its ``dataset.json``.

``folder`` reads a plain folder of one's own scans: ``images/<id>.nii.gz`` and, for the labelled ones,
``labels/<id>.nii.gz`` (a label map whose ids ``--label-map`` names). Labelled cases are support candidates
(``train``) unless ``--test-ids`` names them; unlabelled ones are ``test`` cases to predict.
"""

from __future__ import annotations

import csv
import json
import os
import re
import string
from collections.abc import Sequence
from pathlib import Path

from fsseg.data.datalist import SPLITS, DataList, load_datalist
from fsseg.data.labels import LabelMap
from fsseg.errors import ConfigError, DataError
from fsseg.files import atomic_path, nifti_stem
from fsseg.outputs import check_output_file, check_outputs
from fsseg.resources import shipped_dir

SPECS_ENV = "FSSEG_DATASET_SPECS"
CSV_KEYS = ("file", "id_column", "split_column")
NNUNET = "nnunet"
FOLDER = "folder"
NIFTI_ENDINGS = (".nii.gz", ".nii")


def specs_dir() -> Path:
    """Folder of the dataset specs: ``$FSSEG_DATASET_SPECS``, else the shipped ``data_lists/datasets``."""
    return Path(os.environ.get(SPECS_ENV) or shipped_dir("datasets"))


def available_datasets() -> list[str]:
    return sorted(p.stem for p in specs_dir().glob("*.json"))


def _nnunet_label_map(labels: dict, path: Path) -> dict[str, str]:
    """id -> structure name from dataset.json's ``labels``, each id a plain integer."""
    label_map: dict[str, str] = {}
    for key, value in labels.items():
        # v2: name -> id (or a list of ids: a region); v1: id -> name
        name, label = (value, key) if isinstance(value, str) and key.isdigit() else (key, value)
        if name == "ignore":
            raise DataError(
                f"{path}: label 'ignore' (voxels left unannotated) is not supported: fsseg would "
                "train on them as background"
            )
        if isinstance(label, (list, tuple)):
            raise DataError(f"{path}: label '{name}' is region-based ({label}); fsseg reads one id per structure")
        # an integer, never a number truncated to one (1.5 -> 1 would relabel another structure's voxels)
        if isinstance(label, bool) or not (isinstance(label, int) or (isinstance(label, str) and label.isdigit())):
            raise DataError(f"{path}: label '{name}' has id {label!r}, not an integer")
        if str(int(label)) in label_map:
            raise DataError(f"{path}: id {int(label)} is given to both '{label_map[str(int(label))]}' and '{name}'")
        label_map[str(int(label))] = str(name)
    return label_map


def nnunet_spec(root: Path) -> dict:
    """The spec of a dataset in nnU-Net's raw layout, from its ``dataset.json`` (nnU-Net v2, or v1's Task format:
    ``modality`` and id -> name ``labels``).

    Raises:
        DataError: no or an unreadable dataset.json, more than one input channel, region-based labels, or files
            that are not NIfTI.
    """
    path = root / "dataset.json"
    if not path.is_file():
        raise DataError(f"{root}: no dataset.json (an nnU-Net raw dataset is the DatasetXXX_Name folder holding it)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read it ({error})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), dict):
        raise DataError(f"{path}: no 'labels' object")
    channels = meta.get("channel_names", meta.get("modality", {}))
    if not isinstance(channels, dict) or len(channels) != 1:
        raise DataError(
            f"{path}: {len(channels) if isinstance(channels, dict) else 'no'} input channels "
            f"({channels}); fsseg segments single-channel CT"
        )
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in NIFTI_ENDINGS:
        raise DataError(f"{path}: file_ending '{ending}'; fsseg reads NIfTI ({', '.join(NIFTI_ENDINGS)})")
    label_map = _nnunet_label_map(meta["labels"], path)
    suffix = re.escape("_0000" + ending) + "$"
    layouts = [
        {
            "image_glob": f"imagesTr/*_0000{ending}",
            "id_pattern": rf"imagesTr/(?P<id>.+){suffix}",
            "label": f"labelsTr/{{id}}{ending}",
            "split": "train",
        },
        {"image_glob": f"imagesTs/*_0000{ending}", "id_pattern": rf"imagesTs/(?P<id>.+){suffix}", "split": "test"},
    ]
    if (root / "labelsTs").is_dir():  # not part of nnU-Net's layout, but shipped by some datasets
        layouts[1]["label"] = f"labelsTs/{{id}}{ending}"
    spec = {
        "name": root.name,
        "description": str(meta.get("description") or meta.get("name") or f"nnU-Net raw dataset {root.name}"),
        "label_map": label_map,
        "layouts": layouts,
    }
    _check_spec(spec, path)
    return spec


def parse_label_map(text: str) -> dict[str, str]:
    """``--label-map``: ``1=liver,2=spleen``, or a JSON file of id -> name; checked as any list's label map."""
    if text.endswith(".json"):
        try:
            raw = json.loads(Path(text).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"--label-map {text}: cannot read it ({error})") from None
    else:
        pairs = [item.partition("=") for item in text.split(",") if item.strip()]
        if not pairs or any(not sep for _, sep, _ in pairs):
            raise ConfigError(
                f"--label-map '{text}': expected ID=NAME pairs joined by commas (1=liver,2=spleen) or a JSON file"
            )
        raw = {key.strip(): name.strip() for key, _, name in pairs}
    LabelMap.parse(raw, f"--label-map {text}")
    return raw


def scan_folder(root: Path, test_ids: Sequence[str] = ()) -> list[dict]:
    """Cases of a plain folder: ``images/<id>.nii[.gz]``, labelled by ``labels/<id>.nii[.gz]`` where one exists.

    Raises:
        DataError: no images, a label without its image, or a test id that is no labelled case.
    """
    if not (root / "images").is_dir():
        raise DataError(f"{root}: no images/ folder (the plain layout is images/<id>.nii.gz with labels/<id>.nii.gz)")
    images, labels = _nifti_by_stem(root / "images"), _nifti_by_stem(root / "labels")
    if not images:
        raise DataError(f"{root / 'images'}: no NIfTI images (.nii.gz, .nii)")
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise DataError(f"{labels[orphans[0]]}: a label without an image of the same name in images/")
    unknown = sorted(set(test_ids) - set(labels))
    if unknown:
        raise DataError(f"--test-ids {', '.join(unknown)}: no labelled case of that id in {root}")
    cases = []
    for case_id, image in images.items():
        case = {"id": case_id, "image": image.relative_to(root).as_posix()}
        if case_id in labels:
            case["label"] = labels[case_id].relative_to(root).as_posix()
        case["split"] = "train" if case_id in labels and case_id not in test_ids else "test"
        cases.append(case)
    return cases


def _nifti_by_stem(folder: Path) -> dict[str, Path]:
    """The NIfTI files of ``folder`` by id (file name without .nii/.nii.gz); none when it does not exist."""
    if not folder.is_dir():
        return {}
    return {
        nifti_stem(p): p
        for p in sorted(folder.iterdir())
        if p.name.endswith(NIFTI_ENDINGS) and not p.name.startswith(".")
    }


def load_spec(name_or_path: str) -> dict:
    """A dataset spec by name (``btcv``) or by path to its JSON file."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = specs_dir() / f"{name_or_path}.json"
        if not path.is_file():
            raise ConfigError(
                f"unknown dataset '{name_or_path}'; known: {', '.join(available_datasets())} "
                "(or give the path to a spec JSON)"
            )
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: cannot read dataset spec ({error})") from None
    _check_spec(spec, path)
    return spec


def _check_spec(spec: object, path: Path) -> None:
    """Refuse a spec whose fields would fail later, naming the field."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a dataset spec is a JSON object with 'name', 'label_map' and 'layouts'")
    if not isinstance(spec.get("name", ""), str):
        raise ConfigError(f"{path}: 'name' must be a string")
    LabelMap.parse(spec.get("label_map", {}), str(path))
    layouts = spec.get("layouts")
    if not isinstance(layouts, list) or not layouts:
        raise ConfigError(f"{path}: spec has no 'layouts' (a non-empty list)")
    for i, layout in enumerate(layouts):
        where = f"{path}: layout #{i + 1}"
        if not isinstance(layout, dict):
            raise ConfigError(f"{where} must be an object")
        for key in ("image_glob", "id_pattern"):
            if not isinstance(layout.get(key), str) or not layout[key]:
                raise ConfigError(f"{where} lacks '{key}' (a string)")
        try:
            pattern = re.compile(layout["id_pattern"])
        except re.error as error:
            raise ConfigError(f"{where}: id_pattern is not a valid regular expression ({error})") from None
        if "id" not in pattern.groupindex:
            raise ConfigError(f"{where}: id_pattern must capture the case id as (?P<id>...)")
        known = set(pattern.groupindex) | {"dir"}
        for key in ("label", "labels_glob"):
            if key not in layout:
                continue
            if not isinstance(layout[key], str):
                raise ConfigError(f"{where}: '{key}' must be a string")
            fields = {name for _, name, _, _ in string.Formatter().parse(layout[key]) if name is not None}
            if fields - known:
                raise ConfigError(
                    f"{where}: '{key}' uses {{{', '.join(sorted(fields - known))}}}, which the "
                    f"id_pattern does not capture (known: {', '.join(sorted(known))})"
                )
        if layout.get("split", "train") not in SPLITS:
            raise ConfigError(f"{where} has split '{layout['split']}', not one of {', '.join(SPLITS)}")
    csv_spec = spec.get("split_csv")
    if csv_spec is not None and (
        not isinstance(csv_spec, dict) or not all(isinstance(csv_spec.get(k), str) for k in CSV_KEYS)
    ):
        raise ConfigError(f"{path}: 'split_csv' must be an object with {', '.join(CSV_KEYS)} (strings)")


def scan(spec: dict, root: Path) -> list[dict]:
    """Cases of ``spec`` found under ``root`` (ids unique, sorted per layout)."""
    if not root.is_dir():
        raise DataError(f"{root}: dataset root folder not found")
    splits = _read_split_csv(spec.get("split_csv"), root)
    cases, missing = [], []
    for layout in spec["layouts"]:
        pattern = re.compile(layout["id_pattern"])
        for image in sorted(root.glob(layout["image_glob"])):
            relative = image.relative_to(root).as_posix()
            match = pattern.search(relative)
            if not match:
                continue
            fields = {k: v or "" for k, v in match.groupdict().items()}
            fields["dir"] = image.parent.relative_to(root).as_posix()
            case = {"id": fields["id"], "image": relative}
            if "label" in layout:
                label = os.path.normpath(layout["label"].format(**fields))
                if not (root / label).is_file():
                    missing.append(label)
                    continue
                case["label"] = Path(label).as_posix()
            elif "labels_glob" in layout:
                masks = sorted(root.glob(layout["labels_glob"].format(**fields)))
                case["labels"] = {nifti_stem(m): m.relative_to(root).as_posix() for m in masks}
            case["split"] = splits.get(fields["id"], layout.get("split", "train"))
            cases.append(case)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"{root}: {len(missing)} image(s) have no label file: {shown}")
    if not cases:
        globs = ", ".join(layout["image_glob"] for layout in spec["layouts"])
        raise DataError(f"{root}: no images of dataset '{spec.get('name')}' found (looked for {globs})")
    ids = [c["id"] for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(f"{root}: case id(s) found twice: {', '.join(duplicates[:5])}")
    return cases


def _read_split_csv(config: dict | None, root: Path) -> dict[str, str]:
    if not config:
        return {}
    path = root / config["file"]
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        rows = csv.DictReader(handle, delimiter=config.get("delimiter", ","))
        absent = [config[k] for k in ("id_column", "split_column") if config[k] not in (rows.fieldnames or [])]
        if absent:
            raise DataError(f"{path}: no column {', '.join(absent)} (columns: {', '.join(rows.fieldnames or [])})")
        return {
            row[config["id_column"]]: row[config["split_column"]]
            for row in rows
            if row.get(config["split_column"]) in SPLITS
        }


def make_list(
    dataset: str,
    root: str | Path,
    output: str | Path,
    label_map: str | None = None,
    test_ids: Sequence[str] = (),
    force: bool = False,
) -> DataList:
    """Scan ``root`` as ``dataset`` lays out its files and write the data list ``output`` atomically.

    ``dataset`` is a shipped dataset's name, a spec file (``.json``), ``nnunet`` or ``folder``; ``label_map``
    (``1=liver,2=spleen`` or a JSON file) and ``test_ids`` are for ``folder`` alone. Returns the list as read back.

    Raises:
        ConfigError: options that do not fit the dataset.
        DataError: ``output`` would replace an input or an existing file (without ``force``); a scan is missing.
    """
    root = Path(root).expanduser().resolve()
    if dataset != FOLDER and (label_map or test_ids):
        raise ConfigError(f"--label-map and --test-ids are for '{FOLDER}' only; dataset '{dataset}' has its own")
    output = Path(output)
    read: list[str | Path] = [dataset] if dataset.endswith(".json") else []  # files read besides the scans
    read += [root / "dataset.json"] if dataset == NNUNET else []
    read += [label_map] if label_map and label_map.endswith(".json") else []
    check_outputs([output], read)
    check_output_file(output, force)
    if dataset == FOLDER:
        cases = scan_folder(root, test_ids)
        if any("label" in c for c in cases) and not label_map:
            raise ConfigError(f"{root / 'labels'}: give --label-map (e.g. 1=liver) to say what the label ids are")
        spec = {
            "name": root.name,
            "description": f"scans of {root}",
            "label_map": parse_label_map(label_map) if label_map else {},
        }
    else:
        spec = nnunet_spec(root) if dataset == NNUNET else load_spec(dataset)
        cases = scan(spec, root)
    written = {
        "name": spec["name"],
        "description": spec.get("description", ""),
        "root": str(root),
        "label_map": spec.get("label_map", {}),
        "cases": cases,
    }
    with atomic_path(output) as tmp:
        tmp.write_text(json.dumps(written, indent=1) + "\n")
    return load_datalist(output)  # the list written must be one fsseg reads
