"""``fsseg-pretrain``: train a foundation model on partially labelled CT datasets."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fsseg.cli import (
    add_common_arguments,
    add_listing_argument,
    add_output_argument,
    add_run_arguments,
    override,
    run_cli,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsseg-pretrain",
        description="Pretrain a segmentation foundation model (feature extractor + one sigmoid channel per "
        "template structure) on partially labelled CT datasets: each case is supervised only on the structures "
        "its dataset annotates. Multi-GPU: torchrun --nproc_per_node=N -m fsseg.pretrain --config ...",
        epilog="The backbone is the config's model.name (--set model.name=unet); --list-models names them.",
    )
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/pretrain/tiny.yaml")
    parser.add_argument("--data-list", nargs="+", metavar="LIST.json", help="data lists (replace data.lists)")
    parser.add_argument("--data-root", help="base folder for relative paths of lists without a 'root'")
    add_output_argument(parser, "out", "run directory", default="runs/pretrain")
    parser.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="'auto' continues from <out>/checkpoint_latest.pt when present; or a checkpoint path. "
        "optim.epochs may be raised when resuming",
    )
    add_listing_argument(parser, "--list-models", "backbones", _models)
    add_listing_argument(parser, "--help-config", "config keys", _config_keys)
    add_run_arguments(parser, "optim.lr=3e-4")
    add_common_arguments(parser)
    return parser


def _models() -> dict[str, str]:
    from fsseg.models import list_models

    return list_models()


def _config_keys() -> dict[str, str]:
    from fsseg.config import described_keys
    from fsseg.pretrain.config import PretrainConfig

    return described_keys(PretrainConfig)


def _command(args: argparse.Namespace) -> int:
    from fsseg.config import load_config
    from fsseg.pretrain.config import PretrainConfig
    from fsseg.pretrain.engine import pretrain

    overrides = list(args.overrides)
    if args.data_list:
        overrides.append(override("data.lists", args.data_list))
    if args.data_root:
        overrides.append(override("data.data_root", args.data_root))
    config = load_config(PretrainConfig, args.config, overrides)
    pretrain(config, args.out, args.device, args.resume, not args.no_progress)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fsseg-pretrain``."""
    return run_cli("fsseg-pretrain", build_parser(), _command, argv)


if __name__ == "__main__":
    sys.exit(main())
