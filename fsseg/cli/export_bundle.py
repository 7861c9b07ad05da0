"""``fsseg-export-bundle``: the command line over :func:`fsseg.export_bundle.export_checkpoint`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fsseg.cli import (
    add_checkpoint_argument,
    add_common_arguments,
    add_inference_arguments,
    add_output_argument,
    add_structures_argument,
    inference_options,
    run_cli,
)
from fsseg.vocabulary import BUNDLE_MASK_POSTFIX


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsseg-export-bundle",
        description="Export an fsseg checkpoint, with its adapters, as a MONAI bundle (configs/metadata.json, "
        "configs/inference.json, models/model.pt) that segments a folder of NIfTI scans with the masks fsseg-predict "
        "writes: python -m monai.bundle run --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE "
        f"--dataset_dir SCANS (masks <scan>_{BUNDLE_MASK_POSTFIX}.nii.gz in BUNDLE/eval, or --output_dir). "
        "fsseg must be installed where the bundle runs.",
    )
    add_checkpoint_argument(parser, "model", "fsseg checkpoint (.pt)", required=True)
    parser.add_argument(
        "--adapter", nargs="+", metavar="FILE", help="adapter file(s) of fsseg-adapt for this checkpoint"
    )
    add_structures_argument(parser, "organs", "structures to predict (default: all)")
    add_output_argument(parser, "output", "the bundle folder to create (it must not exist)", required=True)
    add_inference_arguments(parser)
    add_common_arguments(parser)
    return parser


def _command(args: argparse.Namespace) -> int:
    from fsseg.export_bundle import export_checkpoint

    out = export_checkpoint(args.model, args.output, args.adapter or (), args.organs, inference_options(args))
    print(
        f"wrote {out}: run it with python -m monai.bundle run --config_file {out / 'configs' / 'inference.json'} "
        f"--bundle_root {out} --dataset_dir SCANS"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fsseg-export-bundle``."""
    return run_cli("fsseg-export-bundle", build_parser(), _command, argv)


if __name__ == "__main__":
    sys.exit(main())
