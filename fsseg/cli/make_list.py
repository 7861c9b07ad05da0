"""``fsseg-make-list``: the command line over :mod:`fsseg.data.make_list`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fsseg.cli import add_common_arguments, add_output_argument, run_cli
from fsseg.data.datalist import SPLITS, load_datalist
from fsseg.data.io import atomic_path
from fsseg.data.make_list import (
    FOLDER,
    NNUNET,
    available_datasets,
    load_spec,
    nnunet_spec,
    parse_label_map,
    scan,
    scan_folder,
    specs_dir,
)
from fsseg.errors import ConfigError
from fsseg.outputs import check_output_file, check_outputs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsseg-make-list",
        description="Scan a dataset's standard folder layout and write an fsseg data list (JSON). "
        "Then run fsseg-check-data on it.",
        epilog=f"Known datasets (specs in {specs_dir()}): {', '.join(available_datasets())}; and {NNUNET}, "
        f"{FOLDER}. Examples: fsseg-make-list {NNUNET} --root nnUNet_raw/Dataset003_Liver -o lists/liver.json; "
        f"fsseg-make-list {FOLDER} --root my_scans --label-map 1=liver --test-ids case_09 -o lists/mine.json",
    )
    parser.add_argument(
        "dataset",
        help="dataset name (see below), path to a dataset spec JSON, 'nnunet' for a "
        "dataset in nnU-Net's raw layout (--root DatasetXXX_Name, read through its dataset.json), or "
        f"'{FOLDER}' for a plain folder: images/<id>.nii.gz, and labels/<id>.nii.gz for the "
        "labelled scans",
    )
    parser.add_argument("--root", required=True, help="the dataset's folder, as downloaded/unpacked")
    add_output_argument(parser, "output", "data list to write (LIST.json)", required=True)
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    parser.add_argument(
        "--label-map", help=f"{FOLDER} only: what the label ids are, as 1=liver,2=spleen or a JSON file of id -> name"
    )
    parser.add_argument(
        "--test-ids",
        nargs="+",
        default=[],
        metavar="ID",
        help=f"{FOLDER} only: labelled cases to hold out as test cases (scored, never supports); "
        "the other labelled cases are support candidates, unlabelled ones test cases to predict",
    )
    add_common_arguments(parser)
    return parser


def _command(args: argparse.Namespace) -> int:
    root = Path(args.root).expanduser().resolve()
    if args.dataset != FOLDER and (args.label_map or args.test_ids):
        raise ConfigError(f"--label-map and --test-ids are for '{FOLDER}' only; dataset '{args.dataset}' has its own")
    output = Path(args.output)
    read = [args.dataset] if args.dataset.endswith(".json") else []  # files the command reads besides the scans
    read += [root / "dataset.json"] if args.dataset == NNUNET else []
    read += [args.label_map] if args.label_map and args.label_map.endswith(".json") else []
    check_outputs([output], read)
    check_output_file(output, args.force)
    if args.dataset == FOLDER:
        cases = scan_folder(root, args.test_ids)
        if any("label" in c for c in cases) and not args.label_map:
            raise ConfigError(f"{root / 'labels'}: give --label-map (e.g. 1=liver) to say what the label ids are")
        spec = {
            "name": root.name,
            "description": f"scans of {root}",
            "label_map": parse_label_map(args.label_map) if args.label_map else {},
        }
    else:
        spec = nnunet_spec(root) if args.dataset == NNUNET else load_spec(args.dataset)
        cases = scan(spec, root)
    datalist = {
        "name": spec["name"],
        "description": spec.get("description", ""),
        "root": str(root),
        "label_map": spec.get("label_map", {}),
        "cases": cases,
    }
    with atomic_path(output) as tmp:
        tmp.write_text(json.dumps(datalist, indent=1) + "\n")
    load_datalist(output)  # the list we wrote must be one we can read
    counts = {split: sum(c["split"] == split for c in cases) for split in SPLITS}
    print(f"wrote {output}: {len(cases)} cases ({', '.join(f'{n} {s}' for s, n in counts.items() if n)})")
    print(f"next: fsseg-check-data {output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fsseg-make-list``."""
    return run_cli("fsseg-make-list", build_parser(), _command, argv)


if __name__ == "__main__":
    sys.exit(main())
