"""``fsseg-import-checkpoint``: the command line over :func:`fsseg.importing.import_checkpoint`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fsseg.cli import add_common_arguments, add_output_argument, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsseg-import-checkpoint",
        description="Convert published weights (FSEFT, CLIP-Driven Universal Model, SuPreM, MONAI self-supervised "
        "Swin, Merlin's I3ResNet-152 CT encoder) or an nnU-Net v2 results folder (TotalSegmentator's too) into an "
        "fsseg checkpoint, with a coverage report. Fails when any backbone tensor is missing or mismatched.",
    )
    parser.add_argument(
        "source",
        help="the published file (.pt/.pth), or an nnU-Net results folder "
        "(Trainer__Plans__Configuration, holding plans.json, dataset.json and fold_N/)",
    )
    parser.add_argument(
        "--format",
        default="auto",
        help="its key layout: auto (detected from the keys, and said; nnunet for a folder), nnunet, or a "
        "published layout by name (fseft, clip-driven, ...: docs/models.md lists them)",
    )
    parser.add_argument("--fold", default="0", help="with --format nnunet: the fold to import (0-4, or all)")
    parser.add_argument(
        "--checkpoint-name",
        default="checkpoint_final.pth",
        help="with --format nnunet: the checkpoint file in fold_N/",
    )
    parser.add_argument(
        "--orientation",
        default="RAS",
        help="with --format nnunet: the orientation the training images were stored in (default RAS, "
        "TotalSegmentator's; nnU-Net does not reorient, so the model expects that orientation)",
    )
    add_output_argument(parser, "output", "fsseg checkpoint to write", required=True)
    parser.add_argument("--template", help="structure template of the head (default: the layout's own)")
    parser.add_argument(
        "--drop-head",
        action="store_true",
        help="import the backbone alone when the head is missing or does not fit the template",
    )
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="allow files that pickle non-tensor objects (only for files from a source you trust)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    add_common_arguments(parser)
    return parser


def _command(args: argparse.Namespace) -> int:
    from fsseg.importing import import_checkpoint

    imported = import_checkpoint(
        args.source,
        args.output,
        args.format,
        args.template,
        args.drop_head,
        args.unsafe_load,
        args.force,
        args.fold,
        args.checkpoint_name,
        args.orientation,
    )
    if imported.detected and imported.layout != "nnunet":
        print(f"format: {imported.layout} (detected from the keys)")
    what = "nnunet" if imported.layout == "nnunet" else f"{imported.arch['name']} {imported.arch['kwargs']}"
    print(f"wrote {imported.path}: {what}, template {imported.template}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fsseg-import-checkpoint``."""
    return run_cli("fsseg-import-checkpoint", build_parser(), _command, argv)


if __name__ == "__main__":
    sys.exit(main())
