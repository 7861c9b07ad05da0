"""``fsseg-inspect``: the command line over :mod:`fsseg.checkpoint_info`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fsseg.cli import add_common_arguments, run_cli
from fsseg.errors import DataError
from fsseg.files import require_file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsseg-inspect",
        description="Print what an fsseg checkpoint or adapter "
        "file holds: architecture, parameters per block, template, preprocessing, versions.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="checkpoint(s) or adapter file(s)")
    add_common_arguments(parser)
    return parser


def _command(args: argparse.Namespace) -> int:
    from fsseg.adapters.artifact import is_safetensors, read_adapter_file
    from fsseg.checkpoint import FORMAT, load_torch_file
    from fsseg.checkpoint_info import describe

    for path in args.files:
        payload = read_adapter_file(path) if is_safetensors(require_file(path)) else load_torch_file(path, "file")
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise DataError(
                f"{path}: not an fsseg checkpoint or adapter (convert published weights with fsseg-import-checkpoint)"
            )
        print(describe(payload, str(path)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fsseg-inspect``."""
    return run_cli("fsseg-inspect", build_parser(), _command, argv)


if __name__ == "__main__":
    sys.exit(main())
