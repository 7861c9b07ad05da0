"""The one policy of fsseg's three disk caches, and the first of them.

The caches: preprocessed volumes for pretraining (:func:`cached_dataset`, on ``monai.data.PersistentDataset``:
the deterministic part of the pipeline runs once per volume, later epochs only crop), frozen-backbone features
(:class:`fsseg.adapters.feature_cache.FeatureStore`) and encoder skips
(:class:`fsseg.training.encoder_cache.EncoderCache`). Each follows the same three rules:

* **Keys**: an entry is named by :func:`cache_key` of everything that determines it (the weights' and the
  scan's content by :func:`file_digest`, the preprocessing, the precision). Changed inputs give a new key, so an
  entry is never updated in place and never stale.
* **Writes**: every file is written atomically (:func:`fsseg.files.atomic_path`); an entry of several files is
  complete only once its marker file, written last, is there.
* **Damage**: an entry that cannot be read (a kill, a full disk) is logged, removed by :func:`discard_damaged`
  and computed again; it never stops a run.
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


def cache_key(*parts: object) -> str:
    """The name of the cache entry that ``parts`` (JSON-able: digests, settings) determine: 20 hex digits."""
    return hashlib.sha1(json.dumps(list(parts), sort_keys=True, default=str).encode()).hexdigest()[:20]


def discard_damaged(path: Path, error: BaseException, what: str) -> None:
    """Log that the cached ``what`` at ``path`` cannot be read and remove it (a file: an entry's file or its
    marker), so that it is computed again."""
    log.warning(f"cached {what} {path} are damaged ({type(error).__name__}); recomputing them")
    path.unlink(missing_ok=True)


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
        return cache_key({"files": files, "fields": others, "pre": fingerprint}).encode()

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
            discard_damaged(cached, error, "volume")
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
