"""One guard for every command that writes: outputs never replace inputs, and bad output paths fail at start-up.

Each writing command names its inputs and its planned outputs before its first write; :func:`check_outputs`
refuses any output that is (or links to) an input, and any output folder that holds an input file, since the
command would then mix its files with the user's data. :func:`prepare_output_dir` and
:func:`check_output_file` turn unwritable folders, files in the place of folders and folders in the place of
files into one line at start-up instead of a traceback hours later.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import yaml

from fsseg.errors import DataError


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of an existing file: the same for every link to it, hard links included."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def check_outputs(
    outputs: Iterable[str | Path],
    inputs: Iterable[str | Path],
    folder: str | Path | None = None,
    option: str = "--output",
) -> None:
    """Refuse outputs that would replace an input, and an output ``folder`` that holds input files.

    Each input is looked at once (a data list may name a hundred thousand masks), each output once.

    Raises:
        DataError: naming the first output that collides and the input it would replace.
    """
    paths = [Path(p) for p in inputs]
    by_path = {p.resolve(): p for p in paths}
    if folder is not None:
        where = Path(folder).resolve()
        inside = next((p for real, p in by_path.items() if where in (real.parent, p.absolute().parent)), None)
        if inside is not None:
            raise DataError(f"{option} {where}: this folder holds input {inside}; write outputs to another folder")
    by_id = {key: p for p in paths if (key := _file_id(p)) is not None}
    for output in (Path(p) for p in outputs):
        key = _file_id(output)
        hit = by_path.get(output.resolve()) or (by_id.get(key) if key is not None else None)
        if hit is not None:
            raise DataError(f"{output}: writing it would replace input {hit}; choose another {option}")


def check_file_name(name: str, what: str) -> str:
    """``name`` unchanged when it can be part of a file name; refused when it holds a path separator or a control
    character, so that a case id or structure name from a data list can never point outside an output folder.

    Raises:
        DataError: naming ``what`` and the name.
    """
    if re.search(r"[/\\\x00-\x1f\x7f]", name):
        raise DataError(
            f"{what} {name!r} cannot be part of a file name: it holds a path separator or a control character"
        )
    return name


def check_run_file(path: Path, keys: Iterable[str], command: str) -> None:
    """Refuse to replace ``path`` unless it is a file ``command`` writes: a YAML or JSON mapping holding ``keys``.
    A run folder's ``config.yaml`` may be another command's (a pretraining run's) or the user's own.

    Raises:
        DataError: naming the file.
    """
    if not path.exists():
        return
    try:  # a results.json of a large sweep is parsed as JSON: YAML would take seconds at start-up
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        data = None
    if not isinstance(data, dict) or not set(keys) <= set(data):
        raise DataError(f"{path}: exists and is not a file of {command}; choose another output folder")


def check_unique_outputs(outputs: dict[str, Path]) -> None:
    """Refuse two inputs (named by the keys) that would be written to one output path."""
    seen: dict[Path, str] = {}
    for source, output in outputs.items():
        key = Path(output).resolve()
        if key in seen:
            raise DataError(f"{seen[key]} and {source} would both be written to {output}; rename one of them")
        seen[key] = source


def prepare_output_dir(path: str | Path, option: str = "--output") -> Path:
    """Create the output folder if needed and check that files can be written in it.

    Raises:
        DataError: the path is a file, cannot be created, or is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{option} {path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fsseg-write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise DataError(f"{option} {path}: cannot write here ({error.strerror or error})") from None
    return path


def check_output_file(path: str | Path, force: bool = False, option: str = "--output") -> Path:
    """Check a single output file's path: not a folder, not existing unless ``force``, its folder writable.

    Raises:
        DataError: naming the path and what is wrong with it.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{option} {path}: is a folder; give a file name")
    if path.exists() and not force:
        raise DataError(f"{path}: already exists (use --force to overwrite)")
    prepare_output_dir(path.parent, option)
    return path
