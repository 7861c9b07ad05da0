"""``fsseg-adapt``: few-shot adaptation of a pretrained model to new structures, compared across methods."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fsseg.cli import (
    add_checkpoint_argument,
    add_common_arguments,
    add_listing_argument,
    add_output_argument,
    add_run_arguments,
    add_structures_argument,
    override,
    run_cli,
)
from fsseg.errors import ConfigError
from fsseg.outputs import check_outputs
from fsseg.resources import shipped_dir

# The shipped default run config (the demo's outputs); the data paths inside it are relative to the working folder.
DEFAULT_CONFIG = "configs/adapt/default.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsseg-adapt",
        description="Adapt a pretrained fsseg model to target structures from K labelled scans (several seeds), "
        "with each method, then predict and score every test case in its native space. Prints a table "
        "(method x K, mean ± std over seeds) and writes results.json, results.csv and adapter files.",
        epilog=f"Methods (each with its settings in configs/adapt/<method>.yaml): {', '.join(shipped_methods())}; "
        "--list-methods says what each trains.",
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="run config (default: configs/adapt/default.yaml: the demo's model and liver task)",
    )
    add_checkpoint_argument(parser, "checkpoint", "pretrained fsseg checkpoint")
    parser.add_argument("--data-list", help="data list with train (support pool) and test cases")
    parser.add_argument("--data-root", help="base folder for relative paths of lists without a 'root'")
    add_structures_argument(parser, "organ", "target structure(s), aliases accepted")
    parser.add_argument("--shots", type=int, nargs="+", metavar="K", help="support-set sizes, e.g. 1 5 10")
    parser.add_argument("--method", nargs="+", metavar="NAME", help="adaptation method(s), e.g. lp adapter")
    add_listing_argument(parser, "--list-methods", "adaptation methods", _methods)
    add_listing_argument(parser, "--help-config", "keys of the run config and of a method's settings", _config_keys)
    parser.add_argument("--seeds", type=int, help="support draws per K (seeds 0..N-1)")
    parser.add_argument(
        "--ti",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="transductive organ-size constraint on each test case (frozen-backbone methods)",
    )
    add_output_argument(parser, "out", "run directory", default="runs/adapt")
    parser.add_argument(
        "--continue",
        dest="resume",
        action="store_true",
        help="keep the (method, K, seed) runs that OUT/results.json already holds for the same "
        "checkpoint, data list, structures and method settings; run only the rest",
    )
    sweep = parser.add_argument_group(
        "sweeps over several machines",
        "Split the (method, K, seed) runs into P disjoint parts (e.g. a SLURM array: --num-parts 8 --part-id "
        "$SLURM_ARRAY_TASK_ID --out runs/sweep/part$SLURM_ARRAY_TASK_ID), then combine them: fsseg-adapt --merge "
        "runs/sweep/part* --out runs/sweep/all. Every run is seeded from its own identity, so the merged results "
        "equal one run of the whole sweep.",
    )
    sweep.add_argument("--num-parts", type=int, default=1, metavar="P", help="parts the sweep is split into")
    sweep.add_argument("--part-id", type=int, default=0, metavar="I", help="which part this is, 0..P-1")
    sweep.add_argument(
        "--merge", nargs="+", metavar="DIR", help="merge the parts' run directories into --out (nothing is trained)"
    )
    add_run_arguments(parser, "ti.gamma=0.5")
    add_common_arguments(parser)
    return parser


def shipped_methods() -> list[str]:
    """The methods whose settings ship in configs/adapt/ (every registered method's, as a test checks)."""
    return sorted(path.stem for path in (shipped_dir("configs") / "adapt").glob("*.yaml") if path.stem != "default")


def _methods() -> dict[str, str]:
    from fsseg.adapters import list_methods

    return list_methods()


def _config_keys() -> dict[str, str]:
    from fsseg.adapt.config import AdaptConfig, MethodSettings
    from fsseg.config import described_keys

    return described_keys(AdaptConfig) | described_keys(MethodSettings, "<method>.yaml: ")


def _command(args: argparse.Namespace) -> int:
    from fsseg.adapt.config import AdaptConfig
    from fsseg.adapt.engine import adapt
    from fsseg.adapt.merge import merge_parts
    from fsseg.adapt.results import RUN_FILES
    from fsseg.config import load_config

    if not 0 <= args.part_id < args.num_parts:
        raise ConfigError(
            f"--part-id must lie in 0..{args.num_parts - 1} (--num-parts {args.num_parts}), got {args.part_id}"
        )
    if args.merge:
        merge_parts(args.merge, args.out)
        print(f"merged {len(args.merge)} part(s): {Path(args.out) / 'results.csv'}, {Path(args.out) / 'results.json'}")
        return 0
    overrides = list(args.overrides)
    for key, value in (
        ("checkpoint", args.checkpoint),
        ("data_list", args.data_list),
        ("data_root", args.data_root),
        ("organs", args.organ),
        ("shots", args.shots),
        ("methods", args.method),
        ("seeds", args.seeds),
        ("ti.enabled", args.ti),
    ):
        if value is not None:
            overrides.append(override(key, value))
    config = load_config(AdaptConfig, args.config, overrides)
    # the run config may be the one a run wrote: its config.yaml is replaced when the run starts
    check_outputs([Path(args.out) / name for name in RUN_FILES], [args.config], option="--out")
    adapt(config, args.out, args.device, not args.no_progress, args.resume, (args.part_id, args.num_parts))
    out = Path(args.out)
    print(f"results: {out / 'results.csv'}, {out / 'results.json'}; adapters in {out / 'adapters'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fsseg-adapt``."""
    return run_cli("fsseg-adapt", build_parser(), _command, argv)


if __name__ == "__main__":
    sys.exit(main())
