"""``fsseg-make-list``: the command line over :func:`fsseg.data.make_list.make_list`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fsseg.cli import add_common_arguments, add_output_argument, run_cli
from fsseg.data.datalist import SPLITS
from fsseg.data.make_list import FOLDER, NNUNET, available_datasets, make_list, specs_dir


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
    written = make_list(args.dataset, args.root, args.output, args.label_map, args.test_ids, args.force)
    counts = {split: len(written.split(split)) for split in SPLITS}
    print(f"wrote {args.output}: {len(written.cases)} cases ({', '.join(f'{n} {s}' for s, n in counts.items() if n)})")
    print(f"next: fsseg-check-data {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fsseg-make-list``."""
    return run_cli("fsseg-make-list", build_parser(), _command, argv)


if __name__ == "__main__":
    sys.exit(main())
