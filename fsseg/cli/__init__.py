"""Shared plumbing for the command-line entry points: one-line errors, ``--debug``, exit codes."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any, Callable

from fsseg.config import as_yaml, check_interval
from fsseg.errors import FssegError, user_error
from fsseg.vocabulary import DEVICES

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def number_in(interval: str, kind: type = float) -> Callable[[str], float | int]:
    """An argparse ``type`` for a number in ``interval`` (``"[0, 1)"``, ``"[1, inf)"``): out of range is a usage
    error naming the option, not a traceback later."""

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got '{text}'"
            ) from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
        try:
            check_interval(value, interval, "the value")
        except FssegError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value

    parse.__name__ = kind.__name__  # argparse names the expected type after the function
    return parse


# One spelling for each concept across the commands: the first is the one --help shows, the others are kept as
# aliases (the spellings of earlier releases and of other commands).
CHECKPOINT_FLAGS = ("--checkpoint", "-m", "--model")
OUTPUT_FLAGS = ("--out", "-o", "--output")
STRUCTURE_FLAGS = ("--organ", "--organs", "--structures")


class HelpFormatter(argparse.HelpFormatter):
    """Each option's default appended to its help, unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        quiet: tuple = (None, False, [], argparse.SUPPRESS)
        if "default" in text or action.default in quiet or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags every fsseg command shares, and show every option's default in ``--help``."""
    from fsseg import __version__

    parser.formatter_class = HelpFormatter
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    parser.add_argument("--quiet", action="store_true", help="only print warnings and errors")


def add_listing_argument(parser: argparse.ArgumentParser, flag: str, what: str, listing: Callable[[], dict]) -> None:
    """A flag that prints each name of ``listing()`` with its description, and exits. The registries behind such
    listings import torch: only when asked, so that ``--help`` stays fast."""

    class Listing(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            for name, text in listing().items():
                print(f"{name}: {text}")
            parser.exit()

    parser.add_argument(flag, action=Listing, nargs=0, help=f"list the {what}, each with what it does, and exit")


def add_checkpoint_argument(parser: argparse.ArgumentParser, dest: str, help: str, **kwargs: Any) -> None:
    """The fsseg checkpoint a command reads: ``--checkpoint`` (``-m``, ``--model``)."""
    parser.add_argument(*CHECKPOINT_FLAGS, dest=dest, metavar="CKPT", help=help, **kwargs)


def add_output_argument(parser: argparse.ArgumentParser, dest: str, help: str, **kwargs: Any) -> None:
    """What a command writes: ``--out`` (``-o``, ``--output``)."""
    parser.add_argument(*OUTPUT_FLAGS, dest=dest, help=help, **kwargs)


def add_structures_argument(parser: argparse.ArgumentParser, dest: str, help: str, **kwargs: Any) -> None:
    """The structures a command works on: ``--organ`` (``--organs``, ``--structures``), names or aliases."""
    parser.add_argument(*STRUCTURE_FLAGS, dest=dest, nargs="+", metavar="NAME", help=help, **kwargs)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device auto|cpu|cuda``."""
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="auto: CUDA when available, else CPU (pick the GPU with CUDA_VISIBLE_DEVICES)",
    )


def add_run_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """Flags of the training stages: ``--set`` overrides, ``--device`` and ``--no-progress``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {example} (repeatable)",
    )
    add_device_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and clusters)")


def override(key: str, value: object) -> str:
    """A ``key=value`` override whose value is written as YAML (lists, strings with quotes, booleans)."""
    return f"{key}={as_yaml(value)}"


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The sliding-window and label-map options (fsseg-predict's, and fsseg-export-bundle's for its bundle)."""
    parser.add_argument(
        "--overlap",
        type=number_in("[0, 1)"),
        help="sliding-window overlap in [0, 1) (default: what the adapters were scored with in fsseg-adapt, else 0.5)",
    )
    parser.add_argument(
        "--sw-batch-size",
        type=number_in("[1, inf)", int),
        help="windows per forward pass (default 4 on CUDA; on the CPU 2 for a roi of at most 64^3 voxels, else 1)",
    )
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        help="float16 autocast on CUDA (default: the adapters' setting, else on; no effect on the CPU)",
    )
    parser.add_argument(
        "--cpu-bf16",
        action=argparse.BooleanOptionalAction,
        help="bfloat16 autocast on the CPU: faster where the CPU has bfloat16 instructions, with "
        "slightly different probabilities (default: the adapters' setting, else off; "
        "predictions.json records the precision used)",
    )
    parser.add_argument(
        "--largest-component", action="store_true", help="keep the largest connected component of each structure"
    )


def inference_options(args: argparse.Namespace) -> dict[str, Any]:
    """What :func:`add_inference_arguments`' flags set, as the library's ``inference`` mapping (None: unset)."""
    names = ("overlap", "sw_batch_size", "amp", "cpu_bf16", "largest_component")
    return {name: getattr(args, name) for name in names}


def run_cli(
    prog: str,
    parser: argparse.ArgumentParser,
    command: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv`` and run ``command``, turning user errors into one line on stderr.

    Returns the process exit code: the command's own code, 2 for a user error, 130 on Ctrl-C.
    """
    args = parser.parse_args(argv)
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    try:
        return command(args)
    except Exception as error:
        found = user_error(error)
        if found is None or getattr(args, "debug", False):
            raise
        print(f"{prog}: error: {found}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
