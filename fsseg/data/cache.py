"""A disk cache of preprocessed volumes, keyed by file content and preprocessing.

Built on ``monai.data.PersistentDataset``: the deterministic part of the pipeline (loading, label
conversion, resampling, windowing, cropping) runs once per volume; later epochs read the result from disk
and only run the random crops. Editing a file or changing the preprocessing gives new keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Callable

from monai.data import PersistentDataset

from fsseg.errors import FssegError

_CHUNK = 1 << 20
log = logging.getLogger("fsseg.cache")


@lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-1 of a file's bytes, remembered per (path, size, mtime) so each epoch does not re-read it; of a folder
    (a DICOM series), SHA-1 over the names and digests of the files in it."""
    if os.path.isdir(path):
        members = sorted(p for p in Path(path).iterdir() if p.is_file() and not p.name.startswith("."))
        listing = json.dumps([(p.name, file_digest(p)) for p in members])
        return hashlib.sha1(listing.encode()).hexdigest()
    stat = os.stat(path)
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


def _paths(value: object) -> list[str]:
    if isinstance(value, str):
        return [value] if os.path.exists(value) else []
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths(v)]
    return []


def content_hash(fingerprint: str) -> Callable[[dict], bytes]:
    """A ``hash_func`` for PersistentDataset: the item's file contents, its other fields and ``fingerprint``."""

    def hash_item(item: dict) -> bytes:
        files = {key: [file_digest(p) for p in _paths(value)] for key, value in item.items()}
        others = {key: value for key, value in item.items() if not _paths(value)}
        blob = json.dumps({"files": files, "fields": others, "pre": fingerprint}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest().encode()

    return hash_item


class RecomputingDataset(PersistentDataset):
    """A PersistentDataset that recomputes a damaged cache file (truncated by a full disk or a kill) instead of
    failing; MONAI itself recovers only from a bad magic number."""

    def _cachecheck(self, item_transformed):
        try:
            return super()._cachecheck(item_transformed)
        except Exception as error:  # torch raises many types for damaged files
            cached = Path(self.cache_dir) / f"{self.hash_func(item_transformed).decode('utf-8')}.pt"
            if not cached.is_file() or isinstance(error, FssegError):
                raise
            log.warning(f"cache file {cached} is damaged ({type(error).__name__}); recomputing it")
            cached.unlink()
            return super()._cachecheck(item_transformed)


def cached_dataset(items: Sequence[dict], transform, cache_dir: str | Path, fingerprint: str) -> PersistentDataset:
    """A PersistentDataset over ``items`` whose cache keys change with file content and ``fingerprint``.

    ``fingerprint`` must describe everything that changes the deterministic output (the preprocessing
    settings and the template), e.g. ``json.dumps([pre.to_dict(), template.to_dict()])``.
    """
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return RecomputingDataset(
        list(items), transform=transform, cache_dir=cache_dir, hash_func=content_hash(fingerprint)
    )
