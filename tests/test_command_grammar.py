"""One command-line grammar: every console script's parser walked, as a new user meets them one after another."""

from __future__ import annotations

import argparse
import configparser
import importlib
import subprocess
import sys

import pytest

import fsseg
from conftest import REPO


def console_scripts() -> dict[str, str]:
    """Each command of setup.cfg and the module that holds its parser."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = [line.split("=") for line in config["options.entry_points"]["console_scripts"].strip().splitlines()]
    return {name.strip(): target.strip().split(":")[0] for name, target in lines}


COMMANDS = console_scripts()
# Each concept's spellings, the first the one usage shows; a command that takes the concept accepts them all.
SPELLINGS = {
    "checkpoint": ("--checkpoint", "-m", "--model"),
    "output": ("--out", "-o", "--output"),
    "structures": ("--organ", "--organs", "--structures"),
}
EVERYWHERE = ("--version", "--debug", "--quiet")


def parser_of(command: str) -> argparse.ArgumentParser:
    return importlib.import_module(COMMANDS[command]).build_parser()


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


def test_the_walk_covers_every_command():
    assert len(COMMANDS) == 11 and all(name.startswith("fsseg-") for name in COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_version_debug_and_quiet(command, capsys):
    parser = parser_of(command)
    assert set(EVERYWHERE) <= set(options(parser)), command
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"{command} {fsseg.__version__}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_one_spelling_for_each_concept_with_the_old_ones_as_aliases(command):
    found = options(parser_of(command))
    for concept, spellings in SPELLINGS.items():
        actions = {found.get(spelling) for spelling in spellings}
        if actions == {None}:
            continue  # the command does not take it
        assert None not in actions and len(actions) == 1, f"{command} {concept}: accepts only part of {spellings}"
        assert next(iter(actions)).option_strings[0] == spellings[0], f"{command} {concept}: shown as another"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_and_shows_its_default(command):
    parser = parser_of(command)
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        assert action.help, f"{command} {action.option_strings or action.dest}: no help text"
        if action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings:
            shown = parser._get_formatter()._expand_help(action)
            assert "default" in shown, f"{command} {action.option_strings[0]}: default {action.default!r} not shown"


# Modules of seconds to import (MONAI alone takes several: it imports transformers and ignite when present).
HEAVY = ("torch", "monai", "SimpleITK", "nibabel", "scipy", "pydicom", "highdicom", "peft")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_is_fast_because_building_a_parser_imports_nothing_heavy(command):
    probe = (
        f"import importlib, sys; importlib.import_module({COMMANDS[command]!r}).build_parser().format_help(); "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert found.stdout.strip() == "[]", f"{command} --help imports {found.stdout.strip()}"


@pytest.mark.parametrize(
    ("command", "flag", "name"), [("fsseg-adapt", "--list-methods", "lp"), ("fsseg-pretrain", "--list-models", "unet")]
)
def test_the_listing_flags_name_each_registered_component_with_its_description(command, flag, name, capsys):
    with pytest.raises(SystemExit) as stop:
        parser_of(command).parse_args([flag])
    listed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert stop.value.code == 0 and listed[name]


def test_the_method_names_in_adapt_help_are_the_registered_ones():
    from fsseg.adapt.cli import shipped_methods
    from fsseg.adapters import list_methods

    assert shipped_methods() == sorted(list_methods())


def test_the_nnunet_checkpoint_file_default_is_the_importers():
    from fsseg.importing_nnunet import CHECKPOINT

    assert options(parser_of("fsseg-import-checkpoint"))["--checkpoint-name"].default == CHECKPOINT


def test_a_mistyped_method_is_refused_before_anything_is_written(tmp_path, capsys):
    from fsseg.adapt.cli import main as adapt

    assert adapt(["--method", "adaptor", "--out", str(tmp_path / "run")]) == 2
    assert "unknown method 'adaptor' (did you mean adapter" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_mistyped_structure_is_answered_with_the_name_it_resembles(phantom_dir, tiny_checkpoint, tmp_path, capsys):
    from fsseg.adapt.cli import main as adapt
    from fsseg.cli.predict import main as predict

    target = str(phantom_dir / "phantom_target.json")
    assert (
        predict(["-i", target, "--out", str(tmp_path / "p"), "--checkpoint", str(tiny_checkpoint), "--organ", "livr"])
        == 2
    )
    assert "(did you mean liver?)" in capsys.readouterr().err
    assert (
        adapt(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--data-list",
                target,
                "--organ",
                "gallblader",
                "--out",
                str(tmp_path / "a"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "(did you mean gallbladder?)" in capsys.readouterr().err


def test_the_nnunet_channel_suffix_is_stripped_from_output_names(tiny_checkpoint, tmp_path):
    import numpy as np

    from conftest import ct_like, write_nifti
    from fsseg.cli.predict import main as predict

    write_nifti(tmp_path / "scans" / "case_7_0000.nii.gz", ct_like((20, 20, 16)), np.diag([4.0, 4.0, 4.0, 1.0]))
    assert (
        predict(
            [
                "-i",
                str(tmp_path / "scans"),
                "--out",
                str(tmp_path / "masks"),
                "--checkpoint",
                str(tiny_checkpoint),
                "--organ",
                "liver",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tmp_path / "masks" / "case_7.nii.gz").is_file()
