"""``fsseg-import-checkpoint``: the command line over :mod:`fsseg.importing`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fsseg.checkpoint import save_checkpoint, sha256_file
from fsseg.cli import add_common_arguments, add_output_argument, run_cli
from fsseg.data.io import remove_leftovers
from fsseg.importing import (
    LAYOUTS,
    convert,
    detect_layout,
    read_published,
)
from fsseg.importing_nnunet import CHECKPOINT, import_nnunet
from fsseg.outputs import check_output_file, check_outputs
from fsseg.templates import load_template


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
        choices=["auto", *LAYOUTS, "nnunet"],
        help="its key layout (default auto: detected from the keys, and said; nnunet for a folder)",
    )
    parser.add_argument("--fold", default="0", help="with --format nnunet: the fold to import (0-4, or all)")
    parser.add_argument(
        "--checkpoint-name",
        default=CHECKPOINT,
        help=f"with --format nnunet: the checkpoint file in fold_N/ (default {CHECKPOINT})",
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
    output = Path(args.output)
    source = Path(args.source)
    # a results folder's files are inputs too: --force never replaces its plans.json or checkpoint_final.pth
    check_outputs([output], [source, *(p for p in source.rglob("*") if p.is_file())] if source.is_dir() else [source])
    check_output_file(output, args.force)
    remove_leftovers(output)  # a killed import's temporary file
    if args.format == "nnunet" or args.format == "auto" and Path(args.source).is_dir():
        payload = import_nnunet(args.source, args.fold, args.checkpoint_name, args.orientation, args.unsafe_load)
        save_checkpoint(output, payload)
        print(f"wrote {output}: nnunet, template {payload['template']['name']}")
        return 0
    state = read_published(args.source, args.unsafe_load)
    if args.format == "auto":
        layout = detect_layout(state)
        print(f"format: {layout.name} (detected from the keys)")
    else:
        layout = LAYOUTS[args.format]
    template = load_template(args.template or layout.template)
    model, coverage = convert(state, layout, template, args.drop_head)
    save_checkpoint(
        output,
        {
            "kind": "imported",
            "arch": model.arch,
            "template": template.to_dict(),
            "head_trained": model.head_trained,
            "decoder_trained": model.decoder_trained,
            "preprocessing": layout.preprocessing.to_dict(),
            "state_dict": model.state_dict(),
            "source": {
                "file": str(Path(args.source).resolve()),
                "sha256": sha256_file(args.source),
                "format": layout.name,
            },
        },
    )
    print(f"wrote {output}: {model.arch['name']} {model.arch['kwargs']}, template {template.name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fsseg-import-checkpoint``."""
    return run_cli("fsseg-import-checkpoint", build_parser(), _command, argv)


if __name__ == "__main__":
    sys.exit(main())
