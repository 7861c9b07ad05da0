"""``fsseg-export-bundle``: the command line over :mod:`fsseg.export_bundle`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fsseg.cli import (
    add_checkpoint_argument,
    add_common_arguments,
    add_inference_arguments,
    add_output_argument,
    add_structures_argument,
    run_cli,
)
from fsseg.errors import DataError
from fsseg.export_bundle import (
    OUTPUT_POSTFIX,
    export_bundle,
)
from fsseg.inference.predict import build_model, inference_settings
from fsseg.outputs import check_outputs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsseg-export-bundle",
        description="Export an fsseg checkpoint, with its adapters, as a MONAI bundle (configs/metadata.json, "
        "configs/inference.json, models/model.pt) that segments a folder of NIfTI scans with the masks fsseg-predict "
        "writes: python -m monai.bundle run --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE "
        f"--dataset_dir SCANS (masks <scan>_{OUTPUT_POSTFIX}.nii.gz in BUNDLE/eval, or --output_dir). fsseg must be "
        "installed where the bundle runs.",
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
    out = Path(args.output)
    if out.exists():
        raise DataError(f"{out}: already exists; give a new folder for the bundle")
    check_outputs([out], [args.model, *(args.adapter or [])], option="--out")
    model = build_model(args.model, args.adapter, args.organs, torch.device("cpu"))
    export_bundle(model, args.model, args.adapter or [], inference_settings(vars(args), model.recorded), out)
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
