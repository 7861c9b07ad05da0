"""``fsseg-predict``: the command line over :mod:`fsseg.inference.predict`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fsseg.cli import (
    add_checkpoint_argument,
    add_common_arguments,
    add_device_argument,
    add_inference_arguments,
    add_output_argument,
    add_structures_argument,
    inference_options,
    number_in,
    run_cli,
)
from fsseg.vocabulary import OUTPUT_TYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsseg-predict",
        description="Segment every scan of a folder (NIfTI, NRRD and MetaImage files, DICOM series folders) with an "
        "fsseg checkpoint. Each output label map (uint8, <case>.nii.gz, or .nrrd/.mha for such a scan: the case id "
        "for a data list, the file name otherwise) has its input's exact shape, "
        "affine and header; labels.json names the ids and predictions.json reports each case. Preprocessing comes "
        "from the checkpoint.",
    )
    parser.add_argument(
        "-i",
        "--input",
        required=True,
        help="a folder of scans (NIfTI files and/or DICOM series subfolders), one scan (a NIfTI file or "
        "a folder holding one DICOM CT series), or a data list (.json) whose --split cases are predicted",
    )
    parser.add_argument("--split", default="test", help="with a data list as input: which split (default test)")
    parser.add_argument("--data-root", help="with a data list: base folder for relative paths without a 'root'")
    add_output_argument(parser, "output", "output folder (created); it must not hold any input", required=True)
    add_checkpoint_argument(parser, "model", "fsseg checkpoint (.pt)", required=True)
    parser.add_argument(
        "--adapter",
        nargs="+",
        metavar="FILE",
        help="adapter file(s) written by fsseg-adapt for this checkpoint: predict their structures",
    )
    add_structures_argument(parser, "organs", "structures to predict (default: all)")
    add_device_argument(parser)
    parser.add_argument(
        "--continue", dest="resume", action="store_true", help="skip cases whose output already exists and is valid"
    )
    parser.add_argument(
        "--num-parts", type=number_in("[1, inf)", int), default=1, help="split the cases into this many parts"
    )
    parser.add_argument(
        "--part-id", type=number_in("[0, inf)", int), default=0, help="which part this process predicts (0-based)"
    )
    add_output_options(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_inference_arguments(parser)
    add_common_arguments(parser)
    return parser


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """What fsseg-predict writes for each case besides its label map."""
    parser.add_argument(
        "--output-type",
        nargs="+",
        choices=OUTPUT_TYPES,
        default=["nifti"],
        metavar="TYPE",
        help="what each mask is written as: nifti (<case>.nii.gz, the default) and/or dicom-seg "
        "(<case>.seg.dcm, one segment per structure, referencing the source series: DICOM input only; "
        "needs pip install 'fsseg[dicom]')",
    )
    parser.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write <case>_probabilities.nii.gz (float32, one volume per structure)",
    )
    parser.add_argument(
        "--flag-below",
        type=number_in("[0, 1]"),
        metavar="C",
        help="mark a case for review when one of its structures has a confidence below C (predictions.json lists "
        "them under 'review'; each structure's confidence and the facts behind it are there in any case)",
    )
    parser.add_argument(
        "--preview",
        action="store_true",
        help="also write <case>_preview.png: axial/coronal/sagittal slices with the predicted contours "
        "(needs matplotlib: pip install -e .[viz])",
    )


def _command(args: argparse.Namespace) -> int:
    from fsseg.inference.predict import FolderOptions, predict_folder
    from fsseg.inference.record import REPORT

    options = FolderOptions(
        output_types=args.output_type,
        save_probabilities=args.save_probabilities,
        preview=args.preview,
        resume=args.resume,
        part=(args.part_id, args.num_parts),
        progress=not args.no_progress,
        inference=inference_options(args),
        flag_below=args.flag_below,
    )
    cases = predict_folder(
        args.input,
        args.output,
        args.model,
        args.adapter or (),
        args.organs,
        options,
        args.device,
        args.split,
        args.data_root,
    )
    done, skipped, failed = (sum(c["status"] == s for c in cases.values()) for s in ("ok", "skipped", "failed"))
    print(f"{done} predicted, {skipped} skipped, {failed} failed; masks and {REPORT} in {args.output}")
    flagged = {case: entry["review"] for case, entry in cases.items() if entry.get("review")}
    for case, structures in flagged.items():
        print(f"review {case}: confidence below {args.flag_below} for {', '.join(structures)}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fsseg-predict``."""
    return run_cli("fsseg-predict", build_parser(), _command, argv)


if __name__ == "__main__":
    sys.exit(main())
