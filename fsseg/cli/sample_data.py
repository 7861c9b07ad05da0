"""``fsseg-sample-data``: the command line over :mod:`fsseg.data.samples`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fsseg.cli import add_common_arguments, add_output_argument, run_cli
from fsseg.data.samples import (
    write_sample_data,
)
from fsseg.outputs import prepare_output_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsseg-sample-data",
        description="Write the real CT that ships with fsseg (five abdominal scans of four subjects with organ "
        "labels, 13.5 MB; provenance and licences in its README.md) with data lists ready for fsseg-check-data, "
        "fsseg-pretrain and fsseg-adapt. Files already there are kept when identical; a different file of the "
        "same name is an error.",
    )
    add_output_argument(
        parser,
        "out",
        "output folder: the data lists, and the scans with README.md and manifest.json in ct/",
        required=True,
    )
    add_common_arguments(parser)
    return parser


def _command(args: argparse.Namespace) -> int:
    written = write_sample_data(prepare_output_dir(args.out, "--out"))
    print(f"sample CT in {written.folder} (provenance and licences: {written.folder / 'README.md'})")
    for path in written.lists.values():
        print(f"  data list {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fsseg-sample-data``."""
    return run_cli("fsseg-sample-data", build_parser(), _command, argv)


if __name__ == "__main__":
    sys.exit(main())
