"""Files read and written safely: names of scan files, a readable input, atomic writes and staged folders (no
half-written output after an error, a full disk or Ctrl-C), and one-line reasons for OS errors.

It imports nothing heavy, so that the commands can use it before torch is loaded."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fsseg.errors import DataError, DiskFull

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | Path) -> bool:
    """True when the file name ends in .nii or .nii.gz."""
    return str(path).endswith(NIFTI_SUFFIXES)


def scan_name(path: str | Path) -> str:
    """What a scan's outputs are named after: a NIfTI file's stem without nnU-Net's channel suffix ``_0000``
    (``case_0000.nii.gz`` -> ``case``, as nnU-Net names its predictions), a DICOM series folder's name."""
    return Path(path).name if Path(path).is_dir() else nifti_stem(path).removesuffix("_0000")


def nifti_stem(path: str | Path) -> str:
    """File name without .nii/.nii.gz (``case_01.nii.gz`` -> ``case_01``)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def require_file(path: str | Path, what: str = "file") -> Path:
    """``path`` when it is a file this process may read.

    Raises:
        DataError: it is missing, or not readable (a chmod 000 file is unreadable, not corrupt).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: {what} is not readable (permission denied)")
    return path


def cannot_write(path: str | Path, error: OSError) -> DataError:
    """The one-line error of a file or folder that cannot be created or put in place."""
    return DataError(f"{path}: cannot write ({error.strerror or error})")


def write_failed(path: str | Path, error: Exception) -> DataError:
    """The one-line error of a write that failed part-way (a full disk, a quota), with the space left."""
    free = shutil.disk_usage(Path(path).parent).free / 2**20
    kind = DiskFull if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) else DataError
    return kind(f"{path}: cannot write ({getattr(error, 'strerror', None) or error}; {free:.0f} MB free on its disk)")


def new_mode(base: int) -> int:
    """The permissions a new file (``0o666``) or folder (``0o777``) gets under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def remove_leftovers(path: Path) -> None:
    """Remove what a killed write of ``path`` left beside it (``.<name>.*.part*`` files or folders), so that a rerun
    cleans up after it. For commands that alone write ``path``."""
    for leftover in path.parent.glob(f".{path.name}.*.part*"):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()


@contextlib.contextmanager
def staged_writes(out: Path) -> Iterator[Path]:
    """Yield a staging folder inside ``out``; when the block succeeds, every file written there moves to the same
    place under ``out``, and when it fails none does. A command that writes many files (a data set) then leaves
    either all of them or none: no half-written data set after a full disk, an error or Ctrl-C. A killed run's
    staging folder is removed by the next one. For commands that alone write into ``out``."""
    marker = out / "fsseg-staging"
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_leftovers(marker)
        staging = Path(tempfile.mkdtemp(prefix=f".{marker.name}.", suffix=".part", dir=out))
    except OSError as error:
        raise cannot_write(out, error) from None
    try:
        try:
            yield staging
        except DataError as error:  # name the file the user asked for, not its hidden staging place
            raise type(error)(str(error).replace(str(staging), str(out))) from None
        for source in sorted(p for p in staging.rglob("*") if p.is_file()):
            target = out / source.relative_to(staging)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)  # a rename within one folder tree: needs no free space
            except OSError as error:
                raise cannot_write(target, error) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    A crash or Ctrl-C leaves no half-written file at ``path``.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, cannot write a file there")
    suffix = "".join(path.suffixes) or ".tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    except OSError as error:
        raise cannot_write(path, error) from None
    os.close(fd)
    try:
        try:
            yield Path(tmp)
        except OSError as error:  # a full disk or quota while writing: name the output, not the library's internals
            raise write_failed(path, error) from None
        # mkstemp creates the file private (0600); the output gets the permissions of any new file.
        os.chmod(tmp, new_mode(0o666))
        try:
            os.replace(tmp, path)
        except OSError as error:
            raise cannot_write(path, error) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def error_reason(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
